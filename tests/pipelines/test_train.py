"""Training: data selection and label tables (pure), token rows and collation, evaluation metrics, and real Ray Train
runs of sft / prm / orm on the tiny model with 2 CPU workers: the loss falls, checkpoints are written, a run that
fails after step k is resumed from checkpoint k by re-running it with the same config, and FailureConfig retries.

The failure is real: the test-only loop extra `_test_crash_after_step` (`build_trainer(loop_extras=...)`) raises
inside every worker after step k's checkpoint was reported, Ray Train tears the worker group down and `fit()`
raises TrainingFailedError, as for any worker crash; the re-run is a new TorchTrainer with the same run name and
storage path, exactly what re-running the job command does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import schema
from pipelines import train as T
from pipelines.config import ConfigError, InputError, load_config

# ----------------------------------------------------------------------------------------------------------
# Row builders (the schema kinds the jobs read)
# ----------------------------------------------------------------------------------------------------------

PROMPT = "<|im_start|>user\nTom has {a} apples and buys {b}. How many?<|im_end|>\n<|im_start|>assistant\n"


def sample(pid: str, idx: int, completion: str, correct: bool, finish: str = "stop", error: str = "",
           mode: str = "sample", prompt: str = "P") -> dict:
    return {"problem_id": pid, "sample_id": f"{pid}/s{idx}", "sample_idx": idx, "mode": mode, "prompt": prompt,
            "completion": completion, "steps": completion.split("\n"), "answer": None, "answer_method": "none",
            "gold": "0", "kind": "numeric", "correct": correct, "reason": "correct" if correct else "wrong",
            "n_prompt_tokens": 0, "n_completion_tokens": 0, "finish_reason": finish, "cum_logprob": float("nan"),
            "confidence": float("nan"), "temperature": 0.7, "model": "tiny", "error": error}


def sample_rows(n_problems: int = 8) -> list[dict]:
    """Per problem: two distinct correct samples, a whitespace duplicate of the first, one wrong ("oops")."""
    rows = []
    for p in range(n_problems):
        a, b = 3 + p, 4 + p
        good = f"{a} + {b} = {a + b}\nThe answer is {a + b}."
        bad = f"{a} + {b} = {a + b + 1} oops\nThe answer is {a + b + 1} oops"
        for j, (text, ok) in enumerate([(good, True), (good + " ", True), (bad, False),
                                        (good.replace("The", "So the"), True)]):
            rows.append(sample(f"p{p}", j, text, ok, prompt=PROMPT.format(a=a, b=b)))
    return rows


def step_label_rows(n: int = 16) -> list[dict]:
    """Odd rows: step 2 is wrong (and says so), labels 1, 0, 0; even rows: all steps right, labels 1, 1, 1."""
    rows = []
    for i in range(n):
        a, b, bad = 2 + i, 5, i % 2
        second = f"{a + b} * 2 = {2 * (a + b) + bad}" + (" wrong wrong wrong" if bad else " right right right")
        steps = [f"{a} + {b} = {a + b}", second, f"The answer is {2 * (a + b) + bad}."]
        soft = [1.0, 0.0, 0.0] if bad else [1.0, 1.0, 1.0]
        rows.append({"problem_id": f"q{i}", "sample_id": f"q{i}/s0", "steps": steps, "soft_labels": soft,
                     "question": f"Tom has {a} apples. He buys {b} more, then doubles them. How many?",
                     "hard_labels": [int(s > 0) for s in soft], "rollouts": [4, 4, 1], "tokens_generated": 100,
                     "method": "naive", "model": "tiny", "verifier": "numeric"})
    return rows


def write(rows: list[dict], kind: str, path: Path) -> str:
    pq.write_table(schema.to_table(rows, kind), path)
    return str(path)


def cfg_for(task: str, data: str, out: Path, base: str = "tiny", **kw) -> T.TrainConfig:
    base_cfg = {"task": task, "data": data, "base": base, "out": str(out), "max_len": 256,
                "prompt": {"few_shot": False}, "select": {"k": 0}, "eval": {"holdout_fraction": 0.0}}
    return load_config(T.TrainConfig, base={**base_cfg, **kw})


# ----------------------------------------------------------------------------------------------------------
# Pure: selection, labels, hold-out, configs
# ----------------------------------------------------------------------------------------------------------

def test_select_sft_keeps_verified_distinct_at_most_k_per_problem():
    rows = [
        sample("a", 0, "x = 1\nThe answer is 1.", True),
        sample("a", 1, "x  =  1\nThe answer is 1. ", True),  # whitespace duplicate of a/0
        sample("a", 2, "y = 1\nThe answer is 1.", True),
        sample("a", 3, "z = 1\nThe answer is 1.", True),  # over k=2
        sample("a", 4, "w = 2", False),
        sample("b", 0, "q = 5\nThe answer is 5.", True, finish="length"),  # cut at max_tokens
        sample("b", 1, "r = 5\nThe answer is 5.", True),
        sample("b", 2, "", True, error="engine_error: x"),
        sample("c", 0, "nothing", False),
        sample("a", 9, "x = 1\nThe answer is 1.", True, mode="greedy"),  # greedy duplicate of a/0
    ]
    kept, why = T.select_sft(rows, T.SelectConfig(k=2, dedup=True, balance=False, require_stop=True))
    assert [r["sample_id"] for r in kept] == ["a/s0", "a/s2", "b/s1"]
    assert all(r["weight"] == 1.0 for r in kept)
    assert why == {"duplicate": 2, "over_k": 1, "not_correct": 2, "no_stop": 1, "error": 1}
    kept, _ = T.select_sft(rows, T.SelectConfig(k=0, dedup=False, balance=True, require_stop=False))
    weights = {r["sample_id"]: r["weight"] for r in kept}
    assert weights["a/s0"] == pytest.approx(1 / 5) and weights["b/s0"] == pytest.approx(1 / 2)
    assert sum(w for s, w in weights.items() if s.startswith("a/")) == pytest.approx(1.0)


def test_select_sft_step_checks_drop_right_answers_by_wrong_steps(tmp_path):
    """select.step_checks: a verified sample of a problem with step checks must pass them too (quantities 3, 4, 2:
    3 + 4 = 7, 7 x 2 = 14); a problem without quantities keeps outcome verification; off = every verified sample.
    Through read_examples, the problems come from the generate run's problems.parquet."""
    from pipelines import runs

    prob = {"id": "a", "question": "Q", "answer": "14", "kind": "numeric", "source": "synthetic",
            "quantities": [3.0, 4.0, 2.0], "ref_steps": ["3 + 4 = 7", "7 x 2 = 14"], "ref_values": [7.0, 14.0]}
    rows = [sample("a", 0, "3 + 4 = 7\n7 x 2 = 14\nThe answer is 14.", True),
            sample("a", 1, "3 + 4 = 8\n8 x 2 = 14\nThe answer is 14.", True),  # right answer, wrong steps
            sample("b", 0, "3 + 4 = 8\nThe answer is 8.", True)]  # no step checks for b: kept
    on = T.SelectConfig(k=0, step_checks=True)
    kept, why = T.select_sft(rows, on, {"a": prob, "b": {**prob, "id": "b", "quantities": []}})
    assert [r["sample_id"] for r in kept] == ["a/s0", "b/s0"] and why == {"wrong_step": 1}
    assert len(T.select_sft(rows, T.SelectConfig(k=0), {"a": prob})[0]) == 3
    run = tmp_path / "gen"
    (run / "samples").mkdir(parents=True)
    write(rows, "sample", run / "samples" / "part-0.parquet")
    runs.write_problems([prob], run)
    cfg = cfg_for("sft", str(run), tmp_path / "out", select={"k": 0, "step_checks": True})
    assert sorted(e["sample_id"] for e in T.read_examples(cfg).train) == ["a/s0", "b/s0"]


def test_select_sft_shows_work_drops_answers_stated_without_a_computation():
    """select.shows_work: a verified numeric sample must compute its answer in a claim that holds; what a weak model
    writes after a STaR hint ("... has now is 26. The answer is 26.") is dropped, as is a false claim that happens
    to give it; a non-numeric problem is not judged by it."""
    rows = [sample("a", 0, "Ravi has 23 + 3 = 26 stickers.\nThe answer is 26.", True),
            sample("a", 1, "The number of stickers Ravi has now is 26.\nThe answer is 26.", True),
            sample("a", 2, "23 + 4 = 26\nThe answer is 26.", True),  # a false claim
            {**sample("m", 0, "Simplify: $\\frac{1}{2}$.", True), "kind": "math"}]
    for r in rows:
        r["answer"] = "26" if r["problem_id"] == "a" else "\\frac{1}{2}"
    kept, why = T.select_sft(rows, T.SelectConfig(k=0, shows_work=True))
    assert [r["sample_id"] for r in kept] == ["a/s0", "m/s0"] and why == {"answer_not_computed": 2}
    assert len(T.select_sft(rows, T.SelectConfig(k=0))[0]) == 4  # off by default


@pytest.mark.parametrize("soft, hard, target, expected", [
    ([1.0, 0.5, 0.0], [1, 1, 0], "soft", [1.0, 0.5, 0.0]),
    ([1.0, 0.5, 0.0], [1, 1, 0], "hard", [1.0, 1.0, 0.0]),
    ([1.0, float("nan"), None], [1, -1, None], "soft", [1.0, "nan", "nan"]),
    ([1.0, float("nan"), None], [1, -1, None], "hard", [1.0, "nan", "nan"]),
])
def test_targets_from_step_label(soft, hard, target, expected):
    got = T.targets_from_step_label(soft, hard, target)
    assert [("nan" if math.isnan(g) else g) for g in got] == expected


@pytest.mark.parametrize("ratings, neutral, after, expected", [
    ([1, 1, 1], 1.0, "zero", [1.0, 1.0, 1.0]),
    ([1, 0, 1], 1.0, "zero", [1.0, 1.0, 1.0]),
    ([1, 0, 1], 0.5, "zero", [1.0, 0.5, 1.0]),
    ([1, -1, 1, 1], 1.0, "zero", [1.0, 0.0, 0.0, 0.0]),  # prefix values: nothing recovers after an error
    ([1, -1, 1], 1.0, "drop", [1.0, 0.0, "nan"]),
])
def test_targets_from_prm800k_ratings(ratings, neutral, after, expected):
    got = T.targets_from_ratings(ratings, neutral, after)
    assert [("nan" if math.isnan(g) else g) for g in got] == expected


@pytest.mark.parametrize("first_error, n, after, expected", [
    (-1, 3, "zero", [1.0, 1.0, 1.0]),
    (0, 3, "zero", [0.0, 0.0, 0.0]),
    (1, 4, "zero", [1.0, 0.0, 0.0, 0.0]),
    (1, 4, "drop", [1.0, 0.0, "nan", "nan"]),
])
def test_targets_from_processbench_first_error(first_error, n, after, expected):
    got = T.targets_from_first_error(first_error, n, after)
    assert [("nan" if math.isnan(g) else g) for g in got] == expected


def test_prm800k_native_row_follows_the_chosen_path_to_the_first_error():
    row = {"question": {"problem": "What is 2+2?"},
           "label": {"steps": [
               {"completions": [{"text": "2+2=5", "rating": -1}, {"text": "2+2=4", "rating": 1}],
                "chosen_completion": 1},
               {"completions": [{"text": "So 4.", "rating": 0}], "chosen_completion": 0},
               {"completions": [{"text": "Answer 5", "rating": -1}, {"text": "Hmm", "rating": 0}],
                "chosen_completion": None},
               {"completions": [{"text": "never read", "rating": 1}], "chosen_completion": 0}],
               "finish_reason": "found_error"}}
    assert T._prm800k_native(row) == ("What is 2+2?", ["2+2=4", "So 4.", "Answer 5"], [1, 0, -1])
    cfg = load_config(T.TrainConfig, base={"task": "prm", "data": "x.jsonl"})
    ex = T.build_examples("prm800k", [row, {"question": {}, "label": {"steps": []}}], cfg)
    assert [e["targets"] for e in ex.train + ex.holdout] == [[1.0, 1.0, 0.0]]
    assert ex.rejects[0]["reason"].startswith("prm800k")


def test_read_rows_detects_kinds(tmp_path):
    assert T.read_rows(write(sample_rows(2), "sample", tmp_path / "s.parquet"))[0] == "sample"
    assert T.read_rows(write(step_label_rows(2), "step_label", tmp_path / "l.parquet"))[0] == "step_label"
    (tmp_path / "pb.json").write_text(json.dumps([{"id": "x", "problem": "q", "steps": ["a", "b"], "label": 1,
                                                   "final_answer_correct": False, "generator": "g"}]))
    assert T.read_rows(tmp_path / "pb.json")[0] == "processbench"
    (tmp_path / "r.jsonl").write_text(json.dumps({"question": "q", "steps": ["a"], "ratings": [1]}) + "\n")
    assert T.read_rows(tmp_path / "r.jsonl")[0] == "prm800k"
    gen = tmp_path / "gen" / "samples"
    gen.mkdir(parents=True)
    write(sample_rows(1), "sample", gen / "part-1.parquet")
    write(sample_rows(2)[4:], "sample", gen / "part-2.parquet")
    kind, rows = T.read_rows(tmp_path / "gen")  # a generate run's folder: its samples/ parts
    assert kind == "sample" and len(rows) == 8
    (tmp_path / "ann" / "labels").mkdir(parents=True)
    write(step_label_rows(3), "step_label", tmp_path / "ann" / "labels" / "part-0.parquet")
    assert T.read_rows(tmp_path / "ann")[0] == "step_label"  # an annotate run's folder: its labels/ parts
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.read_rows(tmp_path / "missing")


def test_build_examples_rejects_wrong_kinds_and_bad_rows(tmp_path):
    cfg = load_config(T.TrainConfig, base={"task": "prm", "data": "x", "eval": {"holdout_fraction": 0.0}})
    with pytest.raises(ValueError, match="needs step_label or prm800k or processbench rows"):
        T.build_examples("sample", sample_rows(1), cfg)
    bad = step_label_rows(3)
    bad[1]["soft_labels"] = [1.0]  # 1 label for 3 steps
    bad[2]["soft_labels"] = [float("nan")] * 3
    ex = T.build_examples("step_label", bad, cfg)
    assert [e["sample_id"] for e in ex.train] == ["q0/s0"]
    assert sorted(r["reason"].split(":")[0] for r in ex.rejects) == ["label_length", "no_labelled_step"]


def test_holdout_split_is_by_problem_and_deterministic():
    ids = [f"syn-abc-{i:06d}" for i in range(2000)]
    held = [i for i in ids if T.in_holdout(i, 0.2, seed=0)]
    assert 300 < len(held) < 500
    assert held == [i for i in ids if T.in_holdout(i, 0.2, seed=0)]
    assert held != [i for i in ids if T.in_holdout(i, 0.2, seed=1)]
    cfg = load_config(T.TrainConfig, base={"task": "orm", "data": "x", "eval": {"holdout_fraction": 0.5}})
    ex = T.build_examples("sample", sample_rows(8), cfg)
    train_p = {e["problem_id"] for e in ex.train}
    held_p = {e["problem_id"] for e in ex.holdout}
    assert train_p and held_p and not train_p & held_p and len(train_p | held_p) == 8


def test_orm_examples_dedup_and_targets():
    cfg = load_config(T.TrainConfig, base={"task": "orm", "data": "x", "eval": {"holdout_fraction": 0.0}})
    ex = T.build_examples("sample", sample_rows(2), cfg)
    assert len(ex.train) == 6 and ex.dropped == {"duplicate": 2}
    assert sorted(e["target"] for e in ex.train) == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]


def test_a_generate_run_folder_is_read_as_its_samples_not_its_problems(tmp_path):
    """A run folder holds problems.parquet beside samples/: --data <run> trains on the samples."""
    from pipelines import runs
    from pipelines.problems import SyntheticConfig, load_problems

    (tmp_path / "gen" / "samples").mkdir(parents=True)
    write([sample("p1", 0, "1 + 1 = 2", True)], "sample", tmp_path / "gen" / "samples" / "part-0.parquet")
    runs.write_problems(load_problems("synthetic", synthetic=SyntheticConfig(n=2)).problems, tmp_path / "gen")
    assert T.data_files(tmp_path / "gen") == [tmp_path / "gen" / "samples" / "part-0.parquet"]
    kind, rows = T.read_rows(tmp_path / "gen")
    assert kind == "sample" and [r["sample_id"] for r in rows] == ["p1/s0"]


def test_extra_data_is_read_with_the_data_and_must_be_the_same_kind(tmp_path):
    """STaR's rationalizations come as a second Sample folder beside the round's samples (extra_data)."""
    (tmp_path / "gen" / "samples").mkdir(parents=True)
    (tmp_path / "rat" / "samples").mkdir(parents=True)
    write([sample("p1", 0, "1 + 1 = 2", True)], "sample", tmp_path / "gen" / "samples" / "part-0.parquet")
    write([sample("p2", 0, "2 + 2 = 4", True, mode="rationalized", prompt="Q2")], "sample",
          tmp_path / "rat" / "samples" / "part-0.parquet")
    cfg = cfg_for("sft", str(tmp_path / "gen"), tmp_path / "out", extra_data=[str(tmp_path / "rat")])
    ex = T.read_examples(cfg)
    assert sorted((e["problem_id"], e["prompt"]) for e in ex.train) == [("p1", "P"), ("p2", "Q2")]
    labels = tmp_path / "labels.parquet"
    write([{"sample_id": "x", "problem_id": "p", "question": "Q", "steps": ["a"], "soft_labels": [1.0],
            "hard_labels": [1], "rollouts": [1], "tokens_generated": 0, "method": "naive", "model": "tiny",
            "verifier": "v"}], "step_label", labels)
    with pytest.raises(InputError, match="extra_data"):
        T.read_examples(cfg_for("sft", str(tmp_path / "gen"), tmp_path / "out", extra_data=[str(labels)]))


def test_config_validation():
    with pytest.raises(ConfigError, match="previous"):
        load_config(T.TrainConfig, base={"task": "sft", "round_mode": "continue"})
    cont = load_config(T.TrainConfig, base={"round_mode": "continue", "previous": "runs/r1/model", "base": "smollm2"})
    rest = load_config(T.TrainConfig, overrides=["round_mode=rest_em", "previous=runs/r1/model"])
    assert cont.init_model() == "runs/r1/model" and rest.init_model() == "smollm2"
    with pytest.raises(ConfigError, match="STaR restarts from the base model"):  # the old name is not silently kept
        load_config(T.TrainConfig, base={"round_mode": "star", "previous": "runs/r1/model"})
    with pytest.raises(ConfigError, match="task"):
        load_config(T.TrainConfig, base={"task": "grpo"})
    with pytest.raises(ConfigError, match="labels.target"):
        load_config(T.TrainConfig, overrides=["labels.target=medium"])
    cfg = load_config(T.TrainConfig, overrides=["out=runs/x", "task=prm"])
    assert cfg.resolved_run_name() == "prm-x" and cfg.resolved_storage().endswith("runs/x/ray_results")
    with pytest.raises(ValueError, match="cannot fill one step"):
        T.plan_steps(3, load_config(T.TrainConfig, base={"num_workers": 2, "batch_size": 2}))
    assert T.plan_steps(17, load_config(T.TrainConfig, base={"num_workers": 2, "batch_size": 2, "epochs": 3})) \
        == (4, 12)


def test_lr_schedule():
    assert [T.lr_factor(s, 2, 10, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert T.lr_factor(2, 2, 10, "linear") == pytest.approx(1.0)
    assert T.lr_factor(6, 2, 10, "linear") == pytest.approx(0.5)
    assert T.lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5)
    assert T.lr_factor(10, 2, 10, "cosine") == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------

def test_auc_table():
    assert T.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert T.auc([0.2, 0.9], [0, 1]) == 1.0 and T.auc([0.9, 0.2], [0, 1]) == 0.0
    assert T.auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5  # ties count one half
    assert math.isnan(T.auc([0.1, 0.2], [1, 1]))


def test_processbench_metrics():
    assert T.predicted_first_error([0.9, 0.7, 0.2, 0.1], 0.5) == 2
    assert T.predicted_first_error([0.9, float("nan"), 0.6], 0.5) == -1
    # erroneous: labels 1, 2 -> predicted 1 (hit), 0 (miss); correct: -1, -1 -> predicted -1 (hit), 3 (miss)
    pb = T.processbench_f1([1, 0, -1, 3], [1, 2, -1, -1])
    assert pb["error_acc"] == 0.5 and pb["correct_acc"] == 0.5 and pb["f1"] == pytest.approx(0.5)
    pb = T.processbench_f1([1, 2, -1, 3], [1, 2, -1, -1])
    assert pb["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_step_f1_positive_class_is_wrong_step():
    pred_ok = [[True, False, False], [True, True]]
    truth_ok = [[True, True, False], [True, False]]
    got = T.step_f1(pred_ok, truth_ok)  # tp 1 (s0 step2), fp 1 (s0 step1), fn 1 (s1 step1), tn 2
    assert (got["precision"], got["recall"], got["f1"], got["accuracy"]) == (0.5, 0.5, 0.5, 0.6)
    assert T.flag_all_f1(got["wrong_share"]) == pytest.approx(2 * 0.4 / 1.4)


@pytest.mark.parametrize("pred_ok,truth_ok,f1", [
    ([[True, True]], [[True, True]], math.nan),  # nothing wrong, nothing flagged: undefined (as label_quality)
    ([[True, True]], [[True, False]], 0.0),      # the wrong step missed
    ([[False, True]], [[True, True]], 0.0),      # a false flag only
])
def test_step_f1_without_true_positives(pred_ok, truth_ok, f1):
    got = T.step_f1(pred_ok, truth_ok)["f1"]
    assert (math.isnan(got) and math.isnan(f1)) or got == f1


@pytest.mark.parametrize("scores, wrong, default, expected", [
    ([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], 0.5, 0.5),            # a clean gap: its midpoint
    ([0.30, 0.32, 0.34, 0.9], [1, 1, 1, 0], 0.5, 0.62),         # a PRM scoring low everywhere: the cut moves up
    ([0.1, 0.2, 0.8, 0.9], [1, 0, 1, 0], 0.5, 0.85),           # F1 2/3, 1/2, 4/5, 2/3: cut above 0.8
    ([0.4, 0.6], [0, 0], 0.5, 0.5),                             # nothing wrong: nothing to fit
    ([0.4, float("nan"), 0.6], [1, 0, 0], 0.3, 0.5),            # unscored steps are left out
])
def test_fit_threshold_maximises_wrong_step_f1(scores, wrong, default, expected):
    assert T.fit_threshold(scores, [bool(w) for w in wrong], default) == pytest.approx(expected)


def test_calibrated_metrics_are_cross_fitted_and_beat_a_bad_fixed_threshold():
    """Scores that rank steps perfectly but sit below 0.5 everywhere: at the fixed 0.5 every step is flagged; each
    half's threshold, fitted on the other half, separates them, and no solution is judged by its own fit."""
    sols = []
    for i in range(40):
        ok = [True, i % 2 == 0]  # odd solutions go wrong at step 1
        sols.append((f"syn-x-{i:06d}", ok, [0.40, 0.40 if ok[1] else 0.10]))
    m = T.truth_scores_metrics(sols, 0.5)
    assert m["precision"] == pytest.approx(20 / 80) and m["first_error_acc"] == 0.0  # flag-all at 0.5
    c = m["calibrated"]
    assert c["f1"] == 1.0 and c["first_error_acc"] == 1.0
    assert all(0.10 < t <= 0.40 for t in c["fold_thresholds"]) and c["threshold"] == pytest.approx(0.25)
    assert m["auc_wrong"] == 1.0 and m["solutions"] == 40


def test_step_truth_and_synthetic_lookup():
    from pipelines.synthetic import SyntheticConfig, synthetic_problem

    syn = SyntheticConfig(min_steps=2, max_steps=2)
    p = synthetic_problem(syn, 3)
    found = T.problems_by_id([p["id"], "syn-zzzzzz-000001", "gsm8k-test-1"], syn)
    assert list(found) == [p["id"]] and found[p["id"]]["question"] == p["question"]
    right = p["ref_steps"] + [f"The answer is {p['answer']}."]
    assert T.step_truth(p, right) == [True, True, True]
    a, rest = p["ref_steps"][0].split(" = ")
    wrong = [f"{a} = {int(float(rest)) + 1}"] + right[1:]
    assert T.step_truth(p, wrong) == [False, False, False]  # prefix truth: nothing is right after an error


def test_truth_data_rebuilds_problems_and_scores_steps_against_ground_truth(tmp_path, monkeypatch):
    """eval.truth_data: a generate run folder's finished samples, their problems rebuilt from its config.json; the
    metrics' arithmetic checked with given step scores (the scorer actor is replaced by a table here; the real
    PRMScorer path is the one the crash/resume test and `stepray train prm` exercise)."""
    import pipelines.train.evaluation as J
    from pipelines.synthetic import SyntheticConfig, synthetic_problem

    syn = SyntheticConfig(n=4, seed=5, min_steps=2, max_steps=2)
    run = tmp_path / "gen"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"problems": "synthetic", "synthetic": {
        "n": 4, "seed": 5, "min_steps": 2, "max_steps": 2, "ops": list(syn.ops)}}))
    probs = [synthetic_problem(syn, i) for i in range(2)]
    rows = []
    for i, p in enumerate(probs):
        right = p["ref_steps"] + [f"The answer is {p['answer']}."]
        a, rest = p["ref_steps"][1].split(" = ")
        wrong = [right[0], f"{a} = {int(float(rest)) + 1}", "The answer is 0."]  # first error at step 1
        for j, steps in enumerate([right, wrong]):
            rows.append({**sample(p["id"], j, "\n".join(steps), j == 0), "steps": steps})
    rows.append(sample("gsm8k-test-1", 0, "1 + 1 = 2", True))  # not a problem of this config: left out
    rows.append({**sample(probs[0]["id"], 9, "1 +", False, finish="length")})  # unfinished: left out
    write(rows, "sample", run / "samples" / "part-0.parquet")

    samples, problems, left_out = J.truth_samples(str(run))
    assert len(samples) == 4 and set(problems) == {p["id"] for p in probs}
    assert left_out == {"no_ground_truth": 1, "unfinished": 1}

    # scores per solution: right ones all high; problem 0's wrong one flagged at step 1, problem 1's at step 2 only
    table = {0: [0.9, 0.8, 0.9], 1: [0.9, 0.2, 0.1], 2: [0.7, 0.9, 0.6], 3: [0.8, 0.6, 0.3]}
    monkeypatch.setattr(J, "scored_rows", lambda ds, *a, **k: [
        {"idx": r["idx"], "step_scores": table[r["idx"]]} for r in ds.take_all()])
    monkeypatch.setattr(J, "render", lambda *a, **k: "unused")
    cfg = cfg_for("prm", "unused", tmp_path / "out", eval={"truth_data": str(run)})
    m = J.truth_metrics(cfg, None, "unused", samples, problems)
    # truth (prefix): right = [T, T, T]; wrong = [T, F, F]. Wrong steps: 4 of 12.
    # predicted wrong (score < 0.5): idx1 steps 1, 2 (both truly wrong); idx3 step 2 (truly wrong) -> tp 3, fp 0, fn 1
    assert (m["precision"], m["recall"]) == (1.0, 0.75) and m["f1"] == pytest.approx(2 * 0.75 / 1.75)
    assert m["steps"] == 12 and m["wrong_share"] == pytest.approx(4 / 12)
    assert m["first_error_acc"] == 0.75  # idx3 predicts its first error at 2, the truth is 1
    # AUC of -score for "wrong": wrong steps' scores {0.2, 0.1, 0.6, 0.3} vs right steps' 8 scores
    right_scores = [0.9, 0.8, 0.9, 0.9, 0.7, 0.9, 0.6, 0.8]
    pairs = [(w < r) + 0.5 * (w == r) for w in (0.2, 0.1, 0.6, 0.3) for r in right_scores]
    assert m["auc_wrong"] == pytest.approx(sum(pairs) / len(pairs))
    with pytest.raises(FileNotFoundError, match="config.json"):
        J.truth_samples(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# Token rows and collation
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_encode_sft_masks_the_prompt_and_ends_with_eos(tok):
    ids, n_prompt = T.encode_sft(tok, "P: hi\n", "4 + 3 = 7", 64)
    assert ids[:n_prompt] == tok.encode("P: hi\n", add_special_tokens=False)
    assert ids[n_prompt:-1] == tok.encode("4 + 3 = 7", add_special_tokens=False)
    assert ids[-1] == tok.eos_token_id
    cut, _ = T.encode_sft(tok, "P: hi\n", "4 + 3 = 7", n_prompt + 2)
    assert len(cut) == n_prompt + 2
    assert T.encode_sft(tok, "P: hi\n", "x", n_prompt) is None


def test_encode_steps_reads_the_separator_token(tok):
    from pipelines.reward_model import encode_steps

    steps = ["4 + 3 = 7", "7 * 2 = 14", "The answer is 14."]
    ids, pos = encode_steps(tok, "Q?\n", steps, "\n", 512)
    newline = tok.encode("\n", add_special_tokens=False)
    assert len(pos) == 3 and len(newline) == 1
    assert all(ids[p] == newline[0] for p in pos) and pos[-1] == len(ids) - 1
    assert tok.decode(ids[pos[0] + 1: pos[1] + 1]) == "7 * 2 = 14\n"
    ids2, pos2 = encode_steps(tok, "Q?\n", steps, "\n", pos[1] + 1)  # room for two steps only
    assert pos2 == pos[:2] and ids2 == ids[: pos[1] + 1]


def test_tokenize_and_collate_each_task(tok):
    cfg_sft = load_config(T.TrainConfig, base={"task": "sft", "max_len": 64})
    rows, rejects = T.tokenize_examples("sft", [{"sample_id": "a", "prompt": "P\n", "completion": "x = 1",
                                                 "weight": 0.5}, {"sample_id": "b", "prompt": "P " * 80,
                                                                  "completion": "y", "weight": 1.0}], tok, cfg_sft)
    assert len(rows) == 1 and rejects[0]["reason"].startswith("prompt_too_long")
    b = T.collate_batch("sft", {k: [r[k] for r in rows * 2] for k in rows[0]}, tok.pad_token_id)
    n_prompt = rows[0]["n_prompt"]
    assert b["loss_mask"][0].tolist() == [False] * n_prompt + [True] * (len(rows[0]["input_ids"]) - n_prompt)
    assert b["weights"].tolist() == [0.5, 0.5]

    cfg_prm = load_config(T.TrainConfig, base={"task": "prm", "max_len": 256, "prompt": {"few_shot": False}})
    ex = T.build_examples("step_label", step_label_rows(2), cfg_prm)
    rows, _ = T.tokenize_examples("prm", ex.train + ex.holdout, tok, cfg_prm)
    b = T.collate_batch("prm", {k: [r[k] for r in rows] for k in rows[0]}, tok.pad_token_id)
    assert b["positions"].shape == (2, 3) and b["targets"].tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    assert b["input_ids"].shape[1] == max(len(r["input_ids"]) for r in rows)

    cfg_orm = load_config(T.TrainConfig, base={"task": "orm", "max_len": 256, "eval": {"holdout_fraction": 0.0}})
    ex = T.build_examples("sample", sample_rows(1), cfg_orm)
    rows, _ = T.tokenize_examples("orm", ex.train, tok, cfg_orm)
    b = T.collate_batch("orm", {k: [r[k] for r in rows] for k in rows[0]}, tok.pad_token_id)
    assert b["targets"].tolist() == [1.0, 0.0, 1.0]


def test_preference_pairs_pair_verified_with_failed_within_a_problem():
    """V-STaR pairs: only within a problem, verified over failed, duplicates and errors out, at most k, the draw
    reproducible and independent of the other problems."""
    rows = sample_rows(3) + [sample("p9", 0, "1 + 1 = 2", True), sample("p9", 1, "x", False, error="engine_error")]
    pairs, why = T.preference_pairs(rows, k=8)
    assert len(pairs) == 3 * 2  # per problem: 2 distinct verified x 1 failed; p9 has no failed sample left
    assert why == {"duplicate": 3, "error_or_empty": 1, "problem_without_failed": 1}
    for p in pairs:
        chosen_id, rejected_id = p["sample_id"].split(">")
        assert chosen_id.split("/")[0] == rejected_id.split("/")[0] == p["problem_id"]
        assert "oops" in p["rejected"] and "oops" not in p["chosen"]
    one, why1 = T.preference_pairs(rows, k=1, seed=3)
    assert len(one) == 3 and why1["over_k"] == 3
    assert [p for p in T.preference_pairs(rows[4:], k=1, seed=3)[0]] == one[1:]  # p0 left out: the others unchanged


def test_dpo_rows_collate_chosen_then_rejected(tok):
    cfg = load_config(T.TrainConfig, base={"task": "dpo", "max_len": 256, "eval": {"holdout_fraction": 0.0}})
    ex = T.build_examples("sample", sample_rows(2), cfg)
    rows, rejects = T.tokenize_examples("dpo", ex.train, tok, cfg)
    assert len(rows) == 4 and not rejects and ex.dropped == {"duplicate": 2}
    b = T.collate_batch("dpo", {k: [r[k] for r in rows] for k in rows[0]}, tok.pad_token_id)
    assert b["input_ids"].shape[0] == 8 and b["weights"].shape == (4,)
    for i, r in enumerate(rows):  # row i: chosen; row 4 + i: its rejected, both masked after the shared prompt
        for seq, ids in ((i, r["input_ids"]), (4 + i, r["rejected_ids"])):
            assert b["input_ids"][seq, : len(ids)].tolist() == ids
            assert b["loss_mask"][seq].tolist() == [False] * r["n_prompt"] + [True] * (len(ids) - r["n_prompt"]) + \
                [False] * (b["input_ids"].shape[1] - len(ids))
    with pytest.raises(ConfigError, match="beta > 0"):
        load_config(T.TrainConfig, base={"task": "dpo", "beta": 0})


# ----------------------------------------------------------------------------------------------------------
# Ray Train: 2 CPU workers, crash after step 8, re-run resumes from checkpoint 8
# ----------------------------------------------------------------------------------------------------------

def _prepare(task: str, tmp_path: Path, tiny_model: str, **kw):
    from transformers import AutoTokenizer

    if task == "prm":
        data = write(step_label_rows(16), "step_label", tmp_path / "labels.parquet")
    else:
        data = write(sample_rows(8), "sample", tmp_path / "samples.parquet")
    # sft, prm: 16 rows, 2 workers x batch 2: 4 steps per epoch, 4 epochs = 16 steps, checkpoints at 8 and 16.
    # orm: 24 rows (8 problems x 3 distinct samples): 6 steps per epoch, 2 epochs = 12 steps, checkpoints every 4, so
    # a crash after step 8 resumes mid-epoch (epoch 1 after its first 2 batches).
    orm = {"epochs": 2, "checkpoint_every": 4} if task == "orm" else {}
    settings = {"lr": 1e-3, "batch_size": 2, "epochs": 4, "checkpoint_every": 8, "log_every": 2, "mlflow": False}
    cfg = cfg_for(task, data, tmp_path / f"out-{task}", base=tiny_model, **{**settings, **orm, **kw})
    ex = T.read_examples(cfg)
    rows, rejects = T.tokenize_examples(task, ex.train, AutoTokenizer.from_pretrained(tiny_model), cfg)
    assert len(rows) == (24 if task == "orm" else 16) and not rejects
    return cfg, rows


def _loss_fell(history: list[dict]) -> tuple[float, float]:
    """Mean logged loss of the first two and of the last two log points (each the mean over 2 steps)."""
    first = sum(h["loss"] for h in history[:2]) / 2
    last = sum(h["loss"] for h in history[-2:]) / 2
    return first, last


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sft", "prm", "orm"])
def test_train_through_ray_train_and_resume_after_a_crash(task, tmp_path, ray_session, tiny_model, monkeypatch):
    import torch
    from ray.train import TrainingFailedError

    use_mlflow = task == "sft"  # one MLflow check is enough (each costs a few seconds)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact folder (./mlruns) lands in tmp_path
    cfg, rows = _prepare(task, tmp_path, tiny_model, mlflow=use_mlflow)
    crash = {"_test_crash_after_step": 8}
    out = Path(cfg.out)
    out.mkdir(parents=True)
    run_id = T.mlflow_run(cfg, out, {"task": task}) if use_mlflow else None
    meta = {"prompt": {"format": "lines", "system": "", "few_shot": False}}

    # The crash and the resume are one loop for every task (worker.train_loop_per_worker): SFT goes through them
    # (and MLflow across them); PRM and ORM train once without a crash, which checks what is theirs (loss, export).
    resumed = 8 if task == "sft" else 0
    if resumed:
        with pytest.raises(TrainingFailedError, match="crash_after_step=8"):
            T.build_trainer(cfg, rows, tiny_model, tiny_model, uri, run_id, meta, loop_extras=crash).fit()
        assert T.latest_checkpoint_step(cfg) == 8
        ckpt = Path(cfg.resolved_storage()) / cfg.resolved_run_name() / "checkpoint_step_000008"
        assert (ckpt / T.STATE_FILE).exists() and not (ckpt / "model").exists()

    total = T.plan_steps(len(rows), cfg)[1]
    # the same command again (the crash extra too: it only fires in a run that did not resume)
    result = T.build_trainer(cfg, rows, tiny_model, tiny_model, uri, run_id, meta,
                             loop_extras=crash if resumed else None).fit()
    assert result.metrics["resumed_from"] == resumed and result.metrics["step"] == total
    assert result.metrics["malloc_tuned"] == 1  # tune_malloc (default): the workers started with MALLOC_ENV
    assert result.metrics["bf16"] == (T.resolve_precision("auto", torch.device("cpu")) == "bf16")  # auto
    summary = T.export_model(result, out)
    assert summary["steps"] == total and summary["resumed_from"] == resumed
    history = json.loads((out / T.HISTORY_FILE).read_text())
    assert [h["step"] for h in history] == list(range(2, total + 1, 2))  # with a resume: up to 8 from the checkpoint
    first, last = _loss_fell(history)
    assert last < 0.8 * first, f"loss did not fall: first steps {first:.3f}, last steps {last:.3f}"
    assert (out / T.CURVE_FILE).stat().st_size > 1000

    if task == "sft":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out / "model")
        assert model.config.num_hidden_layers == 2
        import mlflow

        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert steps == list(range(2, 17, 2))  # one MLflow run across the crash and the resume
        assert {m.key for m in client.get_metric_history(run_id, "tokens_per_s")} == {"tokens_per_s"}
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"loss_curve.png", "model"} <= artifacts
        assert client.get_run(run_id).info.status == "FINISHED"
    else:
        from actors.prm_scorer import PRMScorer

        scorer = PRMScorer(str(out / "model"))
        assert scorer.kind == task and scorer.meta["prompt"]["few_shot"] is False
        ok = scorer.score_outcome(["Q\n"], ["1 + 1 = 2\nThe answer is 2."])[0]
        assert 0.0 <= ok <= 1.0


@pytest.mark.slow
def test_failure_config_retries_from_the_latest_checkpoint(tmp_path, ray_session, tiny_model):
    cfg, rows = _prepare("orm", tmp_path, tiny_model, max_failures=1, epochs=1, tune_malloc=False,
                         precision="bf16", freeze_layers=1)
    crash = {"_test_crash_after_step": 4}
    result = T.build_trainer(cfg, rows, tiny_model, tiny_model, loop_extras=crash).fit()  # fails at 4, retried, ends
    assert result.metrics["resumed_from"] == 4 and result.metrics["step"] == 6
    assert result.metrics["malloc_tuned"] == 0  # tune_malloc=False: glibc as it is
    assert result.metrics["bf16"] == 1  # precision=bf16 reached the worker loop (with a frozen block, resumed)
    assert T.export_model(result, Path(cfg.out))["resumed_from"] == 4


def test_lora_trains_adapters_only_and_saves_a_merged_model(tmp_path, tiny_model, tok):
    """The worker loop's model pieces without Ray (the loop itself is covered above): LoRA on the tiny model."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.reward_model import RewardModel

    cfg = cfg_for("sft", "x", tmp_path, base=tiny_model, lora={"enabled": True, "r": 4, "alpha": 8})
    torch.manual_seed(0)
    model = T.build_model("sft", tiny_model, cfg)
    trainable = T.trainable_state(model)
    assert trainable and all("lora_" in n for n in trainable)  # a checkpoint holds the adapters only
    ex = T.build_examples("sample", sample_rows(2), cfg)
    rows, _ = T.tokenize_examples("sft", ex.train, tok, cfg)
    batch = T.collate_batch("sft", {k: [r[k] for r in rows] for k in rows[0]}, tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        T.compute_loss("sft", model, batch).backward()
        opt.step()
        opt.zero_grad()
    T.save_final_model("sft", model, tok, tmp_path / "merged", torch.bfloat16)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not any("lora" in n for n in merged.state_dict())
    q_new = merged.model.layers[0].self_attn.q_proj.weight.float()
    assert not q_new.allclose(base.model.layers[0].self_attn.q_proj.weight.float())  # adapters merged in
    assert merged.model.embed_tokens.weight.float().allclose(base.model.embed_tokens.weight.float())  # frozen

    rm = T.build_model("prm", tiny_model, load_config(T.TrainConfig, base={"task": "prm", "lora": {"enabled": True}}))
    assert {n.split(".")[0] for n in T.trainable_state(rm)} == {"backbone", "head"}
    T.save_final_model("prm", rm, tok, tmp_path / "rm", torch.float32)
    assert RewardModel.load(tmp_path / "rm").kind == "prm"


@pytest.mark.parametrize("task", ["sft", "prm"])
def test_gradient_checkpointing_gives_the_same_gradients(task, tmp_path, tiny_model, tok):
    import torch

    grads = []
    for ckpt in (False, True):
        cfg = cfg_for(task, "x", tmp_path, base=tiny_model, gradient_checkpointing=ckpt)
        torch.manual_seed(0)
        model = T.build_model(task, tiny_model, cfg)
        model.train()
        assert (model if task == "sft" else model.backbone).is_gradient_checkpointing == ckpt
        rows_in = sample_rows(1) if task == "sft" else step_label_rows(2)
        ex = T.build_examples("sample" if task == "sft" else "step_label", rows_in, cfg)
        rows, _ = T.tokenize_examples(task, ex.train, tok, cfg)
        batch = T.collate_batch(task, {k: [r[k] for r in rows] for k in rows[0]}, tok.pad_token_id)
        loss = T.compute_loss(task, model, batch)
        loss.backward()
        grads.append((loss.item(), next(p.grad for n, p in model.named_parameters() if "layers.0." in n)))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)


@pytest.mark.parametrize("task", ["sft", "prm"])
def test_freeze_layers_trains_only_the_upper_blocks(task, tmp_path, tiny_model, tok):
    """freeze_layers=1 of the tiny model's 2 blocks: the embeddings and block 0 get no gradient, block 1 (and the
    reward head) do; the optimizer sees only what trains; freezing every block is refused."""
    cfg = cfg_for(task, "x", tmp_path, base=tiny_model, freeze_layers=1)
    model = T.build_model(task, tiny_model, cfg)
    rows_in = sample_rows(1) if task == "sft" else step_label_rows(2)
    ex = T.build_examples("sample" if task == "sft" else "step_label", rows_in, cfg)
    rows, _ = T.tokenize_examples(task, ex.train, tok, cfg)
    T.compute_loss(task, model, T.collate_batch(task, {k: [r[k] for r in rows] for k in rows[0]},
                                                tok.pad_token_id)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    frozen = [n for n in grads if "embed_tokens" in n or "layers.0." in n]
    trained = [n for n in grads if "layers.1." in n or n.startswith("head.")]
    assert frozen and trained
    assert all(grads[n] is None for n in frozen)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in trained)
    assert sum(len(g["params"]) for g in T.param_groups(model, cfg)) == len(grads) - len(frozen)
    with pytest.raises(ValueError, match="would freeze all 2 blocks"):
        T.build_model(task, tiny_model, cfg_for(task, "x", tmp_path, base=tiny_model, freeze_layers=2))


def test_bf16_autocast_loss_is_close_to_fp32_and_precision_resolves(tmp_path, tiny_model, tok):
    """The same PRM batch under bf16 autocast gives the fp32 loss to bf16 rounding, with fp32 gradients; `auto`
    follows the CPU's native bf16 flag; explicit precisions pass through; a bad one is refused by name."""
    import torch

    cfg = cfg_for("prm", "x", tmp_path, base=tiny_model)
    torch.manual_seed(0)
    model = T.build_model("prm", tiny_model, cfg)
    ex = T.build_examples("step_label", step_label_rows(4), cfg)
    rows, _ = T.tokenize_examples("prm", ex.train, tok, cfg)
    batch = T.collate_batch("prm", {k: [r[k] for r in rows] for k in rows[0]}, tok.pad_token_id)
    losses = []
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = T.compute_loss("prm", model, batch)
        loss.backward()
        assert loss.dtype == torch.float32 and model.head.weight.grad.dtype == torch.float32
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    cpu = torch.device("cpu")
    native = any(f in Path("/proc/cpuinfo").read_text() for f in ("avx512_bf16", "amx_bf16"))
    assert T.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert T.resolve_precision("fp32", cpu) == "fp32" and T.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        cfg_for("prm", "x", tmp_path, base=tiny_model, precision="fp16")


def test_param_groups_give_the_reward_head_its_own_rate(tmp_path, tiny_model):
    """The fresh scalar head trains at head_lr, the pretrained body at lr; SFT and head_lr=0 keep one group."""
    import torch

    rm = T.build_model("prm", tiny_model, cfg_for("prm", "x", tmp_path, base=tiny_model))
    cfg = cfg_for("prm", "x", tmp_path, base=tiny_model, lr=1e-5, head_lr=1e-3)
    body, head = T.param_groups(rm, cfg)
    assert head["lr"] == 1e-3 and {id(p) for p in head["params"]} == {id(rm.head.weight), id(rm.head.bias)}
    assert body["lr"] == 1e-5 and len(body["params"]) == len(list(rm.parameters())) - 2
    one = T.param_groups(rm, cfg_for("prm", "x", tmp_path, base=tiny_model, head_lr=0.0))
    assert len(one) == 1 and len(one[0]["params"]) == len(list(rm.parameters()))
    lm = T.build_model("sft", tiny_model, cfg_for("sft", "x", tmp_path, base=tiny_model))
    assert len(T.param_groups(lm, cfg_for("sft", "x", tmp_path, base=tiny_model, head_lr=1e-3))) == 1
    # the schedule scales both groups: after warmup step 0 of 2, each group sits at half its peak
    opt = torch.optim.AdamW(T.param_groups(rm, cfg_for("prm", "x", tmp_path, base=tiny_model, lr=1e-5,
                                                       head_lr=1e-3)))
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: T.lr_factor(s, 2, 10, "constant"))  # applies step 0's factor
    assert [round(g["lr"], 12) for g in opt.param_groups] == [0.5e-5, 0.5e-3]
    with pytest.raises(ValueError, match="head_lr"):
        cfg_for("prm", "x", tmp_path, base=tiny_model, head_lr=-1.0)


@pytest.mark.slow
def test_vstar_verifier_trains_with_dpo_and_scores_in_the_evaluation(tmp_path, ray_session, tiny_model):
    """V-STaR end to end on the tiny model: `stepray train dpo` (Ray Train, 1 worker) on verified-over-failed pairs
    starting from the generator, its held-out pair evaluation, the LikelihoodRatioScorer (at the start the policy is
    the reference, so every log-ratio is 0; after training the verified solutions of the training pairs must rank
    above the failed ones). `stepray evaluate --vstar` runs in test_evaluate's end-to-end test."""
    from actors.vstar_scorer import LikelihoodRatioScorer
    from jobs.train_model import run

    data = write(sample_rows(12), "sample", tmp_path / "samples.parquet")
    cfg = cfg_for("dpo", data, tmp_path / "vstar", base=tiny_model, lr=1e-3, batch_size=2, epochs=1, num_workers=1,
                  cpus_per_worker=1, checkpoint_every=100, log_every=1, mlflow=False, beta=0.5,
                  eval={"holdout_fraction": 0.25})
    examples = T.read_examples(cfg)
    assert examples.holdout and examples.train
    assert run(cfg) == 0
    summary = json.loads((tmp_path / "vstar" / "summary.json").read_text())
    assert summary["task"] == "dpo" and summary["train"]["steps"] > 0
    assert summary["train"]["first_loss"] == pytest.approx(math.log(2), abs=1e-3)  # step 1: policy == reference
    assert 0.0 <= summary["eval"]["pair_accuracy"] <= 1.0 and summary["eval"]["pairs"] == len(examples.holdout)
    model = tmp_path / "vstar" / "model"
    meta = json.loads((model / "verifier.json").read_text())
    assert meta["kind"] == "vstar" and meta["beta"] == 0.5 and meta["reference"] == tiny_model

    scorer = LikelihoodRatioScorer(str(model), dtype="float32")
    pairs = examples.train
    chosen = scorer.log_ratio([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = scorer.log_ratio([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    margins = [c - r for c, r in zip(chosen, rejected)]
    assert sum(margins) / len(margins) > 0 and sum(m > 0 for m in margins) > len(margins) / 2
    assert all(0 < s < 1 for s in scorer.score_outcome([pairs[0]["prompt"]], [pairs[0]["chosen"]]))



def _genrm_run(tmp_path: Path, n_problems: int) -> str:
    """A generate run folder of sample_rows(n) with its problems.parquet (GenRM reads the questions there)."""
    from pipelines import runs

    run = tmp_path / "gen"
    (run / "samples").mkdir(parents=True)
    write(sample_rows(n_problems), "sample", run / "samples" / "part-0.parquet")
    runs.write_problems([{"id": f"p{p}", "question": f"What is {3 + p} + {4 + p}?", "answer": str(7 + 2 * p),
                          "kind": "numeric", "source": "synthetic"} for p in range(n_problems)], run)
    return str(run)


def test_genrm_examples_balance_verdicts_and_weigh_rows_not_tokens(tmp_path, tok):
    """Per problem at most k verified and k failed distinct samples become "Yes"/"No" verification rows, each verified
    one also a solution row of weight lambda; after tokenizing, a row's weight is spread over its target tokens, so
    the token-mean SFT loss gives every verification row the same weight as a (lambda = 1) solution row."""
    data = _genrm_run(tmp_path, 3)
    cfg = cfg_for("genrm", data, tmp_path / "out", genrm_per_problem=1, genrm_lambda=0.5)
    ex = T.read_examples(cfg)
    verify = [e for e in ex.train if "verdict" in e]
    assert sorted((e["problem_id"], e["verdict"]) for e in verify) == [(f"p{p}", v) for p in range(3)
                                                                        for v in ("No", "Yes")]
    assert all(e["question"].startswith("What is") for e in verify)
    sft = [e for e in ex.train if "completion" in e]
    assert len(sft) == 3 and all(e["weight"] == 0.5 for e in sft)
    assert ex.dropped["over_k"] == 3 * 1  # per problem: 2 distinct verified (after dedup), k = 1
    rows, rejects = T.tokenize_examples("genrm", ex.train, tok, cfg)
    assert not rejects and len(rows) == 9
    for r, e in zip(rows, ex.train):
        n_target = len(r["input_ids"]) - r["n_prompt"]
        assert r["weight"] * n_target == pytest.approx(e["weight"])
    assert tok.decode(rows[0]["input_ids"][rows[0]["n_prompt"]:]).startswith(("Yes", "No"))
    with pytest.raises(Exception, match="question"):  # no run around the samples: no questions
        T.read_examples(cfg_for("genrm", write(sample_rows(2), "sample", tmp_path / "lone.parquet"), tmp_path / "o"))


@pytest.mark.slow
def test_genrm_verifier_trains_on_ray_train_and_scores_p_yes(tmp_path, ray_session, tiny_model):
    """GenRM end to end on the tiny model: `stepray train genrm` (Ray Train, 1 worker), its held-out AUC, and the
    GenerativeVerifierScorer: after training, p(Yes) of every verified training solution must exceed that of every
    failed one. `stepray evaluate --genrm` runs in test_evaluate's end-to-end test."""
    from actors.genrm_scorer import GenerativeVerifierScorer
    from jobs.train_model import run
    from pipelines import inputs

    data = _genrm_run(tmp_path, 12)
    cfg = cfg_for("genrm", data, tmp_path / "genrm", base=tiny_model, lr=1e-3, batch_size=4, epochs=2,
                  num_workers=1, cpus_per_worker=1, checkpoint_every=100, log_every=1, mlflow=False,
                  eval={"holdout_fraction": 0.25})
    examples = T.read_examples(cfg)
    assert run(cfg) == 0
    summary = json.loads((tmp_path / "genrm" / "summary.json").read_text())
    assert summary["task"] == "genrm" and summary["train"]["final_loss"] < summary["train"]["first_loss"]
    assert 0.0 <= summary["eval"]["auc"] <= 1.0
    model = tmp_path / "genrm" / "model"
    assert inputs.reward_model_folder(model, "--genrm", "genrm")["kind"] == "genrm"
    scorer = GenerativeVerifierScorer(str(model), dtype="float32")
    verify = [e for e in examples.train if "verdict" in e]
    p = scorer.score_outcome([e["question"] for e in verify], [e["solution"] for e in verify])
    yes = [s for s, e in zip(p, verify) if e["verdict"] == "Yes"]
    no = [s for s, e in zip(p, verify) if e["verdict"] == "No"]
    assert all(0 < s < 1 for s in p)
    assert min(yes) > max(no)  # the training verdicts are separated (the prior leans Yes: 2 verified to 1 failed)


def test_genrm_cot_rationales_recheck_the_steps_and_end_on_the_verdict(tmp_path, tok):
    """GenRM-CoT's rationale: each step's arithmetic rechecked, judged by the step checks on a synthetic problem
    (an operand the problem lacks is wrong even when the arithmetic holds) and by the claims elsewhere, stopping at
    the first wrong step, then the final answer and "Verdict:"; the training target is the rationale and the
    verdict, and the verification prompt asks for both."""
    from pipelines.train.data import GENRM_QUESTION_COT, GENRM_VERDICT, genrm_prompt, genrm_rationale

    prob = {"id": "a", "question": "Q", "answer": "14", "kind": "numeric", "source": "synthetic",
            "quantities": [3.0, 4.0, 2.0]}
    good = dict(sample("a", 0, "3 + 4 = 7\n7 x 2 = 14\nThe answer is 14.", True), answer="14")
    assert genrm_rationale(prob, good) == ("Step 1: 3 + 4 = 7 holds, right.\nStep 2: 7 * 2 = 14 holds, right.\n"
                                           "Step 3: right.\nThe final answer is 14.\n" + GENRM_VERDICT)
    unknown = dict(sample("a", 1, "3 + 5 = 8\n8 x 2 = 16\nThe answer is 16.", False), answer="16")
    assert genrm_rationale(prob, unknown) == ("Step 1: 3 + 5 = 8 holds, wrong.\nThe final answer is 16.\n"
                                              + GENRM_VERDICT)  # 5 is not in the problem
    loose = dict(sample("b", 0, "2 + 2 = 5\nThe answer is 5.", False), answer="5")
    assert genrm_rationale({"question": "Q"}, loose).startswith("Step 1: 2 + 2 = 5 is false, wrong.\n")
    assert genrm_rationale({}, sample("c", 0, "I think so", False)) == (
        "Step 1: right.\nThe solution gives no final answer.\n" + GENRM_VERDICT)

    data = _genrm_run(tmp_path, 2)
    cfg = cfg_for("genrm", data, tmp_path / "out", genrm_per_problem=1, genrm_lambda=0.0, genrm_cot=True)
    ex = T.read_examples(cfg)
    assert len(ex.train) == 4 and all(e["rationale"].endswith(GENRM_VERDICT) for e in ex.train)
    no = next(e for e in ex.train if e["verdict"] == "No")
    assert "is false, wrong" in no["rationale"]  # sample_rows' failed solution: a + b = a + b + 1
    rows, rejects = T.tokenize_examples("genrm", ex.train, tok, cfg)
    assert not rejects and len(rows) == 2 * len(ex.train)  # per example: the chain, and the verdict after it
    for chain, verdict, e in zip(rows[::2], rows[1::2], ex.train):
        target = tok.decode(chain["input_ids"][chain["n_prompt"]:])
        assert target.startswith("Step 1:") and f"{GENRM_VERDICT} {e['verdict']}" in target
        assert GENRM_QUESTION_COT in tok.decode(chain["input_ids"][:chain["n_prompt"]])
        assert tok.decode(verdict["input_ids"][:verdict["n_prompt"]]).endswith(GENRM_VERDICT)
        assert tok.decode(verdict["input_ids"][verdict["n_prompt"]:]).strip().startswith(e["verdict"])
        for r in (chain, verdict):  # half the example's weight each, spread over the row's target tokens
            assert r["weight"] * (len(r["input_ids"]) - r["n_prompt"]) == pytest.approx(0.5)
    short = cfg_for("genrm", data, tmp_path / "short", genrm_per_problem=1, genrm_lambda=0.0, genrm_cot=True,
                    max_len=len(rows[1]["input_ids"]) - 1)  # the verdict row would lose its verdict: set aside
    _, rejects = T.tokenize_examples("genrm", ex.train[:1], tok, short)
    assert [r["row"] for r in rejects] == [ex.train[0]["sample_id"]]
    assert genrm_prompt(tok, "Q", "S", cot=True) != genrm_prompt(tok, "Q", "S")


@pytest.mark.slow
def test_genrm_cot_trains_on_ray_train_and_scores_by_sampled_rationales_on_vllm(tmp_path, ray_session, tiny_model):
    """GenRM-CoT end to end on the tiny model: Ray Train on rationale + verdict targets, the verifier folder says
    cot, and the scorer runs the real vLLM engine: it samples `votes` rationales per solution, each stopped at the
    verdict, and averages p(Yes) after them; after its training rationales the verifier says Yes to the verified
    solutions and No to the failed ones; a solution too long for the engine scores NaN. (The tiny model learns the
    verdict in 48 steps, not yet the rationale's form: its sampled rationales are not asserted on.)"""
    from actors.genrm_scorer import GenerativeVerifierScorer
    from jobs.train_model import run
    from pipelines.train.data import GENRM_VERDICT

    data = _genrm_run(tmp_path, 10)
    cfg = cfg_for("genrm", data, tmp_path / "cot", base=tiny_model, lr=2e-3, batch_size=4, epochs=4,
                  genrm_cot=True, genrm_lambda=0.0, num_workers=1, cpus_per_worker=1, checkpoint_every=100,
                  log_every=1, mlflow=False, eval={"holdout_fraction": 0.2, "engine": {"num_cpus": 1}})
    examples = T.read_examples(cfg)
    assert len({e["problem_id"] for e in examples.train}) == 8
    assert run(cfg) == 0
    model = tmp_path / "cot" / "model"
    assert json.loads((model / "verifier.json").read_text())["cot"] is True
    held = json.loads((tmp_path / "cot" / "summary.json").read_text())["eval"]  # scored by a scorer actor
    assert held["rows"] == 6 and 0.0 <= held["auc"] <= 1.0
    scorer = GenerativeVerifierScorer(str(model), votes=3, max_len=512, temperature=0.5,
                                      engine={"gpu_memory_utilization": 0.05}, threads=1)
    assert scorer.ready()["cot"] and scorer.ready()["votes"] == 3
    verify = [e for e in examples.train if "verdict" in e]
    prompts = [T.genrm_prompt(scorer.tokenizer, e["question"], e["solution"], cot=True) for e in verify]
    chains = scorer.engine.generate(prompts[:4], scorer.sampling)
    assert all(len(cs) == 3 for cs in chains)
    assert not any(GENRM_VERDICT in c["text"] for cs in chains for c in cs)  # sampling stops at the verdict
    p = scorer.score_outcome([e["question"] for e in verify] + ["Q"], [e["solution"] for e in verify] + ["7 " * 600])
    assert math.isnan(p[-1]) and all(0 < x < 1 for x in p[:-1])
    # the verdict follows the rationale: after the training rationales, Yes for verified and No for failed
    after = scorer.verdict_p_yes(prompts, [e["rationale"] for e in verify])
    yes = [x for x, e in zip(after, verify) if e["verdict"] == "Yes"]
    no = [x for x, e in zip(after, verify) if e["verdict"] == "No"]
    assert min(yes) > 0.5 > max(no), (yes, no)


def test_stream_of_search_rows_backtrack_at_the_first_wrong_step_and_end_on_a_verified_solution():
    """One row per solved problem: failed attempts cut after their first wrong step (the step checks of a synthetic
    problem: 3 + 4 = 7, then x 2 = 14) with a backtrack line, then the verified solution; without step checks a
    failed attempt is kept whole and marked a dead end; a problem with no verified sample gives no row."""
    from pipelines.train.data import BACKTRACK, DEAD_END, stream_of_search

    prob = {"id": "a", "question": "Q", "answer": "14", "kind": "numeric", "source": "synthetic",
            "quantities": [3.0, 4.0, 2.0], "ref_steps": ["3 + 4 = 7", "7 x 2 = 14"], "ref_values": [7.0, 14.0]}
    good = "3 + 4 = 7\n7 x 2 = 14\nThe answer is 14."
    rows = [sample("a", 0, good, True), sample("a", 1, "3 + 4 = 8\n8 x 2 = 16\nThe answer is 16.", False),
            sample("b", 0, "1 + 1 = 2\nThe answer is 2.", True), sample("b", 1, "1 + 1 = 3\nThe answer is 3.", False),
            sample("c", 0, "no", False)]
    for r in rows:
        r["steps"] = r["completion"].split("\n")
    out, why = stream_of_search(rows, {"a": prob}, k=2)
    by = {r["problem_id"]: r["completion"] for r in out}
    assert by["a"] == f"3 + 4 = 8\n{BACKTRACK}\n{good}"  # cut after the wrong first step
    assert by["b"] == f"1 + 1 = 3\nThe answer is 3.\n{DEAD_END}\n1 + 1 = 2\nThe answer is 2."  # no checks for b
    assert why == {"problem_without_verified": 1}
    from pipelines.verify import extract_answer

    assert extract_answer(by["a"]).answer == "14"  # the row's answer is the verified solution's


def _mean_logprob(model_path: str, prompts: list[str], targets: list[str]) -> float:
    """Mean token log-probability of each target after its prompt, averaged over the rows (transformers, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.losses import token_logps

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    means = []
    with torch.inference_mode():
        for p, t in zip(prompts, targets):
            ids = torch.tensor([tok.encode(p + t, add_special_tokens=False)])
            mask = torch.zeros_like(ids)
            mask[0, len(tok.encode(p, add_special_tokens=False)):] = 1  # the target's tokens
            means.append((token_logps(model(ids).logits, ids, mask).sum() / mask.sum()).item())
    return sum(means) / len(means)


@pytest.mark.slow
def test_reviser_and_stream_of_search_train_through_ray_train_and_the_model_runs_revise(tmp_path, ray_session,
                                                                                       tiny_model):
    """Learning to correct and stream of search end to end on the tiny model: SFT (Ray Train, 1 worker) on a
    generate run's samples with select.corrections and select.stream_of_search; both kinds of rows are in the
    training data, the model learns them (the verified solution after a failed attempt and the revise cue, and the
    linearised search, are likelier than under the base model), and the trained model runs the `revise` strategy
    on the real vLLM engine: each attempt after the first is generated from the previous attempt and the cue."""
    import ray

    from actors.vllm_generator import VLLMGenerator
    from jobs.train_model import run
    from pipelines.search import SearchConfig, SearchProblem, engine_generate, search_revise
    from pipelines.search_ledger import REVISE_CUE
    from pipelines.train.data import DEAD_END

    data = _genrm_run(tmp_path, 8)
    cfg = cfg_for("sft", data, tmp_path / "reviser", base=tiny_model, lr=2e-3, batch_size=8, epochs=3,
                  num_workers=1, cpus_per_worker=1, checkpoint_every=100, log_every=1, mlflow=False,
                  select={"k": 1, "corrections": 1, "stream_of_search": 1})
    train = T.read_examples(cfg).train
    fixes = [e for e in train if e["prompt"].endswith(f"\n{REVISE_CUE}\n")]
    searches = [e for e in train if DEAD_END in e["completion"]]
    assert len(fixes) == 8 and len(searches) == 8  # one of each per problem (each has a failed and a verified)
    assert run(cfg) == 0
    summary = json.loads((tmp_path / "reviser" / "summary.json").read_text())
    assert summary["train"]["final_loss"] < summary["train"]["first_loss"]
    model = str(tmp_path / "reviser" / "model")
    for rows in (fixes, searches):
        prompts, targets = [e["prompt"] for e in rows], [e["completion"] for e in rows]
        assert _mean_logprob(model, prompts, targets) > _mean_logprob(tiny_model, prompts, targets) + 1.0

    engine = ray.remote(num_cpus=1)(VLLMGenerator).remote(model, {"max_model_len": 512,
                                                                  "gpu_memory_utilization": 0.05}, {}, 1, "reviser")
    try:
        seen = []

        class Recorder:  # the engine actor, with each call's prompts kept
            def generate(self, prompts, sampling):
                seen.append(list(prompts))
                return ray.get(engine.generate.remote(prompts, sampling))

        scfg = SearchConfig(max_tokens=16, temperature=0.7, seed=0)
        plain = next(e for e in train if e not in fixes and e not in searches)  # a generator prompt
        problem = SearchProblem(plain["prompt"], "What is 3 + 4?", "numeric")
        never_satisfied = lambda ps, steps: [[0.0] * len(s) for s in steps]  # noqa: E731
        result = search_revise(problem, engine_generate(Recorder(), scfg), never_satisfied, 3, scfg)
    finally:
        ray.kill(engine)
    assert result.tokens_generated > 0 and len(seen) == 3
    assert seen[0] == [problem.prompt]
    assert all(p[0].startswith(problem.prompt) and p[0].endswith(f"\n{REVISE_CUE}\n") for p in seen[1:])

"""The self-improvement loop on the tiny model (two STaR rounds, the second by expert iteration), killed in the
middle of a stage and run again: the second run skips what was done, resumes the killed stage, and ends with exactly
the outputs one uninterrupted run has (every sample, label and record once, ids as the config defines them), with
lineage, per-stage config files, summary and plot.

One loop run (killed + resumed) instead of a reference run beside it: the outputs' ids follow from the config alone
(problems x samples, the annotation limit, eval problems x strategies x budgets), so they are checked against that."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "cpu" / "iterate_tiny.yaml"


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.iterate", "--config", str(CONFIG), "--out", str(out)]


def _env(tmp: Path) -> dict:
    return dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", PYTHONUNBUFFERED="1")


def _expected_ids() -> dict:
    from pipelines import config as C
    from pipelines.iterate import IterateConfig
    from pipelines.problems import load_problems

    cfg = C.load_config(IterateConfig, CONFIG)
    train = [p["id"] for p in load_problems("synthetic", synthetic=cfg.train_problems).problems]
    held = [p["id"] for p in load_problems("synthetic", synthetic=cfg.eval_problems).problems]
    n = cfg.generate.sampling.n
    pairs = [("greedy", 1)] + [(s, b) for s in cfg.evaluate.strategies if s != "greedy" for b in cfg.evaluate.budgets]
    return {"samples": sorted(f"{pid}/s{i}" for pid in train for i in range(n)),
            "labels": cfg.annotate_limit,
            "records": sorted((pid, s, b) for pid in held for s, b in pairs)}


def test_two_star_rounds_killed_mid_stage_resume_to_the_outputs_of_one_run(tmp_path):
    """Two STaR rounds on the tiny model with SFT on, killed inside round 0's generation and run again; round 1 finds
    its training data by expert iteration (a PRM-guided beam search over the training problems with round 0's PRM,
    recording its trees for stream of search) instead of sampling.

    The second run skips what was done, resumes the killed stage, and ends with exactly the outputs one
    uninterrupted run has. STaR: the random model solves nothing, so every problem is rationalized by its reference
    solution (graded, not assumed), SFT trains on those rows, round 1 samples with round 0's generator and refits
    from the base model. (One test for both: each loop stage is a process that starts Ray and an engine, so a
    second loop run would cost minutes of the suite.)"""
    out = tmp_path / "run"
    over = ["rounds=2", "round_mode=star", "rationalize=reference", "annotate.labels=step_check",
            "sampling=search:beam", "search_budget=2", "sft.select.stream_of_search=2"]
    proc = subprocess.Popen(_cmd(out) + over, cwd=REPO, env=_env(tmp_path), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    deadline = time.time() + 600
    killed_in = None
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists():
            stages = json.loads(manifest.read_text())["stages"]
            if stages.get("round_0/generate", {}).get("status") == "running":
                time.sleep(8)  # inside the stage: engine starting or samples under way
                killed_in = "round_0/generate"
                os.killpg(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.5)
    proc.wait(timeout=60)
    assert killed_in, "the loop finished or stalled before the generate stage could be interrupted"
    stages = json.loads(manifest.read_text())["stages"]
    assert stages[killed_in]["status"] == "running" and "round_0/annotate" not in stages
    time.sleep(5)  # let the killed stage's Ray processes notice their driver is gone
    r = subprocess.run(_cmd(out) + over, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{killed_in}: resuming" in r.stdout

    m = json.loads(manifest.read_text())
    st = m["stages"]
    assert st[killed_in]["attempts"] == 2 and st["round_0/annotate"]["attempts"] == 1
    for rnd, find in ((0, "generate"), (1, "search")):  # round 0 has no PRM yet to search with: it samples
        assert all(st[f"round_{rnd}/{k}"]["status"] == "done"
                   for k in (find, "rationalize", "annotate", "train_prm", "train_sft", "evaluate"))
    assert "round_1/generate" not in st
    lin = st["round_0/evaluate"]["lineage"]
    assert lin["prm"].endswith("round_0/prm/model")
    assert "verify" in lin["verifier"] and lin["problems"].startswith("synthetic")
    assert m["mlflow_run_id"]
    assert (out / "summary.md").read_text().count("|") > 10
    # each round's row counts the tokens it generated to find its data: round 0 sampled, round 1 searched
    rounds = json.loads((out / "summary.json").read_text())["rounds"]
    assert [r["model"] for r in rounds] == ["round 1", "round 2"] and all(r["train_tokens"] > 0 for r in rounds)
    assert (out / "accuracy_by_round.png").stat().st_size > 1000

    # each stage ran with the config file the loop wrote: the section of iterate_tiny.yaml plus the wiring
    ann = yaml.safe_load((out / "round_0" / "configs" / "annotate.yaml").read_text())
    assert ann["rollouts"] == 2 and ann["limit"] == 4
    assert ann["samples"] == str(out / "round_0" / "generate" / "samples")
    ev = yaml.safe_load((out / "round_0" / "configs" / "evaluate.yaml").read_text())
    assert ev["prm"] == str(out / "round_0" / "prm" / "model") and ev["strategies"] == ["greedy", "majority"]
    # generation recorded its problems; annotation passed them on (the PRM's ground truth)
    assert pq.read_table(out / "round_0" / "generate" / "problems.parquet").num_rows == 4

    samples = pq.read_table(out / "round_0" / "generate" / "samples").column("sample_id").to_pylist()
    label_rows = pq.read_table(out / "round_0" / "annotate" / "labels").to_pylist()
    assert {x["method"] for x in label_rows} == {"step_check"}  # free labels: the stage started no engine
    labels = [x["sample_id"] for x in label_rows]
    records = pq.read_table(out / "round_0" / "eval" / "records.parquet").to_pylist()
    want = _expected_ids()
    assert sorted(samples) == want["samples"]  # every sample exactly once: nothing lost or duplicated by the kill
    assert len(labels) == len(set(labels)) == want["labels"] and set(labels) <= set(samples)
    assert sorted((r["problem_id"], r["strategy"], r["budget"]) for r in records) == want["records"]
    assert {"reward_model.json", "config.json"} <= {p.name for p in (out / "round_0" / "prm" / "model").iterdir()}

    # STaR: references rationalize every unsolved problem, SFT fits them from the base model each round
    base = st["round_0/generate"]["lineage"]["generator"]
    assert "tiny-llama" in base
    for rnd in (0, 1):
        assert st[f"round_{rnd}/rationalize"]["outputs"]["verified"] == 4  # all 4 training problems, all verified
        sft = st[f"round_{rnd}/train_sft"]
        assert sft["lineage"]["verified_samples"] == 4
        assert sft["lineage"]["init"] == base  # STaR refits from the base model every round
        ref = pq.read_table(out / f"round_{rnd}" / "rationalize" / "samples").to_pylist()
        assert {x["mode"] for x in ref} == {"reference"} and all(x["correct"] for x in ref)
        assert all("Hint" not in x["prompt"] and x["completion"].endswith(f"The answer is {x['gold']}.")
                   for x in ref)
        summary = json.loads((out / f"round_{rnd}" / "sft" / "summary.json").read_text())
        assert summary["train_rows"] >= 4  # the references (the random model's own samples are never verified)
    # expert iteration: round 1 searches with round 0's generator and PRM; each search's trace, with its tree,
    # becomes one Sample row of the round (the random model verifies none, so no stream of search is written)
    search = st["round_1/search"]["lineage"]
    assert search["generator"] == str(out / "round_0" / "sft" / "model")
    assert search["prm"] == str(out / "round_0" / "prm" / "model")
    traces = [json.loads(x) for x in (out / "round_1" / "search" / "traces.jsonl").read_text().splitlines()]
    assert sorted(t["problem_id"] for t in traces) == sorted({s.split("/")[0] for s in want["samples"]})
    for t in traces:
        tree, node = t["meta"]["tree"], t["meta"]["chosen_node"]
        assert t["strategy"] == "beam" and tree and tree[node]["terminal"]
        assert len(tree) == t["sequences"]  # one node per sequence the engine returned
    searched = pq.read_table(out / "round_1" / "generate" / "samples").to_pylist()
    assert sorted(x["problem_id"] for x in searched) == sorted(t["problem_id"] for t in traces)
    assert {x["mode"] for x in searched} == {"beam"} and not any(x["correct"] for x in searched)
    assert not (out / "round_1" / "generate" / "streams").exists()
    ann1 = yaml.safe_load((out / "round_1" / "configs" / "annotate.yaml").read_text())
    assert ann1["modes"] == ["beam"]  # the searched rows are labelled (their mode is the strategy)
    labelled = pq.read_table(out / "round_1" / "annotate" / "labels").column("sample_id").to_pylist()
    assert sorted(labelled) == sorted(x["sample_id"] for x in searched)
    # round 1 is evaluated with its own trained generator
    assert st["round_1/evaluate"]["lineage"]["generator"] == str(out / "round_1" / "sft" / "model")
    rounds = json.loads((out / "summary.json").read_text())["rounds"]
    assert [x["model"] for x in rounds] == ["round 1", "round 2"]


def test_bad_stage_override_fails_before_any_work(tmp_path):
    r = subprocess.run(_cmd(tmp_path / "x") + ["annotate=[rolouts=3]"], cwd=REPO, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unknown config key annotate.rolouts" in r.stderr
    assert not (tmp_path / "x" / "manifest.json").exists()
    r = subprocess.run(_cmd(tmp_path / "y") + ["--redo", "round_0/sft"], cwd=REPO, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--redo round_0/sft" in r.stderr and "train_sft" in r.stderr

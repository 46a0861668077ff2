"""`stepray bench` calls each benchmark module with its own arguments: every module must accept them (a mismatch
only showed at the end of a 40-minute run), and the table must read the keys the modules write."""

import argparse
import importlib
import math

import pytest

from benchmarks import report as B


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("name", list(B.BENCHMARKS))
@pytest.mark.parametrize("size", ["full", "quick"])
def test_every_module_accepts_the_arguments_bench_gives_it(name, size, monkeypatch, tmp_path):
    module, full, quick = B.BENCHMARKS[name]
    args = list(full if size == "full" else quick) + ([] if name == "verify" else ["--json", str(tmp_path / "x")])
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        raise _Parsed(real(self, argv, namespace))  # parsing passed: stop before any work starts

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed) as got:
        importlib.import_module(module).main(args)
    ns = got.value.args[0]
    if name != "verify":
        assert ns.json == str(tmp_path / "x")


def _variant(name, reduction, agreement):
    return {"variant": name, "tokens_per_step": 10.0, "token_reduction_vs_naive": reduction,
            "step_agreement": agreement, "wall_s": 1.0}


def test_annotation_summary_picks_the_best_variant_that_keeps_agreement():
    res = {"part1": [{"variant": "naive", "tokens_per_step": 40.0, "wall_s": 9.0},
                     _variant("binary", 3.0, 0.93), _variant("binary+reuse", 4.5, 0.88),
                     _variant("binary+reuse+early_stop", 4.1, 0.91),
                     _variant("naive (repeat)", 5.0, 0.95)],  # the noise floor, never a candidate
           "part2": [{"variant": "naive, prefix caching on", "wall_s": 11.8},
                     {"variant": "naive, prefix caching off", "wall_s": 12.5}]}
    measured, goal, detail = B.summary_line("annotation", res)
    assert measured.startswith("4.10x") and "0.910" in measured and "binary+reuse+early_stop" in measured
    assert "binary+reuse 4.50x at 0.880" in detail and "prefix caching off 12.5s" in detail
    assert "naive vs itself 0.950 (noise floor)" in detail and "naive (repeat) 5.00x" not in detail
    assert "reproducible" not in detail  # older JSON without the repeat statistics
    res["part1"][2]["vs_repeat"] = {"on_reproducible": 0.931, "on_reproducible_ci": [0.9, 0.95]}
    assert "on naive's reproducible steps: binary+reuse 0.931 [0.900, 0.950]" in B.summary_line("annotation", res)[2]
    res["part1"] = res["part1"][:1] + [_variant("binary", 3.0, 0.85), _variant("binary+reuse", 4.5, 0.80)]
    assert B.summary_line("annotation", res)[0].startswith("3.00x")  # none keeps 0.90: the closest in agreement
    res["part1"].insert(1, _variant("naive+reuse", 1.05, 0.89))  # the second reference is listed, never chosen
    measured, _, detail = B.summary_line("annotation", res)
    assert measured.startswith("3.00x") and "naive+reuse 1.05x at 0.890" in detail


def test_training_summary_reads_each_layout():
    res = {"plain": {"tokens_per_s": 200.0},
           "ray_train": {"2 workers x 1 thread (DDP)": {"tokens_per_s": 170.0, "ratio": 0.85},
                         "1 worker x 2 threads": {"tokens_per_s": 190.0, "ratio": 0.95}}}
    measured, _, detail = B.summary_line("training", res)
    assert measured == "0.95x plain" and "2 workers x 1 thread (DDP) 0.85x" in detail
    assert not math.isnan(float(measured.split("x")[0]))
    assert "differ" not in detail  # one plain run (older JSON): no spread to show
    res["plain"].update(runs=[190.0, 210.0], spread=0.1)
    assert B.summary_line("training", res)[2].endswith("plain runs before/after differ by 10%")


def _report(labels, truth=None, k=16):
    rows = [{"variant": n, "tokens": 100 * (4 if n.startswith("naive") else 1),
             "labelled_steps": sum(map(len, lab.values())), "tokens_per_step": 0.0} for n, lab in labels.items()]
    for r in rows:
        r["tokens_per_step"] = r["tokens"] / r["labelled_steps"]
    return {"args": {"rollouts": k}, "part1_samples": {"steps": sum(map(len, labels["naive"].values()))},
            "part1": rows, "part1_labels": labels, **({"part1_truth": truth} if truth else {})}


def test_annotation_pool_reads_earlier_reports(tmp_path, capsys):
    import json

    from benchmarks import annotation_methods as A

    one = {"naive": {"a": [1, 0]}, "naive (repeat)": {"a": [1, 1]}, "scan+reuse": {"a": [1, 1]}}
    two = {"naive": {"a": [0, 0]}, "naive (repeat)": {"a": [0, 0]}, "scan+reuse": {"a": [1, 0]}}
    paths = []
    for i, (labels, truth) in enumerate([(one, {"a": [True, True]}), (two, {"a": [False, False]}),
                                         ({"naive": {"a": [1]}, "scan+reuse": {"a": [1]}}, None)]):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(_report(labels, truth)))
    assert A.pool([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    assert "r2.json: no repeat naive run in it" in out and "pooled over 2 runs (K=16, 4 steps" in out
    pooled = out.split("pooled over")[1]
    # naive vs repeat: run 1 (1,1) (0,1), run 2 (0,0) (0,0): 3 of 4 steps agree, floor 0.750. scan's pairs with
    # the two runs: run 1 step 0: 2, step 1: 1; run 2 step 0: 0, step 1: 2 -> 5 of 8 = 0.625; tokens 4x fewer
    line = next(ln for ln in pooled.splitlines() if ln.startswith("scan+reuse"))
    assert line.split()[1] == "4.00" and line.split()[2] == "0.625" and line.split()[3] == "0.750"
    # run 2's disputed step (scan 1, naive 0 twice, truth wrong): the truth sides with naive
    assert line.rstrip().endswith("0 / 1")
    with pytest.raises(SystemExit):
        A.main(["--pool", str(tmp_path / "missing.json")])


@pytest.mark.parametrize("limits", ["x,96", "0", ""])
def test_rollout_length_rejects_bad_limits_before_starting(limits, capsys):
    from benchmarks import rollout_length

    with pytest.raises(SystemExit):
        rollout_length.main(["--limits", limits])
    assert "--limits" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [(["--chunk", "0"], "--chunk"),
                                         (["--variants", "naive,scan+grow"], "scan+grow")])
def test_annotation_bench_rejects_bad_early_stop_settings_before_starting(argv, named, capsys):
    from benchmarks import annotation_methods as A

    with pytest.raises(SystemExit):
        A.main(argv)
    assert named in capsys.readouterr().err


def test_generation_summary_shows_the_pooled_ratio_and_each_pair():
    res = {"ratio": 0.9033, "pipeline_tokens_per_s": 401.2, "raw_tokens_per_s": 444.1,
           "engines": {"async": {"ratio": 0.9033, "pair_ratios": [0.8917, 0.9494, 0.8709]}}}
    measured, goal, detail = B.summary_line("generation", res)
    assert (measured, goal) == ("0.90x raw", ">= 0.95x")
    assert detail == "pipeline 401 vs raw 444 tokens/s; async engine 0.90x (pairs 0.89, 0.95, 0.87)"
    del res["engines"]["async"]["pair_ratios"]  # a run written before the repeats
    assert B.summary_line("generation", res)[2].endswith("async engine 0.90x")


def test_verifier_votes_pairs_each_strategy_with_majority_and_reads_pass_at_n(tmp_path, capsys):
    """Hand-built records of 4 problems at budget 2: majority is right on p0 only; weighted:checks on p0 and p1;
    a candidate is right on p0, p1 and p2 (pass@2 0.75); the paired difference is +0.25 and the ratio to pass@2
    1/3 and 2/3; the AUC reads the scored candidates. A folder without traces.jsonl is refused by name."""
    import json

    from benchmarks import verifier_votes as V

    def rec(pid, strategy, correct, answers, gold="7"):
        return {"problem_id": pid, "strategy": strategy, "budget": 2, "correct": correct, "gold": gold,
                "candidates": [{"answer": a, "score": 1.0} for a in answers]}

    records = [rec("p0", "majority", True, ["7", "7"]), rec("p1", "majority", False, ["5", "7.0"]),
               rec("p2", "majority", False, ["1,000", "6"], gold="1000"), rec("p3", "majority", False, [None, "3"]),
               rec("p0", "weighted:checks", True, []), rec("p1", "weighted:checks", True, []),
               rec("p2", "weighted:checks", False, []), rec("p3", "weighted:checks", False, [])]
    records[4]["candidates"] = [{"answer": "7", "score": 1.0}, {"answer": "5", "score": 0.0}]
    records[5]["candidates"] = [{"answer": "4", "score": 0.5}, {"answer": "7", "score": 0.5}]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "traces.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    rows = {r["strategy"]: r for r in V.compare(V.load(tmp_path / "run"), 2)}
    assert rows["majority@2"]["pass@2"] == 0.75 and rows["majority@2"]["accuracy"] == 0.25
    w = rows["weighted:checks@2"]
    assert w["accuracy"] == 0.5 and w["minus_majority"] == 0.25 and w["minus_majority_ci"][0] <= 0.25
    assert math.isclose(w["of_pass"], 0.5 / 0.75) and "minus_majority" not in rows["majority@2"]
    # its candidates' scores against their verdicts, pooled: right (1.0, 0.5) vs wrong (0.0, 0.5): 3 of 4 pairs
    # ranked right, one tie (1/2)
    assert w["outcome_auc"] == 3.5 / 4 and "outcome_auc" not in rows["majority@2"]
    assert V.main([str(tmp_path / "run"), "--budget", "2", "--base", str(tmp_path / "run")]) == 0
    assert "| weighted:checks@2 | 4 | 0.500" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="traces.jsonl"):
        V.load(tmp_path / "nothing")


def test_compare_runs_pairs_two_generators_per_strategy_and_counts_backtracks(tmp_path, capsys):
    """Two hand-built runs over 4 problems: greedy@1 right on p0 before, on p0, p1, p2 after (+0.5, paired); tokens
    per problem of each side; two of after's solutions backtrack with a stream-of-search cue, one of them right. A
    strategy only one run has is left out by default and refused by name when asked for."""
    import json

    from benchmarks import compare_runs as CR
    from pipelines.train.data import BACKTRACK_TO

    def rec(pid, correct, tokens, completion="1 + 1 = 2", strategy="greedy"):
        return {"problem_id": pid, "strategy": strategy, "budget": 1, "correct": correct, "tokens_generated": tokens,
                "completion": completion}

    before = [rec("p0", True, 10), rec("p1", False, 10), rec("p2", False, 20), rec("p3", False, 20),
              rec("p0", True, 5, strategy="majority")]
    back = "1 + 2 = 4\n" + BACKTRACK_TO.format(n=0) + "\n1 + 1 = 2"
    after = [rec("p0", True, 30), rec("p1", True, 30, back), rec("p2", True, 40), rec("p3", False, 40, back)]
    for name, records in (("before", before), ("after", after)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "traces.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    rows = CR.compare(CR.load(tmp_path / "before"), CR.load(tmp_path / "after"))
    assert [r["strategy"] for r in rows] == ["greedy@1"]
    r = rows[0]
    assert (r["before"], r["after"], r["gain"], r["problems"]) == (0.25, 0.75, 0.5, 4)
    assert r["ci"][0] <= 0.5 <= r["ci"][1] and (r["tokens_before"], r["tokens_after"]) == (15, 35)
    assert r["backtracking_after"] == (2, 1)
    assert CR.main([str(tmp_path / "before"), str(tmp_path / "after")]) == 0
    assert "| greedy@1 | 4 | 0.250 | 0.750 | +0.500" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="majority@1"):
        CR.compare(before, after, ["majority@1"])
    # the cue's words alone are no backtrack; runs of other problems are refused, not printed as NaN
    assert not CR.backtracks_in("That step is wrong, so I fix it.") and CR.backtracks_in(back)
    with pytest.raises(SystemExit, match="no problem is in both"):
        CR.compare(before, [dict(r, problem_id="q" + r["problem_id"]) for r in after])

"""The demo's closing lines: each verifier against majority vote over the same samples, read from the records."""

from pipelines import schema


def test_demo_prints_each_verifier_against_majority_from_the_records(tmp_path, capsys):
    import pyarrow.parquet as pq

    from jobs.demo import verifier_vs_majority

    def rec(pid, strategy, correct, budget=4):
        return {"problem_id": pid, "strategy": strategy, "budget": budget, "correct": correct}

    rows = [rec("a", "majority", False), rec("b", "majority", True),
            rec("a", "weighted:checks", True), rec("b", "weighted:checks", True),
            rec("a", "weighted", False), rec("b", "weighted", False), rec("a", "majority", True, budget=1)]
    pq.write_table(schema.to_table(rows, "eval_record"), tmp_path / "records.parquet")
    verifier_vs_majority(tmp_path)
    out = capsys.readouterr().out
    assert "checks-weighted vote      1.000 vs 0.500  (+0.500" in out
    assert "PRM-weighted vote         0.000 vs 0.500  (-0.500" in out
    verifier_vs_majority(tmp_path / "missing")  # no evaluation yet: nothing printed, no error
    assert capsys.readouterr().out == ""

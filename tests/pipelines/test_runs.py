"""What a run folder hands to the stages after it: its problems (problems.parquet, else rebuilt from config.json)."""

import json

import pyarrow.parquet as pq

from pipelines import runs, schema
from pipelines.problems import SyntheticConfig, load_problems


def _problems(n=3, seed=4, phrasings=0):
    return load_problems("synthetic", synthetic=SyntheticConfig(n=n, seed=seed, phrasings=phrasings)).problems


def test_problems_parquet_is_read_from_any_path_inside_the_run(tmp_path):
    run = tmp_path / "gen"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"problems": "synthetic", "synthetic": {"n": 99, "seed": 0}}))
    probs = _problems(phrasings=1)  # a setting a regeneration from config.json could forget
    runs.write_problems(probs, run)
    pq.write_table(schema.to_table([], "sample"), run / "samples" / "part-0.parquet")
    for path in (run, run / "samples", run / "samples" / "part-0.parquet"):
        found, source = runs.run_problems(path)
        assert source.endswith("problems.parquet") and list(found) == [p["id"] for p in probs]
        assert [found[p["id"]]["question"] for p in probs] == [p["question"] for p in probs]
        assert all(found[p["id"]]["quantities"] == p["quantities"] for p in probs)


def test_an_older_run_is_rebuilt_from_its_config_and_no_run_gives_nothing(tmp_path):
    run = tmp_path / "old"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"problems": "synthetic", "synthetic": {"n": 3, "seed": 4}}))
    found, source = runs.run_problems(run / "samples")
    assert list(found) == [p["id"] for p in _problems()] and "config.json" in source
    (tmp_path / "bare" / "samples").mkdir(parents=True)
    assert runs.run_problems(tmp_path / "bare" / "samples") == ({}, "")

"""Schemas: round trip through parquet with the version, and clear errors on foreign data."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import schema
from pipelines.problems import SyntheticConfig, synthetic_problems


def test_problem_rows_round_trip_with_version(tmp_path):
    rows = synthetic_problems(SyntheticConfig(n=5))
    t = schema.to_table(rows, "problem")
    pq.write_table(t, tmp_path / "p.parquet")
    back = pq.read_table(tmp_path / "p.parquet")
    assert back.schema.metadata[schema.META_VERSION] == schema.SCHEMA_VERSION.encode()
    assert schema.check_table(back, "problem").to_pylist() == [{k: r[k] for k in schema.PROBLEM.names} for r in rows]


def test_check_table_names_missing_columns_and_version():
    t = pa.table({"problem_id": ["a"]})
    with pytest.raises(ValueError, match="missing columns"):
        schema.check_table(t, "sample", where="x.parquet")
    old = schema.to_table([], "sample").replace_schema_metadata({schema.META_VERSION: b"0"})
    with pytest.raises(ValueError, match="schema version 0"):
        schema.check_table(old, "sample")


def test_every_kind_has_a_schema_and_typed_dict():
    assert set(schema.SCHEMAS) == {"problem", "sample", "step_label", "trajectory", "eval_record"}
    for kind, td in [("problem", schema.Problem), ("sample", schema.Sample), ("step_label", schema.StepLabel),
                     ("trajectory", schema.Trajectory), ("eval_record", schema.EvalRecord)]:
        assert set(td.__annotations__) == set(schema.SCHEMAS[kind].names), kind


def test_pipelines_does_not_import_vllm():
    import subprocess
    import sys

    code = ("import pipelines.generate, pipelines.problems, pipelines.search, pipelines.prompts, sys;"
            "print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

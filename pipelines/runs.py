"""What a run folder holds for the stages after it, read through one function each.

A `stepray generate` run (and a `stepray evaluate` run) writes beside its outputs:
    config.json        the stage's whole config
    problems.parquet   the Problem rows it ran on (schema.PROBLEM: question, answer, kind, quantities, tests, ...)
Later stages (annotation, PRM evaluation on a run's samples, the loop's expert iteration) take the questions and the
ground truth from problems.parquet, so nothing is regenerated from settings that a regeneration could miss. A run
made before problems.parquet existed is read from its config.json: the problem source and its synthetic settings
regenerate the same problems (synthetic problems are reproducible from their config, ids included).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines import config as C
from pipelines import schema

PROBLEMS_FILE = "problems.parquet"


def run_folder(path: str | Path) -> Path:
    """The run folder of a path inside it: `<run>` for `<run>/samples`, `<run>/labels` or a part file in them, and a
    folder that holds a config.json or problems.parquet itself."""
    p = Path(path).resolve()
    if p.is_dir() and ((p / "config.json").exists() or (p / PROBLEMS_FILE).exists()):
        return p
    if p.is_file() and p.parent.name in ("samples", "labels"):
        return p.parent.parent
    return p.parent


def write_problems(problems: list[dict], run: str | Path) -> Path:
    import pyarrow.parquet as pq

    path = Path(run) / PROBLEMS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.to_table(problems, "problem"), path)
    return path


def run_config(path: str | Path) -> dict:
    """The config.json of the run that `path` belongs to; {} when there is none."""
    conf = run_folder(path) / "config.json"
    return json.loads(conf.read_text()) if conf.exists() else {}


def run_problems(path: str | Path) -> tuple[dict[str, dict], str]:
    """The problems of the run that `path` belongs to, by id, and where they were read from ({} and "" when the run
    has neither problems.parquet nor a config.json naming its source)."""
    run = run_folder(path)
    table_path = run / PROBLEMS_FILE
    from pipelines.problems import SyntheticConfig, load_problems

    if table_path.exists():  # load_problems reads a Problem table as it was written
        return {p["id"]: p for p in load_problems(str(table_path)).problems}, str(table_path)
    conf = run_config(run)
    if not conf.get("problems"):
        return {}, ""

    syn = C.load_config(SyntheticConfig, base=conf.get("synthetic") or {})
    loaded = load_problems(conf["problems"], synthetic=syn)
    return {p["id"]: p for p in loaded.problems}, f"{run / 'config.json'} (problems={conf['problems']})"

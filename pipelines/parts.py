"""Parquet parts: how a stage streams its rows to a folder and reads them back.

A part is written to `<name>.tmp` and renamed into place, so a killed run leaves no half file and a re-run can read
every `part-*.parquet` it finds (generation and annotation resume from what is there).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def new_name() -> str:
    return f"part-{uuid.uuid4().hex[:12]}.parquet"


def write_part(table: pa.Table, folder: str | Path, name: str | None = None) -> Path:
    """Write `table` as one part in `folder` (made if missing) under `name` (a fresh one by default)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or new_name())
    pq.write_table(table, path.with_name(path.name + ".tmp"))
    os.replace(path.with_name(path.name + ".tmp"), path)
    return path


def read_parts(folder: str | Path) -> pa.Table | None:
    """Every part of `folder` as one table (schemas promoted), None when there is none."""
    found = sorted(Path(folder).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in found], promote_options="default") if found else None

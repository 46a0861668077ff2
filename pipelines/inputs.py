"""The user's inputs, checked before Ray, an engine or a trainer starts.

A user's mistake (a missing path, a folder where a file belongs, a file that is not what its name says, rows of
another schema, a folder that is not a model) raises `InputError`, whose message names the input and says what
to do; the CLI prints it as one line and exits 2 (`pipelines.runtime.cli_main`). A traceback is for our bugs.
A bad row inside a readable file is not an InputError: it is set aside with its reason and the others go on.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.config import InputError, MissingInput

REWARD_MODEL_META = "reward_model.json"  # written beside a reward model's weights (pipelines/reward_model.py)


def first_line(e: BaseException) -> str:
    """An exception's message on one line (pyarrow's run to several)."""
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def existing(path: str | Path, what: str, hint: str = "") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingInput(f"{what}: {p} does not exist" + (f"; {hint}" if hint else ""))
    return p


def input_file(path: str | Path, what: str, hint: str = "") -> Path:
    """A path that must be a file (not a folder)."""
    p = existing(path, what, hint)
    if not p.is_file():
        raise InputError(f"{what}: {p} is a folder, not a file" + (f"; {hint}" if hint else ""))
    return p


def text_lines(path: Path):
    """(line number, text or None, why not) for every non-blank line of a text file read as bytes: a line that is
    not UTF-8 is a row fault for the caller to set aside, never a crash of the whole file."""
    with Path(path).open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, None, f"not UTF-8 text ({e.reason} at byte {e.start})"
                continue
            if text.strip():
                yield number, text, ""


def parquet_files(path: str | Path, what: str, hint: str = "") -> list[Path]:
    """A parquet file, or the *.parquet files of a folder (at least one)."""
    p = existing(path, what, hint)
    if p.is_file():
        return [p]
    files = sorted(f for f in p.glob("*.parquet") if f.is_file())
    if not files:
        raise InputError(f"{what}: the folder {p} holds no .parquet files" + (f"; {hint}" if hint else ""))
    return files


def read_parquet(path: str | Path, what: str, kind: str | None = None, hint: str = ""):
    """The rows of a parquet file or folder as one Arrow table, checked against the stepray schema `kind`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import schema

    tables = []
    for f in parquet_files(path, what, hint):
        try:
            table = pq.read_table(f)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{what}: {f} is not a readable parquet file ({first_line(e)})"
                             + (f"; {hint}" if hint else "")) from None
        tables.append(schema.check_table(table, kind, where=f"{what} {f}") if kind else table)
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as e:
        raise InputError(f"{what}: the parquet files of {path} do not share one schema ({first_line(e)})") from None


def reward_model_folder(path: str | Path, what: str, kind: str | None = None) -> dict:
    """The metadata of a reward model folder (`stepray train prm|orm` output; with kind "vstar", a V-STaR verifier
    of `stepray train dpo` and its reference model), read without loading weights."""
    if kind == "genrm":
        from actors.vstar_scorer import VERIFIER_FILE

        hint = "give the model/ folder of `stepray train genrm`"
        p = existing(path, what, hint)
        try:
            meta = json.loads((p / VERIFIER_FILE).read_text()) if (p / VERIFIER_FILE).is_file() else {}
        except (ValueError, OSError) as e:
            raise InputError(f"{what}: {p / VERIFIER_FILE} is not readable JSON ({first_line(e)}); train it "
                             f"again") from None
        if meta.get("kind") != "genrm":
            raise InputError(f"{what}: {p} is not a GenRM verifier folder (no {VERIFIER_FILE} of kind genrm); {hint}")
        return meta
    if kind == "vstar":
        from actors.vstar_scorer import VERIFIER_FILE

        hint = "give the model/ folder of `stepray train dpo`"
        p = existing(path, what, hint)
        if not (p / VERIFIER_FILE).is_file():
            raise InputError(f"{what}: {p} is not a V-STaR verifier folder (no {VERIFIER_FILE}); {hint}")
        try:
            meta = json.loads((p / VERIFIER_FILE).read_text())
        except (ValueError, OSError) as e:
            raise InputError(f"{what}: {p / VERIFIER_FILE} is not readable JSON ({first_line(e)}); train it "
                             f"again") from None
        existing(str(meta.get("reference") or ""), f"{what} (its reference model)", "the model `stepray train dpo` "
                 "started from must stay where it was; train the verifier again if it moved")
        return meta
    hint = "give the model/ folder of `stepray train prm` (or orm)"
    p = existing(path, what, hint)
    meta_path = p / REWARD_MODEL_META
    if not p.is_dir() or not meta_path.is_file():
        raise InputError(f"{what}: {p} is not a reward model folder (no {REWARD_MODEL_META}); {hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError) as e:
        raise InputError(f"{what}: {meta_path} is not readable JSON ({first_line(e)}); train the model again") from None
    if kind and meta.get("kind") != kind:
        raise InputError(f"{what}: {p} is a {str(meta.get('kind')).upper()} folder; give the model/ folder of "
                         f"`stepray train {kind}`")
    return meta

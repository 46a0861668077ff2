"""The rows that flow between stages, defined once: Arrow schemas for parquet and TypedDicts for code.

Every stage reads and writes parquet with these schemas. The schema version travels in the parquet file's
metadata (`stepray.schema_version`, `stepray.row_kind`), and `check_table` rejects data written under another
version with a message that says what to do.

Row kinds:
- Problem: one question with its reference answer (and, for synthetic problems, the value of every step).
- Sample: one sampled chain of thought for a problem, split into steps, with its extracted answer and verdict.
- StepLabel: Monte-Carlo (or judge / human) labels for the steps of one sample.
- Trajectory: one training example for the generator (prompt + completion).
- EvalRecord: one (problem, strategy, budget) result of test-time search.
"""

from __future__ import annotations

from typing import Any, TypedDict

import pyarrow as pa

SCHEMA_VERSION = "1"
META_VERSION = b"stepray.schema_version"
META_KIND = b"stepray.row_kind"


class Problem(TypedDict):
    id: str  # stable across runs: derived from source + index/seed (see problems.py)
    question: str
    answer: str  # reference final answer as text ("17", "\\frac{1}{2}"); for code: "" (tests decide)
    source: str  # "synthetic", "gsm8k", "math500", "humaneval", "file:<name>"
    kind: str  # grader to use: "numeric" | "math" | "code"
    ref_steps: list[str]  # reference solution steps, when known
    ref_values: list[float]  # synthetic only: value after each step (ground truth for step checks)
    quantities: list[float]  # synthetic only: the numbers given in the question
    tests: str  # code only: assert statements or a HumanEval-style check(candidate)
    entry_point: str  # code only: function name passed to check()
    meta: str  # JSON object with anything source-specific (level, subject, n_steps, ...)


def _problem(**kw: Any) -> Problem:
    """A Problem row with the defaults of the fields its source leaves out (problems.py's file loaders and
    synthetic.py build their rows with it)."""
    row: dict[str, Any] = {
        "ref_steps": [], "ref_values": [], "quantities": [], "tests": "", "entry_point": "", "meta": "{}",
        "answer": "", "kind": "numeric",
    }
    row.update(kw)
    return row  # type: ignore[return-value]


class Sample(TypedDict):
    problem_id: str
    sample_id: str  # f"{problem_id}/{sample_idx}" (or a search-specific suffix)
    sample_idx: int
    mode: str  # how it was produced: "sample" (temperature sampling), "greedy", or a search strategy's name
    prompt: str  # the full prompt text given to the engine (chat template applied)
    completion: str
    steps: list[str]
    answer: str | None  # extracted answer, None when nothing was found
    answer_method: str  # how it was extracted: boxed | answer_is | gsm8k | answer_line | last_number | none
    gold: str
    kind: str
    correct: bool
    reason: str  # verdict reason: correct | wrong | no_answer | timeout | error | ...
    n_prompt_tokens: int
    n_completion_tokens: int
    finish_reason: str  # "stop" | "length" | "error"
    cum_logprob: float  # sum of the chosen tokens' logprobs (NaN when not requested)
    confidence: float  # Marco-o1 confidence: mean over tokens of softmax of the chosen token against top-k
    temperature: float
    model: str
    error: str  # "" unless generation failed for this problem (then completion is "")


class StepLabel(TypedDict):
    problem_id: str
    sample_id: str
    question: str
    steps: list[str]
    soft_labels: list[float]  # share of rollouts from prefix z_1..z_t that reached a verified answer
    hard_labels: list[int]  # 1 if any rollout from the prefix reached a verified answer
    rollouts: list[int]  # rollouts spent (or reused) per step prefix
    tokens_generated: int
    method: str  # "naive" | "binary" | "judge" | "human" | "first_error_index"
    model: str
    verifier: str


class Trajectory(TypedDict):
    problem_id: str
    sample_id: str
    prompt: str  # chat-formatted prompt; the loss is masked on these tokens
    completion: str
    weight: float


class EvalRecord(TypedDict):
    problem_id: str
    strategy: str
    budget: int
    answer: str | None
    gold: str
    correct: bool
    tokens_generated: int
    tokens_scored: int
    wall_s: float
    model: str
    prm: str


_list_str = pa.list_(pa.string())
_list_f64 = pa.list_(pa.float64())

PROBLEM = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("ref_steps", _list_str),
        ("ref_values", _list_f64),
        ("quantities", _list_f64),
        ("tests", pa.string()),
        ("entry_point", pa.string()),
        ("meta", pa.string()),
    ]
)

SAMPLE = pa.schema(
    [
        ("problem_id", pa.string()),
        ("sample_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("mode", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("steps", _list_str),
        ("answer", pa.string()),
        ("answer_method", pa.string()),
        ("gold", pa.string()),
        ("kind", pa.string()),
        ("correct", pa.bool_()),
        ("reason", pa.string()),
        ("n_prompt_tokens", pa.int32()),
        ("n_completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("cum_logprob", pa.float64()),
        ("confidence", pa.float64()),
        ("temperature", pa.float64()),
        ("model", pa.string()),
        ("error", pa.string()),
    ]
)

STEP_LABEL = pa.schema(
    [
        ("problem_id", pa.string()),
        ("sample_id", pa.string()),
        ("question", pa.string()),
        ("steps", _list_str),
        ("soft_labels", _list_f64),
        ("hard_labels", pa.list_(pa.int8())),
        ("rollouts", pa.list_(pa.int32())),
        ("tokens_generated", pa.int64()),
        ("method", pa.string()),
        ("model", pa.string()),
        ("verifier", pa.string()),
    ]
)

TRAJECTORY = pa.schema(
    [
        ("problem_id", pa.string()),
        ("sample_id", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("weight", pa.float64()),
    ]
)

EVAL_RECORD = pa.schema(
    [
        ("problem_id", pa.string()),
        ("strategy", pa.string()),
        ("budget", pa.int32()),
        ("answer", pa.string()),
        ("gold", pa.string()),
        ("correct", pa.bool_()),
        ("tokens_generated", pa.int64()),
        ("tokens_scored", pa.int64()),
        ("wall_s", pa.float64()),
        ("model", pa.string()),
        ("prm", pa.string()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "problem": PROBLEM,
    "sample": SAMPLE,
    "step_label": STEP_LABEL,
    "trajectory": TRAJECTORY,
    "eval_record": EVAL_RECORD,
}


def versioned(kind: str) -> pa.Schema:
    """The schema of `kind` with the version and row kind in its metadata (what every writer uses)."""
    return SCHEMAS[kind].with_metadata({META_VERSION: SCHEMA_VERSION.encode(), META_KIND: kind.encode()})


def to_table(rows: list[dict], kind: str) -> pa.Table:
    """Rows (dicts) -> a versioned Arrow table; columns outside the schema are dropped, missing ones are null."""
    schema = versioned(kind)
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


def check_table(table: pa.Table, kind: str, where: str = "input") -> pa.Table:
    """Check that `table` holds `kind` rows of this schema version; cast to the exact schema.

    Raises InputError (a ValueError) naming `where` and the missing columns, or the version mismatch, with what to do.
    """
    from pipelines.config import InputError

    meta = table.schema.metadata or {}
    version = meta.get(META_VERSION)
    if version is not None and version.decode() != SCHEMA_VERSION:
        raise InputError(
            f"{where}: written with stepray schema version {version.decode()}, this stepray reads version "
            f"{SCHEMA_VERSION}; re-run the stage that produced it with this version."
        )
    schema = SCHEMAS[kind]
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise InputError(f"{where}: not {kind} rows, missing columns {shown} (it has {table.column_names[:8]}); "
                         f"give {kind} rows as stepray writes them (pipelines/schema.py).")
    return table.select(schema.names).cast(versioned(kind))

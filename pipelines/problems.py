"""Problem sources: a synthetic arithmetic generator with known step values, GSM8K, MATH-500, code sets, user files.

Every source yields `schema.Problem` rows with a stable id. Rows that cannot be used (missing fields, empty
question, unparseable answer) are set aside as rejects with the file, line and reason; they are counted in the
summary and written to a rejects file by the jobs, never silently dropped and never a crash.

Source names (`load_problems(spec)`):
- "synthetic"                  generated here (see SyntheticConfig); needs no files.
- "gsm8k" / "gsm8k:train"      ../shared/data/gsm8k/{test,train}.jsonl; answer after "####", commas stripped.
- "math500"                    ../shared/data/math500/test.jsonl
- "humaneval"                  ../shared/data/code/HumanEval.jsonl (code problems with check(candidate) tests)
- a path to .jsonl/.json/.parquet/.csv/.tsv with `id`, `question`, `answer` columns (or a column mapping), or code
  rows in HumanEval (`task_id`, `prompt`, `test`, `entry_point`) or MBPP (`text`, `code`, `test_list`) shape.
  A file that yields no problem at all (not its format, no rows, no row with the fields) is an InputError.
The data root is $STEPRAY_DATA, else ../shared/data beside the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pipelines import inputs, schema
from pipelines.config import InputError, MissingInput, help_field
from pipelines.schema import Problem

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """$STEPRAY_DATA, else the shared data folder beside the repository (../shared/data)."""
    env = os.environ.get("STEPRAY_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@dataclass
class LoadResult:
    problems: list[Problem]
    rejects: list[dict]  # {"source", "line", "reason", "row"}

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for r in self.rejects:
            key = r["reason"].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        s = f"{len(self.problems)} problems, {len(self.rejects)} rejected"
        if reasons:
            s += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) + ")"
        return s


def _problem(**kw: Any) -> Problem:
    row: dict[str, Any] = {
        "ref_steps": [], "ref_values": [], "quantities": [], "tests": "", "entry_point": "", "meta": "{}",
        "answer": "", "kind": "numeric",
    }
    row.update(kw)
    return row  # type: ignore[return-value]


def format_number(x: float) -> str:
    """17.0 -> "17", 2.5 -> "2.5" (how synthetic answers and step values are written)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def parse_number(text: str) -> float | None:
    """"1,080" -> 1080.0, "-3.50" -> -3.5, "$12" -> 12.0; None when the text is not a plain number."""
    t = text.strip().replace(",", "").lstrip("$").rstrip(".").strip()
    return float(t) if _NUMBER.match(t) else None


# ----------------------------------------------------------------------------------------------------------
# Synthetic arithmetic word problems
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SyntheticConfig:
    n: int = help_field(200, "number of problems")
    seed: int = help_field(0, "problem i is drawn from random.Random(f'{seed}:{i}'), so each is reproducible alone")
    min_steps: int = help_field(1, "fewest arithmetic steps in a problem (1-5)")
    max_steps: int = help_field(2, "most arithmetic steps in a problem (1-5)")
    ops: tuple[str, ...] = help_field(("+", "-", "*", "/"), "operations to draw from: + - * / (exact division)")
    max_start: int = help_field(50, "largest starting quantity")
    max_operand: int = help_field(20, "largest operand of + and -")
    max_factor: int = help_field(5, "largest factor of * and divisor of /")
    max_value: int = help_field(1000, "no intermediate value exceeds this")
    phrasings: int = help_field(0, "phrasings per sentence kind to draw from: 0 = all (the default: many sentence "
                                   "shapes), k = only the first k of each (a narrow wording, e.g. for a controlled "
                                   "study of how training follows the problems' wording)")

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps <= 5:
            raise ValueError(f"steps must satisfy 1 <= min_steps <= max_steps <= 5, got {self.min_steps}..{self.max_steps}")
        bad = [o for o in self.ops if o not in ("+", "-", "*", "/")]
        if bad or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of + - * /, got {list(self.ops)}")
        if self.phrasings < 0:
            raise ValueError(f"phrasings must be >= 0 (0 = all), got {self.phrasings}")
        if self.max_factor < 2 or self.max_start < 2 or self.max_operand < 1 or self.n < 0:
            raise ValueError("max_factor and max_start must be >= 2, max_operand >= 1 and n >= 0")

    def key(self) -> str:
        """Short hash of everything that shapes the problems (so ids never collide across configs)."""
        blob = json.dumps([self.seed, self.min_steps, self.max_steps, list(self.ops), self.max_start,
                           self.max_operand, self.max_factor, self.max_value]
                          + ([self.phrasings] if self.phrasings else []))  # ids of the default stay as they were
        return hashlib.sha1(blob.encode()).hexdigest()[:6]


# Scenes: (who, pronoun, possessive, item, container-verb). Many scenes x many phrasings per operation, so the
# model does not learn a single sentence shape (the calibration run in docs/cpu-engine.md saw that).
_NAMES = [("Tom", "he", "his"), ("Mia", "she", "her"), ("Ravi", "he", "his"), ("Lena", "she", "her"),
          ("Omar", "he", "his"), ("Sofia", "she", "her"), ("Ken", "he", "his"), ("Ada", "she", "her"),
          ("Luis", "he", "his"), ("Zoe", "she", "her")]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells", "cards",
          "balloons", "toy cars"]
_OPEN = [
    "{N} has {a} {I}.",
    "{N} starts with {a} {I}.",
    "There are {a} {I} in {N}'s bag.",
    "{N} owns {a} {I}.",
    "At first, {N} has {a} {I}.",
    "{N} collected {a} {I} last week.",
]
_ADD = [
    "{P_} buys {b} more {I}.",
    "{N} finds {b} more {I}.",
    "A friend gives {N} {b} {I}.",
    "Then {p} gets {b} more.",
    "{N} wins {b} {I} in a game.",
    "{P_} adds {b} {I} to {h} pile.",
]
_SUB = [
    "{P_} gives away {b} {I}.",
    "{N} loses {b} of them.",
    "Then {p} uses {b} {I}.",
    "{N} sells {b} {I}.",
    "{b} of the {I} get lost.",
    "{P_} gives {b} {I} to a friend.",
]
_MUL = [
    "Then {N} ends up with {b} times as many {I} as before.",
    "The number of {I} {N} has becomes {b} times bigger.",
    "{N}'s pile of {I} grows to {b} times its size.",
    "{P_} multiplies {h} {I} by {b}.",
]
_DIV = [
    "{N} splits the {I} into {b} equal groups and keeps one group.",
    "{P_} shares the {I} equally among {b} friends, including {self}, and keeps one share.",
    "Then {N} keeps only one of {b} equal parts of the {I}.",
    "{P_} divides {h} {I} equally into {b} boxes and keeps one box.",
]
_ASK = [
    "How many {I} does {N} have now?",
    "How many {I} does {N} have at the end?",
    "What is the number of {I} {N} has now?",
    "How many {I} are left with {N}?",
]
_OP_TEMPLATES = {"+": _ADD, "-": _SUB, "*": _MUL, "/": _DIV}


def _fill(template: str, name: tuple[str, str, str], item: str, **nums: int) -> str:
    n, p, h = name
    return template.format(N=n, p=p, P_=p.capitalize(), h=h, I=item,
                           self="himself" if p == "he" else "herself", **nums)


def _apply(op: str, v: int, b: int) -> int:
    return {"+": v + b, "-": v - b, "*": v * b, "/": v // b}[op]


def synthetic_problem(cfg: SyntheticConfig, i: int) -> Problem:
    """Problem i of the config: reproducible from (cfg, i) alone, with the value of every step recorded."""
    rng = random.Random(f"{cfg.seed}:{i}")  # string seeds hash with sha512: stable across runs and platforms
    pick = (lambda xs: rng.choice(xs[:cfg.phrasings])) if cfg.phrasings else rng.choice
    n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, cfg.max_start)
    sentences = [_fill(pick(_OPEN), name, item, a=value)]
    quantities: list[float] = [float(value)]
    ref_steps: list[str] = []
    ref_values: list[float] = []
    ops_used: list[str] = []
    for _ in range(n_steps):
        options = []
        for op in cfg.ops:
            if op == "+" and value + 1 <= cfg.max_value:
                options.append((op, [b for b in range(1, cfg.max_operand + 1) if value + b <= cfg.max_value]))
            elif op == "-" and value > 1:
                options.append((op, list(range(1, min(cfg.max_operand, value - 1) + 1))))
            elif op == "*":
                bs = [b for b in range(2, cfg.max_factor + 1) if value * b <= cfg.max_value]
                if bs:
                    options.append((op, bs))
            elif op == "/":
                bs = [b for b in range(2, cfg.max_factor + 1) if value % b == 0 and value // b >= 1]
                if bs:
                    options.append((op, bs))
        if not options:  # e.g. only "/" requested and the value is prime: fall back to the first usable op
            options = [("+", [1])]
        op, bs = rng.choice(options)
        b = rng.choice(bs)
        new = _apply(op, value, b)
        sentences.append(_fill(pick(_OP_TEMPLATES[op]), name, item, b=b))
        sym = {"+": "+", "-": "-", "*": "*", "/": "/"}[op]
        ref_steps.append(f"{value} {sym} {b} = {new}")
        ref_values.append(float(new))
        quantities.append(float(b))
        ops_used.append(op)
        value = new
    sentences.append(_fill(pick(_ASK), name, item))
    return _problem(
        id=f"syn-{cfg.key()}-{i:06d}",
        question=" ".join(sentences),
        answer=format_number(value),
        source="synthetic",
        kind="numeric",
        ref_steps=ref_steps,
        ref_values=ref_values,
        quantities=quantities,
        meta=json.dumps({"n_steps": n_steps, "ops": ops_used, "seed": cfg.seed, "index": i}),
    )


def synthetic_problems(cfg: SyntheticConfig) -> list[Problem]:
    return [synthetic_problem(cfg, i) for i in range(cfg.n)]


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------

FILE_FORMATS = ".jsonl (JSON lines), .json (an array of objects), .parquet, .csv or .tsv (a header row)"


def _read_rows(path: Path) -> Iterable[tuple[int, dict | None, str]]:
    """(line number, row or None, parse error) for jsonl / json array / parquet / csv / tsv files.

    A line that is not UTF-8 or not a JSON object is a row error (set aside with its reason); a file that cannot be
    read as its format at all is an InputError naming it. Other suffixes are read as JSON lines.
    """
    path = inputs.input_file(path, "problem file", f"problem files are {FILE_FORMATS}")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".csv", ".tsv"):
        import pyarrow as pa

        try:
            if suffix == ".parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(path)
            else:
                import pyarrow.csv as pcsv

                # every column as text: an answer "007" or "1/2" stays what the file says (numbers parse later)
                parse = pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
                names = pcsv.open_csv(path, parse_options=parse).schema.names
                table = pcsv.read_csv(path, parse_options=parse, convert_options=pcsv.ConvertOptions(
                    column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False))
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"problem file {path}: not a readable {suffix[1:]} file ({inputs.first_line(e)}); "
                             f"problem files are {FILE_FORMATS}") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row, ""
    elif suffix == ".json":
        try:
            data = json.loads(path.read_bytes())
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise InputError(f"problem file {path}: not JSON ({inputs.first_line(e)}); a .json file holds one array "
                             f"of objects, a .jsonl file one object per line") from None
        if not isinstance(data, list):
            raise InputError(f"problem file {path}: expected a JSON array of objects, got a JSON "
                             f"{type(data).__name__}; a .jsonl file holds one object per line")
        for i, row in enumerate(data, start=1):
            yield i, row if isinstance(row, dict) else None, "" if isinstance(row, dict) else "not an object"
    else:
        for i, line, why in inputs.text_lines(path):
            if line is None:
                yield i, None, why
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, None, f"invalid JSON: {e.msg}"
                continue
            yield i, row if isinstance(row, dict) else None, "" if isinstance(row, dict) else "not an object"


def _unencodable(row: dict) -> str:
    """The first text field that cannot be written as UTF-8 (a lone surrogate from a JSON escape), or ""."""
    for key, value in row.items():
        for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    return f"unencodable: {key!r} holds {e.object[e.start:e.end]!a}, which UTF-8 cannot encode"
    return ""


def _reject(rejects: list, source: str, line: int, reason: str, row: Any) -> None:
    rejects.append({"source": source, "line": line, "reason": reason, "row": row})


def load_gsm8k(path: Path, split: str = "test") -> LoadResult:
    problems, rejects = [], []
    for line, row, err in _read_rows(path):
        src = f"gsm8k:{split}"
        if row is None:
            _reject(rejects, src, line, f"unreadable: {err}", None)
            continue
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not q.strip():
            _reject(rejects, src, line, "empty_question", row)
            continue
        if not isinstance(a, str) or "####" not in a:
            _reject(rejects, src, line, "no_answer: no '####' line", row)
            continue
        body, final = a.rsplit("####", 1)
        value = parse_number(final)
        if value is None:
            _reject(rejects, src, line, f"unparseable_answer: {final.strip()!r}", row)
            continue
        steps = [re.sub(r"<<.*?>>", "", s).strip() for s in body.strip().split("\n") if s.strip()]
        problems.append(_problem(id=f"gsm8k-{split}-{line - 1:05d}", question=q.strip(), answer=format_number(value),
                                 source="gsm8k", kind="numeric", ref_steps=steps,
                                 meta=json.dumps({"split": split})))
    return LoadResult(problems, rejects)


def load_math500(path: Path) -> LoadResult:
    problems, rejects = [], []
    for line, row, err in _read_rows(path):
        if row is None:
            _reject(rejects, "math500", line, f"unreadable: {err}", None)
            continue
        q, a = row.get("problem"), row.get("answer")
        if not isinstance(q, str) or not q.strip():
            _reject(rejects, "math500", line, "empty_question", row)
            continue
        if not isinstance(a, str) or not a.strip():
            _reject(rejects, "math500", line, "no_answer", row)
            continue
        problems.append(_problem(
            id=row.get("unique_id") or f"math500-{line - 1:04d}", question=q.strip(), answer=a.strip(),
            source="math500", kind="math", ref_steps=[row.get("solution", "")],
            meta=json.dumps({"level": row.get("level"), "subject": row.get("subject")})))
    return LoadResult(problems, rejects)


def _code_problem(row: dict, line: int, source: str, rejects: list) -> Problem | None:
    if "entry_point" in row or ("prompt" in row and "test" in row):  # HumanEval shape
        prompt, test, entry = row.get("prompt"), row.get("test"), row.get("entry_point")
        if not (isinstance(prompt, str) and prompt.strip()):
            _reject(rejects, source, line, "empty_question", row)
            return None
        if not (isinstance(test, str) and "def check" in test and isinstance(entry, str) and entry):
            _reject(rejects, source, line, "no_tests: need `test` with check(candidate) and `entry_point`", row)
            return None
        return _problem(id=str(row.get("task_id", f"{source}-{line}")), question=prompt, answer="", source=source,
                        kind="code", tests=test, entry_point=entry,
                        ref_steps=[row["canonical_solution"]] if row.get("canonical_solution") else [],
                        meta=json.dumps({"format": "humaneval"}))
    text, tests = row.get("text"), row.get("test_list")  # MBPP shape
    if not (isinstance(text, str) and text.strip()):
        _reject(rejects, source, line, "empty_question", row)
        return None
    if not (isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
        _reject(rejects, source, line, "no_tests: need a non-empty `test_list` of assert statements", row)
        return None
    setup = row.get("test_setup_code") or ""
    return _problem(id=str(row.get("task_id", f"{source}-{line}")), question=text.strip(), answer="", source=source,
                    kind="code", tests="\n".join([setup, *tests]).strip(),
                    ref_steps=[row["code"]] if row.get("code") else [], meta=json.dumps({"format": "mbpp"}))


def load_file(path: str | Path, mapping: dict[str, str] | None = None, kind: str = "auto") -> LoadResult:
    """A user file of problems. `mapping` renames columns to ours ({"question": "problem", ...}).

    kind "auto": code rows (HumanEval/MBPP shape) are code, answers that parse as numbers are numeric, others math.
    """
    path = inputs.existing(path, "problem file", "give a source name (synthetic, gsm8k, math500, humaneval) or a "
                                                 f"file: {FILE_FORMATS}")
    mapping = mapping or {}
    source = f"file:{path.name}"
    problems, rejects = [], []
    seen: set[str] = set()
    for line, row, err in _read_rows(path):
        if row is None:
            _reject(rejects, source, line, f"unreadable: {err}", None)
            continue
        bad_text = _unencodable(row)
        if bad_text:
            _reject(rejects, source, line, bad_text, {k: v for k, v in row.items() if isinstance(v, (int, float))})
            continue
        row = {ours: row.get(theirs) for ours, theirs in mapping.items()} | {
            k: v for k, v in row.items() if k not in mapping.values()}
        if kind == "code" or (kind == "auto" and ("test_list" in row or "entry_point" in row)):
            p = _code_problem(row, line, source, rejects)
        else:
            q, a = row.get("question"), row.get("answer")
            if not isinstance(q, str) or not q.strip():
                _reject(rejects, source, line, "empty_question", row)
                continue
            if a is None or (isinstance(a, str) and not a.strip()):
                _reject(rejects, source, line, "no_answer", row)
                continue
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                a = format_number(a)
            if not isinstance(a, str):
                _reject(rejects, source, line, f"unparseable_answer: {a!r}", row)
                continue
            k = kind if kind != "auto" else ("numeric" if parse_number(a) is not None else "math")
            if k == "numeric" and parse_number(a) is None:
                _reject(rejects, source, line, f"unparseable_answer: {a!r} is not a number", row)
                continue
            answer = format_number(parse_number(a)) if k == "numeric" else a.strip()  # type: ignore[arg-type]
            pid = str(row.get("id") if row.get("id") is not None else f"{path.stem}-{line - 1:05d}")
            p = _problem(id=pid, question=q.strip(), answer=answer, source=source, kind=k)
        if p is None:
            continue
        if p["id"] in seen:
            _reject(rejects, source, line, f"duplicate_id: {p['id']}", row)
            continue
        seen.add(p["id"])
        problems.append(p)
    if not problems:
        _no_problems(path, rejects, "rows need `question` and `answer` (rename columns with --map "
                     "question=COL,answer=COL), or HumanEval / MBPP fields for code")
    return LoadResult(problems, rejects)


def _no_problems(path: Path, rejects: list[dict], need: str) -> None:
    """A file that yields no problem at all is the wrong file, not a file of bad rows: say so (exit 2 in the CLI)."""
    from collections import Counter

    if not rejects:
        raise InputError(f"problem file {path}: holds no rows; problem files are {FILE_FORMATS}")
    reasons = Counter(r["reason"].split(":")[0] for r in rejects)
    first = rejects[0]["reason"]
    raise InputError(f"problem file {path}: none of its {len(rejects)} rows is a problem "
                     f"({', '.join(f'{k}: {v}' for k, v in reasons.most_common())}; first: {first}); {need}. "
                     f"Problem files are {FILE_FORMATS}")


def load_problems(spec: str, synthetic: SyntheticConfig | None = None, limit: int | None = None,
                  mapping: dict[str, str] | None = None, kind: str = "auto") -> LoadResult:
    """Problems from a source name or a path (see the module docstring)."""
    name, _, split = spec.partition(":")
    root = data_root()

    def need(p: Path) -> Path:
        if not p.exists():
            raise MissingInput(f"source {spec!r} reads {p}, which does not exist; set STEPRAY_DATA to the "
                                    f"folder holding gsm8k/, math500/, code/ (see README, 'Data')")
        return p

    if name == "synthetic":
        cfg = synthetic or SyntheticConfig()
        result = LoadResult(synthetic_problems(cfg), [])
    elif name == "gsm8k":
        split = split or "test"
        if split not in ("train", "test"):
            raise InputError(f"source {spec!r}: GSM8K splits are train and test")
        result = load_gsm8k(need(root / "gsm8k" / f"{split}.jsonl"), split)
    elif name == "math500":
        result = load_math500(need(root / "math500" / "test.jsonl"))
    elif name == "humaneval":
        result = load_file(need(root / "code" / "HumanEval.jsonl"), kind="code")
        for p in result.problems:
            p["source"] = "humaneval"
    elif spec.endswith(".parquet") and not mapping and _is_problem_table(Path(spec)):
        # Problem rows as stepray writes them (a run's problems.parquet): read as they are, ground truth included
        rows = schema.check_table(inputs.read_parquet(spec, "problem file"), "problem", where=spec).to_pylist()
        result = LoadResult(rows, [])
    else:
        result = load_file(spec, mapping=mapping, kind=kind)
    if limit is not None:
        result.problems = result.problems[:limit]
    return result


def _is_problem_table(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path).names)
    except (OSError, ValueError):
        return False  # load_file names the unreadable file
    return {"id", "question", "answer", "kind", "quantities", "ref_steps"} <= names


def write_rejects(rejects: list[dict], path: str | Path) -> None:
    """Rejected rows as JSON lines (source, line, reason, row), so nothing is lost."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rejects:
            f.write(json.dumps(r, default=str) + "\n")

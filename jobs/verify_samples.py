"""Grade a JSONL file of samples with the automatic verifier.

    stepray verify FILE.jsonl --kind math|numeric|code [--out OUT.jsonl] [--timeout S] [--workers N]
    python -m jobs.verify_samples FILE.jsonl --kind numeric

Rows. math / numeric: `pred` (a completion or a bare answer) and `gold` (an answer, or a GSM8K solution ending in
"#### N"). code: `program` (the full program; HumanEval: prompt + completion) or `pred` (a completion whose last
```python block is run), and `tests`: Python statements such as MBPP's asserts, or HumanEval's `check(candidate)`
with an `entry_point`. A row's own `kind` field overrides --kind.

Output: every input line becomes one JSON line, in order, on stdout (or --out), with its fields kept (an `id`
passes through) and `correct` (bool), `reason`, `answer`, `answer_method` and `detail` added (see
pipelines/verify/ for the reasons). A line that is not UTF-8 or not a JSON object is written as
{"line": N, "correct": false, "reason": "unreadable", "detail": ...} and reported on stderr with its line number; a
row whose text UTF-8 cannot encode (a lone surrogate) is graded and written with JSON escapes. Progress and a
summary (counts per reason, accuracy, rows/s) go to stderr. Exit status 0; 2 (one line on stderr, nothing graded)
when FILE is missing, a folder, another format, or holds no JSON object at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines import inputs
from pipelines.config import InputError
from pipelines.runtime import cli_main
from pipelines.verify import KINDS, verify_row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stepray verify", description=__doc__.split("\n\n")[0])
    p.add_argument("file", metavar="FILE", type=Path, help="JSONL rows with pred/gold (or program/tests for code)")
    p.add_argument("--kind", required=True, choices=KINDS, help="how to grade rows that carry no `kind` field")
    p.add_argument("--out", type=Path, default=None, help="write the graded rows here instead of stdout")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per row (default: 5 for math/numeric equivalence, 10 for running code)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="rows graded at once (threads; each math thread has its own math-verify process)")
    return p.parse_args(argv)


def grade_line(number: int, line: str | None, why: str, kind: str, timeout: float | None) -> tuple[dict, str | None]:
    """(output row, error message or None) for one input line (None with `why`: the line could not be decoded)."""
    if line is None:
        return {"line": number, "correct": False, "reason": "unreadable", "detail": why}, why
    try:
        row = json.loads(line)
    except ValueError as e:
        return {"line": number, "correct": False, "reason": "unreadable", "detail": f"not JSON: {e}"}, str(e)
    if not isinstance(row, dict):
        msg = f"a JSON {type(row).__name__}, not an object"
        return {"line": number, "correct": False, "reason": "unreadable", "detail": msg}, msg
    fields = {
        "kind": row.get("kind", kind),
        "completion": row.get("pred"),
        "gold": row.get("gold"),
        "program": row.get("program"),
        "tests": row.get("tests"),
        "entry_point": row.get("entry_point"),
    }
    timeouts = {} if timeout is None else {"math_timeout_s": timeout, "code_timeout_s": timeout}
    v = verify_row(fields, **timeouts)
    return {**row, "correct": v.correct, "reason": v.reason, "answer": v.answer, "answer_method": v.method,
            "detail": v.detail}, None


def read_lines(path: Path) -> list[tuple[int, str | None, str]]:
    """(line number, text or None, why not) for every non-blank line; a line that is not UTF-8 is kept as a row
    error, so it gets a verdict like any other row."""
    path = inputs.input_file(path, "verify input", "give a JSON lines file (one object per line)")
    if path.suffix.lower() in (".parquet", ".csv", ".tsv", ".json"):
        raise InputError(f"verify input {path}: stepray verify reads JSON lines (.jsonl, one object per line with "
                         f"pred/gold, or program/tests for code), not {path.suffix} files")
    return list(inputs.text_lines(path))


def write_row(out, row: dict) -> None:
    """One verdict line; a row holding text UTF-8 cannot encode (a lone surrogate) is written with JSON escapes."""
    text = json.dumps(row, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(row)  # \udXXX escapes: the same row, readable back by any JSON parser
    out.write(text + "\n")


@cli_main("stepray verify")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lines = read_lines(args.file)
    if lines and not any(text is not None and text.lstrip().startswith("{") for _, text, _ in lines):
        raise InputError(f"verify input {args.file}: none of its {len(lines)} lines is a JSON object; stepray verify "
                         f"reads JSON lines (one object per line with pred/gold, or program/tests for code)")
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    reasons: Counter[str] = Counter()
    correct = 0
    start = last_report = time.monotonic()
    try:
        with ThreadPoolExecutor(max(1, args.workers)) as pool:
            results = pool.map(lambda item: grade_line(item[0], item[1], item[2], args.kind, args.timeout), lines)
            for done, ((number, _, _), (row, error)) in enumerate(zip(lines, results), 1):
                if error is not None:
                    print(f"stepray verify: {args.file}:{number}: unreadable row ({error})", file=sys.stderr)
                write_row(out, row)
                reasons[row["reason"]] += 1
                correct += bool(row["correct"])
                now = time.monotonic()
                if now - last_report > 10:
                    rate = done / (now - start)
                    print(f"graded {done}/{len(lines)} rows, {rate:.1f} rows/s, "
                          f"ETA {(len(lines) - done) / rate:.0f}s", file=sys.stderr)
                    last_report = now
    finally:
        if args.out:
            out.close()
    elapsed = time.monotonic() - start
    total = sum(reasons.values())
    print(f"{args.file}: {total} rows, {correct} correct ({correct / max(total, 1):.1%}), "
          f"{total / max(elapsed, 1e-9):.1f} rows/s", file=sys.stderr)
    for reason, count in reasons.most_common():
        print(f"  {reason:24s} {count}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

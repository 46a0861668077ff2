"""Verification throughput (rows/s) for numeric, math and code rows, on this machine's cores.

    python -m benchmarks.verify_throughput [--workers 2] [--data ../shared/data]

Workloads (real data, nothing synthetic):
  numeric  GSM8K test: each reference solution graded against its own "#### N" and against N + 1 (2 x 1319 rows)
  math     MATH-500: each reference solution (its \\boxed answer) against the `answer` field given as
           \\boxed{answer} (so no row takes the identical-text shortcut), and a wrong variant whose boxed answer has
           " + 1" appended (2 x 500 rows; every row goes through math-verify in its worker processes)
  math-verify cases  the library's own 270 test cases through math_equal (the hard, slow tail)
  code     HumanEval: all 164 canonical solutions in the sandbox (each must pass), plus the first 20 with the body
           replaced by `return None` (each must fail)
Rows are graded by `verify_row` on a thread pool of --workers threads (one math-verify process per thread, one
sandbox process per code row), the way `stepray verify` runs. Each workload is preceded by a warm-up row so that
starting the math-verify workers is not counted. Prints one line per workload and checks the verdicts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines.sandbox import sandbox_mechanisms
from pipelines.verify import Verdict, math_equal, verify_row

DEFAULT_DATA = Path(os.environ.get("STEPRAY_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def numeric_rows(data: Path) -> tuple[list[dict], list[bool]]:
    rows, expected = [], []
    for r in _jsonl(data / "gsm8k" / "test.jsonl"):
        gold = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        rows += [{"kind": "numeric", "completion": r["answer"], "gold": gold},
                 {"kind": "numeric", "completion": r["answer"], "gold": str(int(gold) + 1)}]
        expected += [True, False]
    return rows, expected


def math_rows(data: Path) -> tuple[list[dict], list[bool]]:
    rows, expected = [], []
    for r in _jsonl(data / "math500" / "test.jsonl"):
        wrong = f"\\boxed{{{r['answer']} + 1}}"
        gold = f"\\boxed{{{r['answer']}}}"
        rows += [{"kind": "math", "completion": r["solution"], "gold": gold},
                 {"kind": "math", "completion": wrong, "gold": gold}]
        expected += [True, False]
    return rows, expected


def code_rows(data: Path) -> tuple[list[dict], list[bool]]:
    problems = _jsonl(data / "code" / "HumanEval.jsonl")
    rows = [{"kind": "code", "program": p["prompt"] + p["canonical_solution"], "tests": p["test"],
             "entry_point": p["entry_point"]} for p in problems]
    broken = [{"kind": "code", "program": p["prompt"] + "    return None\n", "tests": p["test"],
               "entry_point": p["entry_point"]} for p in problems[:20]]
    return rows + broken, [True] * len(rows) + [False] * len(broken)


def run(name: str, rows: list[dict], workers: int) -> tuple[list[Verdict], float]:
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(verify_row, rows[:workers]))  # warm-up: start the per-thread math-verify workers
        start = time.perf_counter()
        verdicts = list(pool.map(verify_row, rows))
        elapsed = time.perf_counter() - start
    return verdicts, elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"data folder {args.data} not found (pass --data or set STEPRAY_DATA)", file=sys.stderr)
        return 2
    print(f"cores: {os.cpu_count()}, workers: {args.workers}, sandbox: {', '.join(sandbox_mechanisms())}")
    failures = 0
    for name, build in (("numeric", numeric_rows), ("math", math_rows), ("code", code_rows)):
        rows, expected = build(args.data)
        verdicts, elapsed = run(name, rows, args.workers)
        agree = sum(v.correct == e for v, e in zip(verdicts, expected))
        reasons: dict[str, int] = {}
        for v in verdicts:
            reasons[v.reason] = reasons.get(v.reason, 0) + 1
        print(f"{name:8s} {len(rows):5d} rows in {elapsed:6.2f}s = {len(rows) / elapsed:7.1f} rows/s; "
              f"verdict as expected {agree}/{len(rows)}; reasons {reasons}")
        misses = [(i, rows[i].get("gold", rows[i].get("entry_point")), v) for i, (v, e)
                  in enumerate(zip(verdicts, expected)) if v.correct != e]
        for i, gold, v in misses[:5]:
            print(f"    row {i} gold {gold!r:.40}: {v.reason} answer={v.answer!r:.60} {v.detail[:80]}")
        failures += name == "code" and bool(misses)  # every canonical HumanEval solution must pass
    # the library's own cases: the slow tail of math-verify, single-threaded
    cases = _jsonl(args.data / "math_verify" / "math_verify_test_cases.jsonl")
    start = time.perf_counter()
    for c in cases:
        o = c["options"]
        opts = {} if not o else {"match_types": o["match_types"], "boxed_match_priority": 0,
                                 "float_rounding": o["precision"], "strict": o["strict"],
                                 "allow_set_relation_comp": o["allow_set_relation_comp"]}
        math_equal(c["pred"], c["gold"], timeout_s=10, **opts)
    elapsed = time.perf_counter() - start
    print(f"math-verify cases {len(cases)} rows in {elapsed:6.2f}s = {len(cases) / elapsed:7.1f} rows/s (1 thread)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

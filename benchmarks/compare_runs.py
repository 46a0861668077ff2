"""Two evaluations of different generators on the same problems, strategy by strategy, paired over problems.

    python -m benchmarks.compare_runs BEFORE AFTER [--strategies greedy@1,majority@4] [--json out.json]

BEFORE and AFTER are `stepray evaluate` output folders (their traces.jsonl: one record per problem x strategy x
budget) run on the same held-out problems, e.g. a round's SFT generator and the same recipe with one more kind of
training row. For each strategy@budget both ran it prints the accuracy of each, the paired difference AFTER - BEFORE
over the problems both answered with its 95% bootstrap interval (`pipelines.stats.paired_gain`), and the generated
tokens per problem of each (what the difference cost). With backtracking generators (stream of search) it also
counts the solutions that backtrack and how many of those end right. Nothing is re-run: it reads the records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.verifier_votes import load  # a run's traces.jsonl (a folder without it is refused by name)


def backtracks_in(text: str) -> bool:
    """Whether a solution uses a backtrack cue the stream-of-search rows teach (pipelines.train.data)."""
    from pipelines.train.data import BACKTRACK, BACKTRACK_TO, DEAD_END, DEAD_END_TO

    # each cue up to its "Back to" ("That step is wrong. Back to"): the phrase alone could be a model's own words
    return any(c[:c.index("Back to") + len("Back to")] in text
               for c in (BACKTRACK, DEAD_END, BACKTRACK_TO, DEAD_END_TO))


def compare(before: list[dict], after: list[dict], only: list[str] | None = None) -> list[dict]:
    """One row per strategy@budget present in both runs (in BEFORE's order), or those in `only`."""
    from pipelines.evaluate import hits_by_strategy
    from pipelines.stats import paired_gain

    hb, ha = hits_by_strategy(before), hits_by_strategy(after)
    keys = only or [k for k in hb if k in ha]
    missing = [k for k in keys if k not in hb or k not in ha]
    if missing:
        raise SystemExit(f"not in both runs: {', '.join(missing)} (BEFORE has {sorted(hb)}, AFTER {sorted(ha)})")

    def of(records: list[dict], key: str, shared: set[str]) -> list[dict]:
        return [r for r in records if f"{r['strategy']}@{r['budget']}" == key and r["problem_id"] in shared]

    rows = []
    for key in keys:
        shared = set(hb[key]) & set(ha[key])  # every column over the same problems
        if not shared:
            raise SystemExit(f"{key}: no problem is in both runs; compare evaluations of the same problems")
        g = paired_gain(hb[key], ha[key])
        rb, ra = of(before, key, shared), of(after, key, shared)
        bt = [r for r in ra if backtracks_in(r.get("completion") or "")]
        rows.append({"strategy": key, "problems": g["n"], "before": g["before"], "after": g["after"],
                     "gain": g["gain"], "ci": list(g["ci"]), "excludes_zero": g["excludes_zero"],
                     "tokens_before": sum(r["tokens_generated"] for r in rb) / len(rb),
                     "tokens_after": sum(r["tokens_generated"] for r in ra) / len(ra),
                     "backtracking_after": (len(bt), sum(bool(r["correct"]) for r in bt))})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| strategy | problems | before | after | after - before [95% CI] | tokens / problem (before, after) "
             "| after's solutions that backtrack (right) |", "|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        lo, hi = r["ci"]
        n_bt, right_bt = r["backtracking_after"]
        lines.append(f"| {r['strategy']} | {r['problems']} | {r['before']:.3f} | {r['after']:.3f} | "
                     f"{r['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {r['tokens_before']:.0f}, {r['tokens_after']:.0f} | "
                     f"{n_bt} ({right_bt}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", help="`stepray evaluate` output folder of the reference generator")
    ap.add_argument("after", help="`stepray evaluate` output folder of the generator compared with it")
    ap.add_argument("--strategies", default="", help="comma-separated strategy@budget keys (default: all in both)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.strategies.split(",") if s.strip()] or None
    rows = compare(load(args.before), load(args.after), only)
    print(f"before: {args.before}\nafter:  {args.after}\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Print or write problems from a source.

    stepray problems --source synthetic --n 20 --steps 2 [--seed 0] [--out problems.jsonl]
    stepray problems --source gsm8k --limit 5
    python -m jobs.list_problems ...

Without --out, prints one JSON object per problem. With --out (.jsonl or .parquet) writes them, and writes
rejected rows next to it (<out>.rejects.jsonl). Always prints the counts (problems, rejected, reasons) to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines import schema
from pipelines.problems import SyntheticConfig, load_problems, write_rejects
from pipelines.runtime import cli_main


@cli_main("stepray problems")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stepray problems", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="synthetic", help="synthetic | gsm8k | gsm8k:train | math500 | humaneval | FILE")
    ap.add_argument("--n", type=int, default=20, help="synthetic: how many problems")
    ap.add_argument("--steps", default="1-2", help="synthetic: steps per problem, N or MIN-MAX (1..5)")
    ap.add_argument("--ops", default="+,-,*,/", help="synthetic: operations, comma separated")
    ap.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    ap.add_argument("--limit", type=int, help="first N problems only")
    ap.add_argument("--map", default="", help="file sources: column mapping, e.g. question=problem,answer=target")
    ap.add_argument("--out", help="write to this .jsonl or .parquet instead of printing")
    args = ap.parse_args(argv)
    lo, _, hi = args.steps.partition("-")
    try:
        syn = SyntheticConfig(n=args.n, seed=args.seed, min_steps=int(lo), max_steps=int(hi or lo),
                              ops=tuple(o.strip() for o in args.ops.split(",") if o.strip()))
        mapping = dict(kv.split("=", 1) for kv in args.map.split(",") if kv) if args.map else None
        result = load_problems(args.source, synthetic=syn, limit=args.limit, mapping=mapping)
    except (ValueError, FileNotFoundError) as e:
        print(f"stepray problems: {e}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(schema.to_table(result.problems, "problem"), out)
        else:
            out.write_text("".join(json.dumps(p) + "\n" for p in result.problems))
        write_rejects(result.rejects, str(out) + ".rejects.jsonl")
    else:
        for p in result.problems:
            print(json.dumps(p))
    print(f"[problems] {args.source}: {result.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

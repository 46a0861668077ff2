"""Run the project's benchmarks in one go and write their ratios as JSON and a markdown table.

    stepray bench [--only generation,annotation,training,serving,verify] [--quick] [--out runs/benchmarks]
    python -m jobs.benchmark ...            (make bench)

Each benchmark is its own module under benchmarks/ (run alone with `python -m benchmarks.<name> --help`) and
measures its comparison side by side in one run: generation (pipeline vs raw vLLM), annotation (naive vs binary
vs binary+reuse vs early stop), training (Ray Train vs a plain PyTorch loop), serving (endpoint vs direct best-of-4,
plus a load test) and verification throughput. They run one after another (2 cores: never two at once). Writes
<out>/latest.json, <out>/latest.md and each benchmark's log; docs/results/bench.md holds the latest table.
`--quick` runs each at a smoke-test size (numbers not meaningful; checks that everything runs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import BENCHMARKS, machine, write_table

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stepray bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma separated, from {list(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes (numbers not meaningful)")
    ap.add_argument("--out", default="runs/benchmarks")
    ap.add_argument("--from-json", help="only re-write the table from this latest.json (no benchmark runs)")
    args = ap.parse_args(argv)
    if args.from_json:
        return write_table(json.loads(Path(args.from_json).read_text()), Path(args.from_json).parent)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        print(f"stepray bench: unknown benchmark(s) {bad}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in names:
        module, full, quick = BENCHMARKS[name]
        cmd = [sys.executable, "-m", module, *(quick if args.quick else full)]
        if name != "verify":
            cmd += ["--json", str(out / f"{name}.json")]
        print(f"[bench] {name}: {' '.join(cmd[2:])}", flush=True)
        t0 = time.time()
        with open(out / f"{name}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)).returncode
        wall = time.time() - t0
        text = (out / f"{name}.log").read_text()
        if rc != 0:
            results[name] = {"error": f"exit {rc}; see {out / (name + '.log')}", "wall_s": wall}
            print(f"[bench] {name} FAILED (exit {rc}), log: {out / (name + '.log')}", flush=True)
            continue
        if name == "verify":
            res = {m.group(1): float(m.group(2)) for m in
                   re.finditer(r"^(numeric|math|code)\s+\d+ rows in\s+[\d.]+s =\s+([\d.]+) rows/s", text, re.M)}
        else:
            res = json.loads((out / f"{name}.json").read_text())
        res["wall_s"] = wall
        results[name] = res
        print(f"[bench] {name} done in {wall:.0f}s", flush=True)

    doc = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "results": results}
    (out / "latest.json").write_text(json.dumps(doc, indent=1, default=str))
    return write_table(doc, out)


if __name__ == "__main__":
    sys.exit(main())

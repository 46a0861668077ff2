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
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

# name -> (module, full-size args, quick args); every module accepts --json PATH except verify (parsed from stdout)
BENCHMARKS = {
    "generation": ("benchmarks.generation_vs_raw", ["--problems", "48", "--n", "4", "--max-tokens", "96"],
                   ["--problems", "6", "--n", "2", "--max-tokens", "16", "--model", "tiny"]),
    # the PRM training mix (half verified) at K=16: at K=8 naive agrees with itself on only ~0.84 of steps, below the
    # 0.90 agreement the goal asks for, so agreement is not measurable there (README: the K=8 runs)
    "annotation": ("benchmarks.annotation_methods",
                   ["--model", "smollm2", "--problems", "192", "--samples-per-problem", "8", "--select", "balanced",
                    "--limit", "48", "--rollouts", "16", "--variants",
                    "naive,naive+reuse,binary,binary+reuse,scan+reuse,scan+reuse+early_stop,"
                    "scan+reuse+early_stop+grow"],
                   ["--model", "tiny", "--problems", "2", "--samples-per-problem", "1", "--rollouts", "2",
                    "--long-problems", "0", "--no-repeat-naive"]),
    "training": ("benchmarks.train_throughput", [],
                 ["--model", "tiny", "--rows", "8", "--steps", "3", "--warmup", "1", "--batch", "2"]),
    "serving": ("benchmarks.serve_latency", ["--requests", "8", "--max-tokens", "96", "--load-requests", "6",
                                             "--load-time-s", "90"],
                ["--model", "tiny", "--requests", "2", "--max-tokens", "16", "--load-requests", "2",
                 "--load-time-s", "30"]),
    "verify": ("benchmarks.verify_throughput", [], []),
}


def _machine() -> str:
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs{mem}, {platform.system()}, no GPU" \
        if not os.environ.get("CUDA_VISIBLE_DEVICES") else f"{os.cpu_count()} CPUs, GPU"


def _summary(name: str, res: dict) -> tuple[str, str, str]:
    """(measured, goal, detail) for the markdown table."""
    if name == "generation":
        return (f"{res['ratio']:.2f}x raw", ">= 0.90x",
                f"pipeline {res['pipeline_tokens_per_s']:.0f} vs raw {res['raw_tokens_per_s']:.0f} tokens/s")
    if name == "serving":
        worst = max((c["p99_s"] for c in res.get("load", [])), default=float("nan"))
        errs = sum(c.get("5xx", 0) for c in res.get("load", []))
        return (f"{res['ratio']:.2f}x direct", "<= 1.15x",
                f"best-of-4 median {res['endpoint_median_s']:.2f}s vs {res['direct_median_s']:.2f}s; load test worst "
                f"p99 {worst:.2f}s, 5xx {errs}")
    if name == "training":  # benchmarks.train_throughput: {"plain": {...}, "ray_train": {layout: {..., "ratio"}}}
        layouts = res["ray_train"]
        best_name, best = max(layouts.items(), key=lambda kv: kv[1]["ratio"])
        return (f"{best['ratio']:.2f}x plain", ">= 0.90x",
                f"Ray Train {best_name} {best['tokens_per_s']:.0f} vs plain {res['plain']['tokens_per_s']:.0f} "
                "tokens/s; " + ", ".join(f"{n} {r['ratio']:.2f}x" for n, r in layouts.items() if n != best_name)
                + (f"; plain runs before/after differ by {100 * res['plain']['spread']:.0f}%"
                   if "spread" in res["plain"] else ""))
    if name == "annotation":  # benchmarks.annotation_methods: {"part1": [variant rows], "part2": [...]}
        # the cheaper plans; naive's own rows (the reference, its early-stop twin's is kept, the repeat = noise floor)
        rows = [r for r in res["part1"] if r["variant"] not in ("naive", "naive (repeat)")
                and "token_reduction_vs_naive" in r]
        # naive+reuse is the second reference (naive's budget plus the sample itself), never the plan to report
        plans = [r for r in rows if r["variant"] != "naive+reuse"] or rows
        floor = next((r for r in res["part1"] if r["variant"] == "naive (repeat)"), None)
        if not rows:
            return ("no samples labelled", ">= 4x at >= 0.90 agreement", "")
        # the best variant that keeps agreement >= 0.90; if none does, the one that comes closest
        good = [r for r in plans if r.get("step_agreement", 0) >= 0.9]
        b = max(good or plans, key=lambda r: r["token_reduction_vs_naive"] if good else r.get("step_agreement", 0))
        detail = "; ".join(f"{r['variant']} {r['token_reduction_vs_naive']:.2f}x at {r.get('step_agreement', 0):.3f}"
                           for r in rows)
        if floor:
            detail += f"; naive vs itself {floor.get('step_agreement', 0):.3f} (noise floor)"
        repro = [r for r in rows if "vs_repeat" in r]
        if repro:  # agreement on the steps naive labels the same in both runs (annotation_methods.fmt_repeat)
            detail += "; on naive's reproducible steps: " + ", ".join(
                f"{r['variant']} {r['vs_repeat']['on_reproducible']:.3f} "
                f"[{r['vs_repeat']['on_reproducible_ci'][0]:.3f}, {r['vs_repeat']['on_reproducible_ci'][1]:.3f}]"
                for r in repro)
        part2 = {r["variant"]: r["wall_s"] for r in res.get("part2") or []}
        if len(part2) == 2:
            detail += "; long prefixes: " + ", ".join(f"{k} {v:.1f}s" for k, v in part2.items())
        return (f"{b['token_reduction_vs_naive']:.2f}x fewer tokens/step at {b.get('step_agreement', 0):.3f} "
                f"agreement ({b['variant']})", ">= 4x at >= 0.90 agreement", detail)
    if name == "verify":
        return ("; ".join(f"{k} {v:.0f} rows/s" for k, v in res.items() if isinstance(v, float) and k != "wall_s"),
                "-", "")
    return ("", "", "")


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

    doc = {"machine": _machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "results": results}
    (out / "latest.json").write_text(json.dumps(doc, indent=1, default=str))
    return write_table(doc, out)


def write_table(doc: dict, out: Path) -> int:
    """latest.md from a latest.json document; prints it. 1 when a benchmark failed."""
    results = doc["results"]
    lines = [f"Benchmarks ({'quick smoke sizes, not meaningful' if doc['quick'] else 'full size'}), {doc['date']}, "
             f"{doc['machine']}. Reproduce: `make bench` (or `python -m jobs.benchmark`).", "",
             "| benchmark | measured | goal | detail | wall |", "|---|---|---|---|---|"]
    for name, res in results.items():
        if "error" in res:
            lines.append(f"| {name} | failed | | {res['error']} | {res['wall_s']:.0f}s |")
            continue
        try:
            measured, goal, detail = _summary(name, res)
        except (KeyError, TypeError, ValueError) as e:
            measured, goal, detail = "see json", "", f"({e!r})"
        lines.append(f"| {name} | {measured} | {goal} | {detail} | {res['wall_s']:.0f}s |")
    (out / "latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

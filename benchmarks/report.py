"""The benchmarks `stepray bench` runs (name -> module and arguments), the machine line, and the markdown table of
their ratios (one summary line per benchmark, read from each one's JSON report)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

# name -> (module, full-size args, quick args); every module accepts --json PATH except verify (parsed from stdout)
BENCHMARKS = {
    # the demo's sampling (n=8, 128 tokens) on 96 problems: two Ray Data blocks, so the engine's calls overlap; the
    # default engine only, raw and pipeline alternating twice (single runs of one side differ by up to 10% here)
    "generation": ("benchmarks.generation_vs_raw", ["--problems", "96", "--n", "8", "--max-tokens", "128",
                                                    "--engines", "async", "--repeats", "2"],
                   ["--problems", "6", "--n", "2", "--max-tokens", "16", "--model", "tiny", "--engines", "async",
                    "--repeats", "1"]),
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


def machine() -> str:
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs{mem}, {platform.system()}, no GPU" \
        if not os.environ.get("CUDA_VISIBLE_DEVICES") else f"{os.cpu_count()} CPUs, GPU"


def _pairs(run: dict) -> str:
    """Each alternating pair's own ratio (' (pairs 0.89, 0.95)') where the run had repeats; '' for older JSON."""
    pairs = run.get("pair_ratios") or []
    return f" (pairs {', '.join(f'{x:.2f}' for x in pairs)})" if pairs else ""


def summary_line(name: str, res: dict) -> tuple[str, str, str]:
    """(measured, goal, detail) for the markdown table."""
    if name == "generation":
        engines = res.get("engines") or {}
        return (f"{res['ratio']:.2f}x raw", ">= 0.95x",
                f"pipeline {res['pipeline_tokens_per_s']:.0f} vs raw {res['raw_tokens_per_s']:.0f} tokens/s"
                + "".join(f"; {e} engine {r['ratio']:.2f}x{_pairs(r)}" for e, r in engines.items()))
    if name == "serving":
        worst = max((c["p99_s"] for c in res.get("load", [])), default=float("nan"))
        errs = sum(c.get("5xx", 0) for c in res.get("load", []))
        return (f"{res['ratio']:.2f}x direct", "<= 1.10x",
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
            measured, goal, detail = summary_line(name, res)
        except (KeyError, TypeError, ValueError) as e:
            measured, goal, detail = "see json", "", f"({e!r})"
        lines.append(f"| {name} | {measured} | {goal} | {detail} | {res['wall_s']:.0f}s |")
    (out / "latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any("error" in r for r in results.values()) else 0

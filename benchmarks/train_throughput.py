"""Training throughput: Ray Train (TorchTrainer) against a plain PyTorch loop, same model, data and cores.

    python -m benchmarks.train_throughput [--model smollm2] [--rows 64] [--steps 12] [--batch 8] [--workers 2]
                                          [--warmup 2] [--plain-runs 2] [--json out.json]

One run does all, one after the other on the same machine (plain, Ray Train, plain again), on the same
SFT token rows (synthetic problems' reference solutions as completions, prompts rendered with the chat template)
and the same global batch:
1. Ray Train, two layouts of the same cores: `--workers` CPU workers x 1 thread (DDP over gloo: every step
   all-reduces the full gradient, 540 MB for SmolLM2 in fp32) and 1 worker x `--workers` threads (no all-reduce),
   each with the real worker loop (Ray Data shard iterators, `ray.train.report`), no checkpoint but the final one
   (deleted afterwards unless `--keep`);
2. plain: one process, torch threads = `--workers` (the same cores), AdamW, `compute_loss` and `collate_batch`
   from pipelines/train/, `--steps` optimizer steps; with `--plain-runs 2` (default) once before Ray Train and once
   after, the reference being the mean of the two (their spread is printed: it is the drift of the machine).
Tokens counted: non-padding input tokens of every optimizer step. Throughput is steady state: the first `--warmup`
steps of each side are left out (first-batch and allocator costs). Ray Train reports metrics every `--warmup`
steps (so its first window is exactly the warmup); its windows include those report calls and the DDP all-reduce.
Startup (worker group, model load) is printed apart. Prints the rates and the ratios (goal: Ray Train >= 0.9x).
Allocator: with `--malloc tuned` (default) the Ray Train workers start with `pipelines.train.MALLOC_ENV`
(`tune_malloc`, the pipeline's default) and this process re-executes itself under the same settings, so the plain
loop gets them too and the comparison isolates Ray Train; `--malloc default` runs both sides with glibc as it is
(with `tuned`, the local Ray cluster started from this process inherits the settings too).
On a shared machine compare only numbers from one run: other processes change every rate, and multi-threaded
torch suffers most (an OpenMP thread that loses its core stalls the others at every barrier).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path


def token_rows(model_path: str, n_rows: int, cfg) -> list[dict]:
    from transformers import AutoTokenizer

    from pipelines.problems import SyntheticConfig, synthetic_problems
    from pipelines.prompts import join_steps, render
    from pipelines.train import tokenize_examples

    tok = AutoTokenizer.from_pretrained(model_path)
    problems = synthetic_problems(SyntheticConfig(n=n_rows, seed=7, min_steps=1, max_steps=3))
    examples = [{"sample_id": p["id"], "prompt": render(tok, p["question"], p["kind"], cfg.prompt),
                 "completion": join_steps(p["ref_steps"], "lines") + f"The answer is {p['answer']}.", "weight": 1.0}
                for p in problems]
    rows, rejects = tokenize_examples("sft", examples, tok, cfg)
    if rejects:
        raise RuntimeError(f"{len(rejects)} rows did not fit max_len={cfg.max_len}")
    random.Random(cfg.seed).shuffle(rows)
    return rows


def run_plain(cfg, model_path: str, rows: list[dict], steps: int, batch: int, threads: int, warmup: int) -> dict:
    import torch

    from pipelines.train import build_model, collate_batch, compute_loss, resolve_precision

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    # the workers' precision, decided as they decide it (bf16 autocast where the CPU computes bf16 natively): a plain
    # loop in fp32 against bf16 workers measured the precision, not Ray Train (1.44x "for" Ray Train on this machine)
    precision = resolve_precision(cfg.precision, torch.device("cpu"))
    autocast = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": precision == "bf16"}
    t0 = time.time()
    model = build_model("sft", model_path, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    startup = time.time() - t0
    tokens, t_start = 0, None
    for step in range(steps):
        if step == warmup:
            t_start, tokens = time.time(), 0
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        b = collate_batch("sft", {k: [r[k] for r in chunk] for k in chunk[0]}, 0)
        with torch.autocast(**autocast):  # the loss itself is taken in fp32, as in the workers
            loss = compute_loss("sft", model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    wall = time.time() - t_start
    return {"tokens_per_s": tokens / wall, "tokens": tokens, "seconds": wall, "startup_s": startup,
            "final_loss": float(loss.item()), "precision": precision}


def run_ray(cfg, model_path: str, rows: list[dict], warmup: int, keep: bool = False) -> dict:
    from pipelines.train import build_trainer

    t0 = time.time()
    result = build_trainer(cfg, rows, model_path, model_path).fit()
    wall = time.time() - t0
    with result.checkpoint.as_directory() as d:
        history = json.loads((Path(d) / "history.json").read_text())
    if not keep:  # a benchmark, not a training: its final checkpoint (model + optimizer, ~1 GB) is not wanted
        shutil.rmtree(Path(cfg.resolved_storage()) / cfg.resolved_run_name(), ignore_errors=True)
    steady = [h for h in history if h["step"] > warmup]
    tokens = sum(h["window_tokens"] for h in steady)
    seconds = sum(h["window_s"] for h in steady)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
            "report_s": sum(h.get("report_s", 0.0) for h in steady),  # inside `seconds`: ray.train.report calls
            "data_s": sum(h.get("data_s", 0.0) for h in steady),  # inside `seconds`: waiting on the Ray Data shard
            "startup_and_save_s": wall - sum(h["window_s"] for h in history), "final_loss": history[-1]["loss"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 | tiny | a path")
    ap.add_argument("--rows", type=int, default=64, help="distinct training rows")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps on each side")
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows per optimizer step)")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers (1 CPU, 1 thread each)")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the rate on each side")
    ap.add_argument("--out", default="runs/bench_train", help="Ray Train storage for this benchmark")
    ap.add_argument("--plain-runs", type=int, default=2, choices=(1, 2),
                    help="plain loop runs: 2 = before and after Ray Train (the reference is their mean), 1 = after")
    ap.add_argument("--malloc", default="tuned", choices=("tuned", "default"),
                    help="tuned: both sides under pipelines.train.MALLOC_ENV (the pipeline's default); default: "
                         "neither")
    ap.add_argument("--keep", action="store_true",
                    help="keep each layout's Ray Train run (checkpoint ~1 GB) under --out; default: delete it")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    from pipelines.train import MALLOC_ENV, malloc_tuned

    if args.malloc == "tuned" and not malloc_tuned():
        # glibc reads these at process start only: re-execute so the plain loop in this process runs under them
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.train_throughput", *argv],
                  {**os.environ, **MALLOC_ENV})
    if args.batch % args.workers:
        ap.error("--batch must be a multiple of --workers")
    if args.steps <= args.warmup or args.warmup < 1:
        ap.error("need 1 <= --warmup < --steps")

    from pipelines.config import load_config
    from pipelines.models import resolve_model
    from pipelines.runtime import init_ray
    from pipelines.train import TrainConfig

    model_path = str(resolve_model(args.model, prepare=True))
    cfg = load_config(TrainConfig, base={
        "task": "sft", "base": model_path, "out": args.out, "run_name": f"bench-{int(time.time())}",
        "lr": 2e-5, "max_len": 512, "num_workers": args.workers, "batch_size": args.batch // args.workers,
        "cpus_per_worker": 1, "threads": 1, "max_steps": args.steps, "log_every": args.warmup,
        "checkpoint_every": 10**6, "mlflow": False, "eval": {"enabled": False},
        "tune_malloc": args.malloc == "tuned"})
    rows = token_rows(model_path, args.rows, cfg)
    print(f"[bench] {args.model}: {len(rows)} rows, {sum(len(r['input_ids']) for r in rows)} tokens; "
          f"{args.steps} steps of global batch {args.batch}, warmup {args.warmup}; malloc {args.malloc}")

    plains_before = [run_plain(cfg, model_path, rows, args.steps, args.batch, args.workers, args.warmup)
                     for _ in range(args.plain_runs - 1)]  # before Ray starts; its memory is freed on return
    init_ray(num_cpus=args.workers)
    layouts = {f"{args.workers} workers x 1 thread (DDP)": cfg}
    if args.workers > 1:
        layouts[f"1 worker x {args.workers} threads"] = dataclasses.replace(
            cfg, num_workers=1, batch_size=args.batch, cpus_per_worker=args.workers, threads=args.workers,
            run_name=cfg.run_name + "-single")
    results = {}
    for name, layout in layouts.items():
        r = run_ray(layout, model_path, rows, args.warmup, args.keep)
        results[name] = r
        print(f"[bench] Ray Train, {name}: {r['tokens_per_s']:.1f} tokens/s ({r['tokens']} tokens in "
              f"{r['seconds']:.1f}s, of which {r['report_s']:.1f}s in ray.train.report and {r['data_s']:.1f}s "
              f"waiting on data; startup + final save "
              f"{r['startup_and_save_s']:.0f}s)")
    # the plain loop runs in this process, after Ray Train (its model and optimizer must not take memory from the
    # workers), and with --plain-runs 2 once more before it: the reference is the mean, and the two runs' spread
    # shows how far this machine drifts within one benchmark (single runs vary by ~10% here)
    plains = plains_before + [run_plain(cfg, model_path, rows, args.steps, args.batch, args.workers, args.warmup)]
    for i, p in enumerate(plains):
        print(f"[bench] plain PyTorch ({args.workers} threads, {p['precision']}), "
              f"{'before' if i < len(plains_before) else 'after'} "
              f"Ray Train: {p['tokens_per_s']:.1f} tokens/s ({p['tokens']} tokens in {p['seconds']:.1f}s)")
    rates = [p["tokens_per_s"] for p in plains]
    plain = {**plains[-1], "tokens_per_s": sum(rates) / len(rates), "runs": rates,
             "spread": (max(rates) - min(rates)) / (sum(rates) / len(rates))}
    for r in results.values():
        r["ratio"] = r["tokens_per_s"] / plain["tokens_per_s"]
    width = max(len(n) for n in results) + 12
    lines = [f"{'':<{width}}{'tokens/s':>10}{'x plain':>10}",
             f"{'plain PyTorch, ' + str(args.workers) + ' threads':<{width}}{plain['tokens_per_s']:>10.1f}{1:>10.2f}"]
    lines += [f"{'Ray Train, ' + n:<{width}}{r['tokens_per_s']:>10.1f}{r['ratio']:>10.2f}" for n, r in results.items()]
    print("\n" + "\n".join(lines) + "\n(goal: Ray Train >= 0.9x plain)" + (
        f"; the plain runs differ by {100 * plain['spread']:.0f}% of their mean" if len(rates) > 1 else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "plain": plain, "ray_train": results},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

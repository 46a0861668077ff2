"""One round of rejection-sampling self-training (ReST-EM's E and M steps), end to end, from one command.

    python -m benchmarks.sft_round [--problems 400] [--n 8] [--heldout 200] [--model smollm2] [--out runs/sft_round]
                                   [--epochs 2] [--lr 2e-5] [--batch 4] [--workers 2] [--max-tokens 128]
                                   [--phrasings 0]

What it runs, each step as the job a user would run (subprocesses, so each starts and stops its own local Ray):
1. E-step: `python -m jobs.generate_samples`: n samples at T=0.7 (up to --max-tokens new tokens) for each of
   --problems synthetic one-step problems (add, subtract, multiply; seed 0), graded by the verifier;
2. M-step: `python -m jobs.train_model sft`: keep at most 2 distinct verified samples per problem that ended with a
   stop, full fine-tuning in fp32 on Ray Train (--workers CPU workers x --batch rows = the global batch),
   loss on completion tokens, AdamW at --lr, --epochs epochs, from the base model (ReST-EM);
3. the job's evaluation hook: greedy accuracy on --heldout synthetic problems of the same kind from another seed
   (1; any held-out question found inside a training prompt is left out and counted), before and after, via vLLM.
The defaults reproduce the calibration run in docs/cpu-engine.md (400 problems, n=8, T=0.7, 128 tokens, k=2,
lr 2e-5, global batch 8, 2 epochs, 200 held-out problems; it went 14.5% -> 36.0% with a plain PyTorch loop).
--phrasings 1 draws every sentence from one phrasing (the calibration's problems had "a few sentence shapes", the
generator's default has 4-6 per sentence kind): the same pipeline on a narrower wording.
Prints the numbers of problems and samples, before/after greedy accuracy, and writes <out>/round.json.
A re-run with the same --out resumes: generation skips finished problems, training resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str]) -> None:
    print("[round] $ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"[round] step failed with exit code {rc}: {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=400, help="training problems (synthetic, one step, seed 0)")
    ap.add_argument("--n", type=int, default=8, help="samples per training problem")
    ap.add_argument("--heldout", type=int, default=200, help="held-out problems (same kind, seed 1)")
    ap.add_argument("--model", default="smollm2", help="smollm2 | tiny | a path")
    ap.add_argument("--out", default="runs/sft_round", help="output folder (gen/, sft/, round.json)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--batch", type=int, default=4, help="rows per worker per step")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train CPU workers")
    ap.add_argument("--max-tokens", type=int, default=128, help="most new tokens per sample and greedy answer")
    ap.add_argument("--phrasings", type=int, default=0,
                    help="phrasings per sentence kind (0 = all the generator has; 1 = one sentence shape, "
                         "the narrow wording of the calibration run), for training and held-out problems alike")
    ap.add_argument("--k", type=int, default=2, help="most verified samples kept per problem")
    args = ap.parse_args(argv)
    out = Path(args.out)
    py = sys.executable
    kind = ["synthetic.min_steps=1", "synthetic.max_steps=1", "synthetic.ops=+,-,*",
            f"synthetic.phrasings={args.phrasings}"]
    t0 = time.time()
    run([py, "-m", "jobs.generate_samples", "--problems", "synthetic", "--n", str(args.n), "--model", args.model,
         "--out", str(out / "gen"), f"synthetic.n={args.problems}", "synthetic.seed=0", *kind,
         "sampling.temperature=0.7", f"sampling.max_tokens={args.max_tokens}", "greedy=false"])
    t_gen = time.time() - t0
    run([py, "-m", "jobs.train_model", "sft", "--data", str(out / "gen"), "--base", args.model,
         "--out", str(out / "sft"), "--workers", str(args.workers), "--batch-size", str(args.batch),
         "--epochs", str(args.epochs), "--lr", str(args.lr), f"select.k={args.k}", "select.require_stop=true",
         "round_mode=rest_em", "checkpoint_every=25", "log_every=5", f"eval.limit={args.heldout}",
         f"eval.synthetic.n={args.heldout}", "eval.synthetic.seed=1",
         *[f"eval.{k}" for k in kind], f"eval.max_tokens={args.max_tokens}"])
    gen = json.loads((out / "gen" / "summary.json").read_text())
    sft = json.loads((out / "sft" / "summary.json").read_text())
    ev, tr = sft["eval"], sft["train"]
    kept_problems = sft["train_problems"]
    result = {
        "train_problems": gen["problems"], "samples": gen["samples"], "sample_accuracy": gen["sample_accuracy"],
        "pass_at_n": gen["pass_at_n"], "kept_samples": sft["train_rows"], "kept_problems": kept_problems,
        "not_selected": sft["not_selected"], "steps": tr["steps"], "train_tokens_per_s": tr["tokens_per_s"],
        "fit_s": tr["fit_s"], "loss": [tr["first_loss"], tr["final_loss"]],
        "heldout_problems": ev["heldout_problems"], "heldout_overlap_left_out": ev["overlap_left_out"],
        "greedy_before": ev["greedy_before"], "greedy_after": ev["greedy_after"],
        "generation_s": t_gen, "wall_s": time.time() - t0, "args": vars(args)}
    (out / "round.json").write_text(json.dumps(result, indent=1))
    print(f"\n[round] E-step: {result['samples']} samples on {result['train_problems']} problems "
          f"(sample accuracy {result['sample_accuracy']:.3f}, pass@{args.n} {result['pass_at_n']:.3f}); kept "
          f"{result['kept_samples']} verified samples from {kept_problems} problems")
    print(f"[round] M-step: {result['steps']} steps on Ray Train ({args.workers} workers), "
          f"{result['train_tokens_per_s']:.0f} tokens/s, loss {tr['first_loss']:.3f} -> {tr['final_loss']:.3f}")
    print(f"[round] greedy accuracy on {result['heldout_problems']} held-out problems: "
          f"{result['greedy_before']:.3f} before -> {result['greedy_after']:.3f} after "
          f"({result['wall_s'] / 60:.1f} min in all; {out / 'round.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

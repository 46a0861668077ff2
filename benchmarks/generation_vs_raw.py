"""Generation throughput: raw `vllm.LLM.generate` against the stepray pipeline (Ray Data + actor pool), same prompts.

    python -m benchmarks.generation_vs_raw [--problems 48] [--n 4] [--max-tokens 96] [--model smollm2] [--json out.json]

One run does both, one after the other on the same machine, with the same engine arguments, prompts, sampling
parameters and engine seed:
1. raw: a subprocess builds `vllm.LLM` and times `generate()` over all prompts (engine start excluded);
2. pipeline: `build_generation` (prompt formatting, VLLMGenerator in an ActorPoolStrategy(1, 1), grading) streamed
   to parquet; timed from the moment the engine finished loading inside the actor to the last block written, so
   engine start is excluded on both sides.
Prints completion tokens/s of each and the ratio (goal: the pipeline keeps >= 0.9 of raw throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from actors.vllm_generator import VLLMGenerator


class TimedVLLMGenerator(VLLMGenerator):
    """The real VLLMGenerator that also writes when its engine finished loading (wall clock, this machine) to the
    file named by $STEPRAY_BENCH_READY (workers of a local cluster inherit the driver's environment)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        Path(os.environ["STEPRAY_BENCH_READY"]).write_text(str(time.time()))


def _prompts(cfg, model_path: str) -> list[str]:
    from transformers import AutoTokenizer

    from pipelines.problems import load_problems
    from pipelines.prompts import render

    tok = AutoTokenizer.from_pretrained(model_path)
    probs = load_problems("synthetic", synthetic=cfg.synthetic).problems
    return [render(tok, p["question"], p["kind"], cfg.prompt) for p in probs]


def run_raw(cfg_json: str, model_path: str, out: str) -> None:
    import vllm

    from pipelines import config as C
    from pipelines.generate import GenerationConfig

    cfg = C.load_config(GenerationConfig, base=json.loads(cfg_json))
    prompts = _prompts(cfg, model_path)
    os.environ["OMP_NUM_THREADS"] = str(cfg.engine.threads)
    llm = vllm.LLM(model=model_path, enforce_eager=True, **cfg.engine.engine_kwargs())
    sp = vllm.SamplingParams(**cfg.sampling.params())
    t0 = time.time()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.time() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    Path(out).write_text(json.dumps({"tokens": tokens, "wall_s": wall, "sequences": len(prompts) * cfg.sampling.n}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=48)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--_raw", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._raw:
        run_raw(*args._raw)
        return 0

    from pipelines import config as C
    from pipelines.generate import GenerationConfig, build_generation, stream_to_parquet
    from pipelines.models import resolve_model
    from pipelines.problems import load_problems
    from pipelines.runtime import init_ray

    model_path = str(resolve_model(args.model, prepare=True))
    cfg = C.load_config(GenerationConfig, overrides=[
        f"synthetic.n={args.problems}", "synthetic.min_steps=1", "synthetic.max_steps=2", f"sampling.n={args.n}",
        f"sampling.max_tokens={args.max_tokens}", "sampling.logprobs=0", "sampling.temperature=0.8",
        "greedy=false", f"engine.batch_size={args.batch_size}", f"engine.model={args.model}"])
    with tempfile.TemporaryDirectory() as tmp:
        raw_out = os.path.join(tmp, "raw.json")
        print("[bench] raw vLLM ...", flush=True)
        subprocess.run([sys.executable, "-m", "benchmarks.generation_vs_raw", "--_raw",
                        json.dumps(C.to_dict(cfg)), model_path, raw_out], check=True)
        raw = json.loads(Path(raw_out).read_text())

        print("[bench] pipeline ...", flush=True)
        os.environ["STEPRAY_BENCH_READY"] = os.path.join(tmp, "ready")
        ray = init_ray()
        problems = load_problems("synthetic", synthetic=cfg.synthetic).problems
        ds = build_generation(ray.data.from_items(problems), cfg, model_path, generator_cls=TimedVLLMGenerator)
        stats = stream_to_parquet(ds, Path(tmp) / "samples", len(problems) * args.n, log=lambda s: None)
        t_end = time.time()
        pipe_wall = t_end - float(Path(os.environ["STEPRAY_BENCH_READY"]).read_text())
        ray.shutdown()
    result = {
        "machine": f"{os.cpu_count()} CPUs",
        "model": args.model, "problems": args.problems, "n": args.n, "max_tokens": args.max_tokens,
        "raw_tokens": raw["tokens"], "raw_wall_s": raw["wall_s"], "raw_tokens_per_s": raw["tokens"] / raw["wall_s"],
        "pipeline_tokens": stats["tokens"], "pipeline_wall_s": pipe_wall,
        "pipeline_tokens_per_s": stats["tokens"] / pipe_wall,
    }
    result["ratio"] = result["pipeline_tokens_per_s"] / result["raw_tokens_per_s"]
    print(json.dumps(result, indent=1))
    print(f"\ngeneration throughput: raw vLLM {result['raw_tokens_per_s']:.1f} tok/s, pipeline "
          f"{result['pipeline_tokens_per_s']:.1f} tok/s, ratio {result['ratio']:.2f} (goal >= 0.90)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

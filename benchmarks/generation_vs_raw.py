"""Generation throughput: raw `vllm.LLM.generate` against the stepray pipeline (Ray Data + actor pool), same prompts.

    python -m benchmarks.generation_vs_raw [--problems 48] [--n 4] [--max-tokens 96] [--model smollm2] [--json out.json]

One run does both, one after the other on the same machine, with the same engine arguments, prompts, sampling
parameters and engine seed:
1. raw: a subprocess builds `vllm.LLM` and times `generate()` over all prompts (engine start excluded);
2. pipeline: `build_generation` (prompt formatting, the engine class in an ActorPoolStrategy(1, 1), grading)
   streamed to parquet, once per engine class in --engines (async: AsyncVLLMGenerator with calls_in_flight batches
   at once, the default; sync: VLLMGenerator, one batch at a time); timed from the moment the engine finished
   loading inside the actor to the last block written, so engine start is excluded on both sides.
Prints completion tokens/s of each and the ratios (goal: the pipeline keeps >= 0.95 of raw throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path



def timed(cls: type, ready: str) -> type:
    """The real engine class `cls` that also writes when its engine finished loading (wall clock, this machine) to
    the file `ready` (the class travels to the actor by value, with the path)."""

    class Timed(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            Path(ready).write_text(str(time.time()))

    Timed.__name__ = f"Timed{cls.__name__}"
    return Timed


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
    from actors.vllm_generator import engine_setup

    # the pipeline's own engine set-up (threads and their binding, eager mode, the CPU KV cache in bytes)
    llm = vllm.LLM(model=model_path, **engine_setup(cfg.engine.engine_kwargs(), cfg.engine.threads))
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
    ap.add_argument("--engines", default="async,sync",
                    help="pipeline engine classes to time, the first giving the ratio: async (AsyncVLLMGenerator, "
                         "the default) and/or sync (VLLMGenerator)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--_raw", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._raw:
        run_raw(*args._raw)
        return 0

    from pipelines import config as C
    from pipelines.generate import GenerationConfig, build_generation, generator_class, stream_to_parquet
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

        ray = init_ray()
        problems = load_problems("synthetic", synthetic=cfg.synthetic).problems
        runs = {}
        for engine in args.engines.split(","):
            print(f"[bench] pipeline, {engine} engine ...", flush=True)
            ecfg = replace(cfg, engine=replace(cfg.engine, async_engine=engine == "async"))
            ready = os.path.join(tmp, f"ready-{engine}")
            ds = build_generation(ray.data.from_items(problems), ecfg, model_path,
                                  generator_cls=timed(generator_class(ecfg.engine), ready))
            stats = stream_to_parquet(ds, Path(tmp) / f"samples-{engine}", len(problems) * args.n, log=lambda s: None)
            wall = time.time() - float(Path(ready).read_text())
            runs[engine] = {"tokens": stats["tokens"], "wall_s": wall, "tokens_per_s": stats["tokens"] / wall,
                            "ratio": stats["tokens"] / wall / (raw["tokens"] / raw["wall_s"])}
        ray.shutdown()
    first = runs[args.engines.split(",")[0]]
    result = {
        "machine": f"{os.cpu_count()} CPUs",
        "model": args.model, "problems": args.problems, "n": args.n, "max_tokens": args.max_tokens,
        "batch_size": args.batch_size, "calls_in_flight": cfg.engine.calls_in_flight,
        "raw_tokens": raw["tokens"], "raw_wall_s": raw["wall_s"], "raw_tokens_per_s": raw["tokens"] / raw["wall_s"],
        "pipeline_tokens": first["tokens"], "pipeline_wall_s": first["wall_s"],
        "pipeline_tokens_per_s": first["tokens_per_s"], "engines": runs,
    }
    result["ratio"] = first["ratio"]
    print(json.dumps(result, indent=1))
    per = ", ".join(f"{e} engine {r['tokens_per_s']:.1f} tok/s ({r['ratio']:.2f}x)" for e, r in runs.items())
    print(f"\ngeneration throughput: raw vLLM {result['raw_tokens_per_s']:.1f} tok/s; pipeline: {per} "
          f"(goal >= 0.95x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

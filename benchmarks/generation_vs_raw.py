"""Generation throughput: raw `vllm.LLM.generate` against the stepray pipeline (Ray Data + actor pool), same prompts.

    python -m benchmarks.generation_vs_raw [--problems 48] [--n 4] [--max-tokens 96] [--model smollm2] [--json out.json]

One run does both, alternating (--repeats times raw then pipeline) on the same machine, with the same engine
arguments, prompts, sampling parameters and engine seed:
1. raw: a subprocess builds `vllm.LLM` and times `generate()` over all prompts (engine start excluded);
2. pipeline: `build_generation` (prompt formatting, the engine class in an ActorPoolStrategy(1, 1), grading)
   streamed to parquet, once per engine class in --engines (async: AsyncVLLMGenerator with calls_in_flight batches
   at once, the default; sync: VLLMGenerator, one batch at a time); timed from the moment the engine finished
   loading inside the actor to the last block written, so engine start is excluded on both sides.
With --raw-in-ray, also raw vLLM in a Ray task of the same cluster after each pipeline run (what Ray's own
processes beside the engine cost, apart from the pipeline's work). Prints completion tokens/s of each and the ratios (goal: the pipeline keeps >= 0.95 of raw throughput): pooled over
the repeats (all tokens over all time, each side), with each pair's own ratio beside it to show the spread.
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
    the file `ready`, and each engine call's start and end to `ready`.calls (the class travels to the actor by value,
    with the path)."""

    import inspect

    def note(kind: str, t0: float) -> None:  # one line per engine call: its start and end (wall clock)
        with open(ready + ".calls", "a") as f:
            f.write(f"{kind} {t0} {time.time()}\n")

    class Timed(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            Path(ready).write_text(str(time.time()))

        if inspect.iscoroutinefunction(cls.__call__):
            async def __call__(self, batch):
                t0 = time.time()
                out = await super().__call__(batch)
                note("call", t0)
                return out
        else:
            def __call__(self, batch):
                t0 = time.time()
                out = super().__call__(batch)
                note("call", t0)
                return out

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
    ap.add_argument("--repeats", type=int, default=2,
                    help="raw and pipeline alternate this many times; the ratio pools all their tokens and time")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a GenerationConfig override (e.g. engine.calls_in_flight=3); the raw side reads only its "
                         "engine arguments and sampling")
    ap.add_argument("--raw-in-ray", action="store_true",
                    help="also time raw vLLM inside a Ray task of the pipeline's cluster (the engine's CPUs, Ray's own "
                         "processes beside it), after each pipeline run: how much of the gap is Ray being there")
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
        "greedy=false", f"engine.batch_size={args.batch_size}", f"engine.model={args.model}", *args.set])
    engines = args.engines.split(",")
    raws, runs, in_ray = [], {e: [] for e in engines}, []
    with tempfile.TemporaryDirectory() as tmp:
        problems = load_problems("synthetic", synthetic=cfg.synthetic).problems
        for rep in range(args.repeats):
            # raw and pipeline alternate, each with the machine to itself (no Ray cluster beside raw): a drift of the
            # machine's speed over the run (runs of the same side differ by up to ~10% here) reaches both sides
            raw_out = os.path.join(tmp, f"raw-{rep}.json")
            print(f"[bench] repeat {rep + 1}/{args.repeats}: raw vLLM ...", flush=True)
            subprocess.run([sys.executable, "-m", "benchmarks.generation_vs_raw", "--_raw",
                            json.dumps(C.to_dict(cfg)), model_path, raw_out], check=True)
            raw = json.loads(Path(raw_out).read_text())
            raw["tokens_per_s"] = raw["tokens"] / raw["wall_s"]
            raws.append(raw)
            ray = init_ray()
            for engine in engines:
                print(f"[bench] repeat {rep + 1}/{args.repeats}: pipeline, {engine} engine ...", flush=True)
                ecfg = replace(cfg, engine=replace(cfg.engine, async_engine=engine == "async"))
                ready = os.path.join(tmp, f"ready-{engine}-{rep}")
                ds = build_generation(ray.data.from_items(problems), ecfg, model_path,
                                      generator_cls=timed(generator_class(ecfg.engine), ready))
                stats = stream_to_parquet(ds, Path(tmp) / f"samples-{engine}-{rep}", len(problems) * args.n,
                                          log=lambda s: None)
                end = time.time()
                start = float(Path(ready).read_text())
                wall = end - start
                # where the window goes: engine ready -> first call, first call -> last call's end, -> last block written
                log_calls = Path(ready + ".calls")
                calls = [tuple(map(float, line.split()[1:])) for line in
                         (log_calls.read_text().split("\n") if log_calls.exists() else []) if line.strip()]
                if not calls:
                    raise SystemExit(f"the {engine} engine was never called: no prompts reached it")
                first, last = min(c[0] for c in calls), max(c[1] for c in calls)
                runs[engine].append({"tokens": stats["tokens"], "wall_s": wall, "tokens_per_s": stats["tokens"] / wall,
                                     "ratio": stats["tokens"] / wall / raw["tokens_per_s"], "engine_calls": len(calls),
                                     "before_first_call_s": first - start, "calls_window_s": last - first,
                                     "after_last_call_s": end - last})
                r = runs[engine][-1]
                print(f"[bench]   raw {raw['tokens_per_s']:.1f}, {engine} {stats['tokens'] / wall:.1f} tokens/s "
                      f"({r['ratio']:.3f}x); the pipeline's {wall:.1f} s: {r['before_first_call_s']:.1f} s from the "
                      f"engine's start to its first call, {r['calls_window_s']:.1f} s of {len(calls)} calls, "
                      f"{r['after_last_call_s']:.1f} s from the last call to the last block written", flush=True)
            if args.raw_in_ray:
                print(f"[bench] repeat {rep + 1}/{args.repeats}: raw vLLM in a Ray task ...", flush=True)
                out = os.path.join(tmp, f"raw-ray-{rep}.json")
                ray.get(ray.remote(num_cpus=cfg.engine.num_cpus)(run_raw).remote(json.dumps(C.to_dict(cfg)),
                                                                                 model_path, out))
                r = json.loads(Path(out).read_text())
                r["tokens_per_s"] = r["tokens"] / r["wall_s"]
                in_ray.append(r)
                print(f"[bench]   raw vLLM in a Ray task {r['tokens_per_s']:.1f} tokens/s ("
                      f"{r['tokens_per_s'] / raw['tokens_per_s']:.3f}x raw outside Ray)", flush=True)
            ray.shutdown()
    raw_tps = sum(r["tokens"] for r in raws) / sum(r["wall_s"] for r in raws)
    summary = {}
    for engine, reps in runs.items():
        tps = sum(r["tokens"] for r in reps) / sum(r["wall_s"] for r in reps)
        ratios = sorted(r["ratio"] for r in reps)
        summary[engine] = {"tokens_per_s": tps, "ratio": tps / raw_tps, "pair_ratios": [r["ratio"] for r in reps],
                           "pair_ratio_min": ratios[0], "pair_ratio_max": ratios[-1], "repeats": reps}
    first = summary[engines[0]]
    result = {
        "machine": f"{os.cpu_count()} CPUs",
        "model": args.model, "problems": args.problems, "n": args.n, "max_tokens": args.max_tokens,
        "batch_size": args.batch_size, "calls_in_flight": cfg.engine.calls_in_flight, "repeats": args.repeats,
        "raw_tokens": sum(r["tokens"] for r in raws), "raw_wall_s": sum(r["wall_s"] for r in raws),
        "raw_tokens_per_s": raw_tps, "raw_runs": raws,
        "pipeline_tokens_per_s": first["tokens_per_s"], "engines": summary,
    }
    # the ratio: all the pipeline's tokens over all its time, against the same for raw (pooled over the repeats)
    result["ratio"] = first["ratio"]
    if in_ray:
        tps = sum(r["tokens"] for r in in_ray) / sum(r["wall_s"] for r in in_ray)
        result["raw_in_ray"] = {"tokens_per_s": tps, "ratio_to_raw": tps / raw_tps,
                                "pipeline_ratio_to_it": first["tokens_per_s"] / tps, "runs": in_ray}
    print(json.dumps(result, indent=1))
    per = ", ".join(f"{e} engine {r['tokens_per_s']:.1f} tok/s ({r['ratio']:.2f}x; pairs "
                    f"{', '.join(format(x, '.2f') for x in r['pair_ratios'])})" for e, r in summary.items())
    print(f"\ngeneration throughput: raw vLLM {result['raw_tokens_per_s']:.1f} tok/s; pipeline: {per} "
          f"(goal >= 0.95x)")
    if in_ray:
        r = result["raw_in_ray"]
        print(f"raw vLLM in a Ray task: {r['tokens_per_s']:.1f} tok/s ({r['ratio_to_raw']:.2f}x raw outside Ray); "
              f"the pipeline against it: {r['pipeline_ratio_to_it']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

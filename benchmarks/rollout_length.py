"""Does the rollout length limit make naive MC labels noisy? Rollouts from every prefix of verified samples, at two
`max_tokens` limits side by side on one engine: share of rollouts stopped by the limit, success rate, prefixes
with no success in K.

    python -m benchmarks.rollout_length [--samples 16] [--rollouts 16] [--limits 96,256] [--seed 0]

Samples as `benchmarks.annotation_methods` makes them (SmolLM2, T=0.7, 2-3 step synthetic problems, the balanced
mix of --problems x --samples-per-problem), of which the first --samples verified ones. A verified sample's prefixes
all have a success rate above 0 (the sample itself got through), so a prefix with 0 of K successes is where naive
labels a good step 0; if longer rollouts removed those, the limit would be the cause. Real engine, nothing faked.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--problems", type=int, default=192)
    ap.add_argument("--samples-per-problem", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16, help="verified samples whose prefixes are rolled out")
    ap.add_argument("--rollouts", type=int, default=16, help="K per prefix")
    ap.add_argument("--limits", default="96,256", help="comma separated max_tokens values")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--sample-max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.25, help="CPU: share of RAM for the KV cache")
    ap.add_argument("--num-gpus", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        limits = [int(x) for x in args.limits.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--limits: expected comma separated integers, got {args.limits!r}")
    if not limits or min(limits) < 1:
        ap.error("--limits: give at least one limit >= 1")
    args.max_tokens = max(limits)

    import ray

    from benchmarks.annotation_methods import make_samples, start_engine
    from pipelines.annotate import select_samples
    from pipelines.models import resolve_model
    from pipelines.prompts import separator
    from pipelines.runtime import init_ray
    from pipelines.steps import step_ends
    from pipelines.verify import grade

    init_ray()
    model_path = str(resolve_model(args.model, prepare=True))
    engine = start_engine(model_path, args.model, True, args)
    samples, _ = make_samples(engine, model_path, 2, 3, args.problems, args.seed, args, 2)
    samples = select_samples(samples, 2 * args.samples, "balanced")
    rows = [r for r in samples.to_pylist() if r["correct"]][: args.samples]
    prompts, meta = [], []
    for r in rows:
        for end in step_ends(r["completion"], list(r["steps"]), separator("lines")):
            prompts.append(r["prompt"] + r["completion"][:end])
            meta.append((r, r["completion"][:end]))
    print(f"[rollout_length] {len(rows)} verified samples, {len(prompts)} prefixes, K={args.rollouts}")
    for limit in limits:
        t0 = time.time()
        outs = ray.get(engine.generate.remote(prompts, {"n": args.rollouts, "temperature": args.temperature,
                                                        "top_p": 1.0, "max_tokens": limit}))
        wall = time.time() - t0
        total = cut = ok = none = tokens = 0
        for (r, prefix), comps in zip(meta, outs):
            wins = 0
            for c in comps:
                total += 1
                tokens += len(c["token_ids"])
                cut += c["finish_reason"] == "length"
                wins += grade(prefix + c["text"], r["gold"], kind=r["kind"]).correct
            ok += wins
            none += wins == 0
        print(f"max_tokens {limit:>4}: {total} rollouts, stopped by the limit {cut / max(total, 1):.3f}, "
              f"success {ok / max(total, 1):.3f}, prefixes with 0/{args.rollouts} successes {none}/{len(meta)}, "
              f"{tokens} tokens, {wall:.0f}s")
    ray.kill(engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())

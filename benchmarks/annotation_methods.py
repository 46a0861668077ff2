"""Side by side: what Monte-Carlo step labels cost with each labelling plan, and how far their labels move.

    python -m benchmarks.annotation_methods [--model smollm2] [--problems 16] [--samples-per-problem 4]
        [--rollouts 8] [--variants naive,binary,...] [--long-problems 8] [--long-rollouts 4]
        [--out runs/bench_annotation] [--json PATH]
    python -m benchmarks.annotation_methods --pool runs/a/annotation_methods.json runs/b/annotation_methods.json

Part 1: SmolLM2-135M-Instruct samples (T=0.7) of 2- and 3-step synthetic problems, each labelled by every variant
(naive, naive+early_stop, binary, binary+reuse, binary+reuse+early_stop, scan, scan+reuse, scan+reuse+early_stop,
the +grow forms of the early-stop plans (chunk doubling per round),
and naive again as the noise floor: two naive runs differ only by sampling; naive+reuse on request, which adds a
second reference column) with K rollouts at the samples' temperature, on ONE engine shared by all
variants, samples fed in batches of --batch (rollouts of a round batched across a batch, as in the pipeline).
Per variant: generated tokens and rollouts per labelled step, engine calls, wall time, tokens/s, agreement of the
hard labels with the first naive run (share of steps, share of first errors), and quality against the
ground-truth step checks (pipelines.verify.first_error with the problems' quantities; F1 of "step is wrong" against
the prefix truth, first-error accuracy). The goal of issue 5: >= 4x fewer tokens per labelled step than naive at
>= 90% step agreement, with wall time falling with it.

--select balanced labels the mix a PRM is trained on (`stepray annotate select=balanced`, as the demo does): up to
half verified samples, the rest wrong. A verified sample costs first-error search nothing (every prefix is known
good from its own verdict) and naive K rollouts per prefix, so the ratio depends on the mix; the default (all kept
samples of a weak model) is nearly all wrong, the costliest case for the search.

Naive's labels are themselves random (a prefix whose success rate is near 1/K is labelled 1 in one run and 0 in the
next), so agreement with one naive run cannot exceed what naive scores against itself. With the repeat run, a second
table separates the two (`pipelines.steps.agreement_vs_repeat`): agreement averaged over both naive runs, the noise
floor, the ceiling (1 + floor) / 2 no labelling can pass, the margin over the floor, and the agreement on the steps
naive labels the same twice (the part that depends on the variant alone), with 95% bootstrap intervals over samples;
where a variant contradicts naive's reproducible label, the ground truth says which side is right. `--pool` prints
that table per run and pooled from earlier reports (`part1_labels`, `part1_truth` in the JSON), running nothing.

Part 2: prefix caching on long prefixes: samples of 4-5 step problems (solutions with >= --long-min-steps steps),
labelled naive with --long-rollouts on an engine with prefix caching and on a fresh one without (each warmed up
with one small request first); wall time and tokens/s of each.

Prints a table and writes <out>/annotation_methods.json. Real engine, real Ray; nothing is faked. The sizes are
small by default; the rollout cost grows as samples x prefixes x K x rollout length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import pyarrow as pa

from pipelines.runtime import finite_json as _finite

VARIANTS = {
    "naive": {"method": "naive"},
    "naive+early_stop": {"method": "naive", "early_stop": True, "chunk_growth": 1.0},
    "binary": {"method": "binary"},
    "binary+reuse": {"method": "binary", "reuse": True},
    "binary+reuse+early_stop": {"method": "binary", "reuse": True, "early_stop": True, "chunk_growth": 1.0},
    "scan": {"method": "scan"},
    "scan+reuse": {"method": "scan", "reuse": True},
    "scan+reuse+early_stop": {"method": "scan", "reuse": True, "early_stop": True, "chunk_growth": 1.0},
    # the +early_stop variants above ask a fixed --chunk every round (chunk_growth=1, the config's default); +grow
    # doubles the spent rollouts each round (chunk_growth=2), so a bad prefix is decided in ~log2(K / chunk) + 1
    # engine rounds instead of K / chunk
    "binary+reuse+early_stop+grow": {"method": "binary", "reuse": True, "early_stop": True, "chunk_growth": 2.0},
    "scan+reuse+early_stop+grow": {"method": "scan", "reuse": True, "early_stop": True, "chunk_growth": 2.0},
    # not in the default run: the second reference. Naive spends K fresh rollouts on every prefix of a verified
    # sample and labels a good prefix 0 when all K fail; with reuse the sample's own success counts (hard label 1,
    # as the first-error search infers). Agreement with this reference separates what the search changes from
    # what counting the sample itself changes.
    "naive+reuse": {"method": "naive", "reuse": True},
}
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "naive+reuse" and not v.endswith("+grow")]
SECOND_REFERENCE = "naive+reuse"


class RemoteEngine:
    """A VLLMGenerator actor behind the `generate` method StepAnnotator calls, so every variant shares one engine."""

    def __init__(self, handle):
        self.handle = handle
        self.calls = 0  # engine calls: one per round per batch of samples

    def generate(self, prompts, sampling):
        import ray

        self.calls += 1
        return ray.get(self.handle.generate.remote(prompts, sampling))


def start_engine(model_path: str, name: str, caching: bool, args) -> object:
    import ray

    from actors.vllm_generator import VLLMGenerator

    kwargs = {"max_model_len": args.max_model_len, "enable_prefix_caching": caching,
              "gpu_memory_utilization": args.gpu_memory_utilization, "seed": args.seed}
    handle = ray.remote(num_cpus=1, num_gpus=args.num_gpus or None)(VLLMGenerator).remote(
        model_path, kwargs, {"max_tokens": args.max_tokens}, args.threads, name)
    ray.get(handle.ready.remote())
    return handle


def make_samples(handle, model_path: str, min_steps: int, max_steps: int, n_problems: int, seed: int, args,
                 least_steps: int) -> tuple[pa.Table, dict]:
    """Synthetic problems -> SmolLM2 samples at T=0.7 -> graded Sample rows with >= least_steps steps."""
    import ray

    from pipelines.generate import FormatPrompts, SamplingConfig, grade_batch
    from pipelines.problems import SyntheticConfig, synthetic_problems
    from pipelines.prompts import PromptConfig

    problems = synthetic_problems(SyntheticConfig(n=n_problems, seed=seed, min_steps=min_steps, max_steps=max_steps))
    fmt = FormatPrompts(model_path, PromptConfig(), SamplingConfig(n=args.samples_per_problem,
                                                                   temperature=args.temperature,
                                                                   max_tokens=args.sample_max_tokens, logprobs=0),
                        greedy=False)
    prompts = fmt(pa.Table.from_pylist(problems))
    completions = ray.get(handle.__call__.remote(prompts.append_column(
        "max_tokens", pa.array([args.sample_max_tokens] * prompts.num_rows, pa.int64()))))
    samples = grade_batch(completions, "lines")
    keep = [i for i, r in enumerate(samples.to_pylist()) if not r["error"] and len(r["steps"]) >= least_steps]
    samples = samples.take(pa.array(keep, pa.int64()))
    questions = {p["id"]: p["question"] for p in problems}
    samples = samples.append_column("question", pa.array(
        [questions[p] for p in samples.column("problem_id").to_pylist()], pa.string()))
    return samples, {p["id"]: p for p in problems}


def label(samples: pa.Table, cfg, handle, batch: int) -> tuple[list[dict], float, int]:
    """Labels of every sample by one variant on the shared engine: rows, wall seconds, engine calls."""
    from pipelines.annotate import StepAnnotator, annotate_table

    engine = RemoteEngine(handle)
    table, wall = annotate_table(samples, StepAnnotator(cfg, "", generator=engine), batch)
    return table.to_pylist(), wall, engine.calls


def true_first_error(row: dict, problems: dict) -> int:
    """The ground-truth first wrong step of a sample of a synthetic problem (-1 = none), from its step checks."""
    from pipelines.verify import first_error

    p = problems[row["problem_id"]]
    return first_error(list(row["steps"]), p["quantities"], p["answer"])


def measure(name: str, rows: list[dict], wall: float, calls: int, reference: list[dict] | None,
            problems: dict) -> dict:
    from pipelines.steps import (
        agreement,
        first_error_accuracy,
        first_error_of,
        label_quality,
        prefix_truth,
    )

    ok = [r for r in rows if not r["error"]]
    labelled = sum(len(r["hard_labels"]) for r in ok)
    tokens = sum(r["tokens_generated"] for r in ok)
    fresh = sum(sum(r["fresh"]) for r in ok)
    out = {"variant": name, "samples": len(ok), "set_aside": len(rows) - len(ok), "labelled_steps": labelled,
           "tokens": tokens, "rollouts": fresh, "tokens_per_step": tokens / labelled if labelled else math.nan,
           "rollouts_per_step": fresh / labelled if labelled else math.nan,
           "engine_calls": calls, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0}
    if reference is not None:
        ref = {r["sample_id"]: r for r in reference if not r["error"]}
        both = [r for r in ok if r["sample_id"] in ref]
        out.update(agreement([r["mc_hard"] for r in both], [ref[r["sample_id"]]["mc_hard"] for r in both]))
    truths = [true_first_error(r, problems) for r in ok]
    q = label_quality([r["mc_hard"] for r in ok], [prefix_truth(f, len(r["steps"])) for f, r in zip(truths, ok)])
    out.update({"f1_wrong_step": q["f1"], "precision_wrong_step": q["precision"], "recall_wrong_step": q["recall"],
                "first_error_accuracy": first_error_accuracy([first_error_of(r["mc_hard"]) for r in ok], truths)})
    return out


def fmt_table(results: list[dict], naive: dict | None) -> str:
    second = any("step_agreement_vs_naive_reuse" in r for r in results)
    head = (f"{'variant':<30}{'tok/step':>9}{'x naive':>8}{'roll/step':>10}{'calls':>7}{'wall s':>8}"
            f"{'tok/s':>7}{'agree':>7}{'1st-err':>8}{'F1 wrong':>9}{'1st-acc':>8}"
            + (f"{'agree n+r':>10}" if second else ""))
    lines = [head, "-" * len(head)]
    for r in results:
        ratio = naive["tokens_per_step"] / r["tokens_per_step"] if naive and r["tokens_per_step"] else math.nan
        lines.append(f"{r['variant']:<30}{r['tokens_per_step']:>9.1f}{ratio:>8.2f}{r['rollouts_per_step']:>10.2f}"
                     f"{r['engine_calls']:>7}{r['wall_s']:>8.1f}{r['tokens_per_s']:>7.0f}"
                     f"{r.get('step_agreement', math.nan):>7.3f}{r.get('first_error_agreement', math.nan):>8.3f}"
                     f"{r['f1_wrong_step']:>9.3f}{r['first_error_accuracy']:>8.3f}"
                     + (f"{r.get('step_agreement_vs_naive_reuse', math.nan):>10.3f}" if second else ""))
    lines.append("agree = step agreement with naive's hard labels; 1st-err = same first error"
                 + ("; agree n+r = step agreement with naive+reuse's" if second else ""))
    return "\n".join(lines)


def repeat_stats(labels: dict[str, dict[str, list[int]]], truth: dict[str, list[bool]] | None) -> dict[str, dict]:
    """Per variant (not naive itself): agreement with naive's two runs, separated from naive's own noise
    (`pipelines.steps.agreement_vs_repeat`). Empty without the repeat run."""
    from pipelines.steps import agreement_vs_repeat

    if "naive (repeat)" not in labels:
        return {}
    n1, n2 = labels["naive"], labels["naive (repeat)"]
    out = {}
    for name, lab in labels.items():
        if name in ("naive", "naive (repeat)"):
            continue
        sids = [s for s in lab if s in n1 and s in n2 and (truth is None or s in truth)]
        out[name] = agreement_vs_repeat([lab[s] for s in sids], [n1[s] for s in sids], [n2[s] for s in sids],
                                        [truth[s] for s in sids] if truth is not None else None)
    return out


def fmt_repeat(repeat: dict[str, dict], rows: dict[str, dict], naive: dict | None) -> str:
    """The table against naive run twice: what each variant's agreement is once naive's own noise is taken out."""
    head = (f"{'variant':<30}{'x naive':>8}{'agree':>7}{'floor':>7}{'ceiling':>8}{'margin [95% CI]':>24}"
            f"{'on reproducible [95% CI]':>31}{'disputed: truth with':>24}")
    lines = [head, "-" * len(head)]
    for name, s in repeat.items():
        r = rows.get(name, {})
        ratio = naive["tokens_per_step"] / r["tokens_per_step"] if naive and r.get("tokens_per_step") else math.nan
        lo, hi = s["margin_ci"]
        rlo, rhi = s["on_reproducible_ci"]
        disputed = (f"{s['disputed_truth_with_labels']} / {s['disputed_truth_with_reference']}"
                    if "disputed_truth_with_labels" in s else "-")
        lines.append(f"{name:<30}{ratio:>8.2f}{s['agreement_two_refs']:>7.3f}{s['noise_floor']:>7.3f}"
                     f"{s['ceiling']:>8.3f}{s['margin']:>+8.3f} [{lo:+.3f}, {hi:+.3f}]"
                     f"{s['on_reproducible']:>9.3f} [{rlo:.3f}, {rhi:.3f}] of {s['reproducible_steps']:<4}"
                     f"{disputed:>24}")
    lines += ["agree = mean step agreement with naive's two runs; floor = naive vs itself; ceiling = (1 + floor) / 2:",
              "the most any labelling can score against two runs that differ; margin = agree - floor; on reproducible",
              "= agreement on the steps where naive's two runs agree; disputed = those steps where the variant differs",
              "from both, by which side the ground truth takes (variant / naive)"]
    return "\n".join(lines)


def pool(paths: list[str]) -> int:
    """Pool the labels of earlier runs (their JSON reports) and print the table against naive run twice, per run and
    pooled over the variants every run has. No engine: the reports hold each variant's hard labels."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    usable = [(p, r) for p, r in zip(paths, reports) if "naive (repeat)" in r.get("part1_labels", {})]
    for p in sorted(set(paths) - {p for p, _ in usable}):
        print(f"[pool] {p}: no repeat naive run in it (run without --no-repeat-naive); left out")
    if not usable:
        print("[pool] nothing to pool", file=sys.stderr)
        return 2
    merged: dict[str, dict[str, list[int]]] = {}
    truth: dict[str, list[bool]] | None = {}
    for i, (p, r) in enumerate(usable):
        rows = {row["variant"]: row for row in r["part1"]}
        stats = repeat_stats(r["part1_labels"], r.get("part1_truth"))
        print(f"\n{p} (K={r['args']['rollouts']}, {r['part1_samples']['steps']} steps)\n"
              + fmt_repeat(stats, rows, rows.get("naive")))
        for name, lab in r["part1_labels"].items():
            merged.setdefault(name, {}).update({f"{i}:{s}": v for s, v in lab.items()})
        if truth is not None and r.get("part1_truth"):
            truth.update({f"{i}:{s}": v for s, v in r["part1_truth"].items()})
        else:
            truth = None  # a report without truth: pooled disputes cannot be told
    common = set.intersection(*(set(r["part1_labels"]) for _, r in usable))
    merged = {k: v for k, v in merged.items() if k in common}
    stats = repeat_stats(merged, truth)
    tokens = {n: sum(row["tokens"] for _, r in usable for row in r["part1"] if row["variant"] == n) for n in common}
    steps = {n: sum(row["labelled_steps"] for _, r in usable for row in r["part1"] if row["variant"] == n)
             for n in common}
    rows = {n: {"tokens_per_step": tokens[n] / steps[n]} for n in common if steps[n]}
    ks = sorted({r["args"]["rollouts"] for _, r in usable})
    n_steps = sum(len(v) for v in merged["naive"].values())
    print(f"\npooled over {len(usable)} runs (K={'/'.join(map(str, ks))}, {n_steps} steps; "
          f"x naive = pooled tokens per labelled step)\n" + fmt_repeat(stats, rows, rows.get("naive")))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 | tiny | a path")
    ap.add_argument("--problems", type=int, default=16, help="2-3 step synthetic problems for part 1")
    ap.add_argument("--samples-per-problem", type=int, default=4)
    ap.add_argument("--min-steps", type=int, default=2, help="part 1 keeps samples with at least this many steps")
    ap.add_argument("--select", choices=("all", "balanced"), default="all",
                    help="part 1 labels all kept samples, or --limit of them chosen as `stepray annotate "
                         "select=balanced` does (up to half verified, the rest wrong): the PRM training set's mix")
    ap.add_argument("--limit", type=int, default=0, help="with --select balanced: samples labelled (0 = all)")
    ap.add_argument("--rollouts", type=int, default=8, help="K for part 1")
    ap.add_argument("--chunk", type=int, default=2, help="early stop: rollouts per prefix in its first round")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma separated, from {list(VARIANTS)}")
    ap.add_argument("--no-repeat-naive", action="store_true", help="skip the second naive run (noise floor)")
    ap.add_argument("--long-problems", type=int, default=8, help="4-5 step problems for part 2 (0 = skip part 2)")
    ap.add_argument("--long-min-steps", type=int, default=4)
    ap.add_argument("--long-rollouts", type=int, default=4, help="K for part 2")
    ap.add_argument("--temperature", type=float, default=0.7, help="samples and rollouts")
    ap.add_argument("--max-tokens", type=int, default=96, help="most tokens per rollout")
    ap.add_argument("--sample-max-tokens", type=int, default=128, help="most tokens per sample")
    ap.add_argument("--batch", type=int, default=32, help="samples per annotator call")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.25, help="CPU: share of RAM for the KV cache")
    ap.add_argument("--num-gpus", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="problems use seed (part 1) and seed + 1 (part 2)")
    ap.add_argument("--out", default="runs/bench_annotation")
    ap.add_argument("--json", help="also write the report here (jobs.benchmark reads it)")
    ap.add_argument("--pool", nargs="+", metavar="JSON",
                    help="run nothing: pool the labels of these reports and print the table against naive run twice")
    args = ap.parse_args(argv)
    if args.pool:
        missing = [p for p in args.pool if not Path(p).is_file()]
        if missing:
            ap.error(f"--pool: no such report {missing}; give annotation_methods.json files of earlier runs")
        return pool(args.pool)
    if args.chunk < 1:
        ap.error(f"--chunk must be >= 1, got {args.chunk}")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or "naive" not in names:
        ap.error(f"--variants: unknown {bad}" if bad else "--variants must include naive (the reference)")

    import ray

    from pipelines.annotate import AnnotateConfig
    from pipelines.generate import EngineConfig
    from pipelines.models import resolve_model
    from pipelines.runtime import init_ray

    init_ray()
    model_path = str(resolve_model(args.model, prepare=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = AnnotateConfig(engine=EngineConfig(model=args.model), rollouts=args.rollouts, chunk=args.chunk,
                          temperature=args.temperature, max_tokens=args.max_tokens)
    report: dict = {"args": vars(args), "model_path": model_path}

    t0 = time.time()
    engine = start_engine(model_path, args.model, True, args)
    print(f"[bench] engine up in {time.time() - t0:.0f}s")
    samples, problems = make_samples(engine, model_path, 2, 3, args.problems, args.seed, args, args.min_steps)
    sampled = {"samples": samples.num_rows,
               "accuracy": sum(samples.column("correct").to_pylist()) / max(samples.num_rows, 1)}
    if args.select == "balanced":
        from pipelines.annotate import select_samples

        samples = select_samples(samples, args.limit or samples.num_rows, "balanced")
    steps = samples.column("steps").to_pylist()
    report["part1_samples"] = {"samples": samples.num_rows, "steps": sum(map(len, steps)),
                               "accuracy": sum(samples.column("correct").to_pylist()) / max(samples.num_rows, 1),
                               "select": args.select, "sampled": sampled}
    print(f"[bench] part 1: {samples.num_rows} samples with >= {args.min_steps} steps "
          f"({report['part1_samples']['steps']} steps, accuracy {report['part1_samples']['accuracy']:.2f})")
    results, reference, labels = [], None, {}
    if samples.num_rows:
        runs = [(n, VARIANTS[n]) for n in names] + ([] if args.no_repeat_naive else [("naive (repeat)",
                                                                                       VARIANTS["naive"])])
        for name, overrides in runs:
            cfg = dataclasses.replace(base, **overrides)
            rows, wall, calls = label(samples, cfg, engine, args.batch)
            reference = reference if reference is not None else rows
            results.append(measure(name, rows, wall, calls, reference, problems))
            labels[name] = {r["sample_id"]: r["mc_hard"] for r in rows if not r["error"]}
            r = results[-1]
            print(f"[bench] {name}: {r['tokens']} tokens, {r['labelled_steps']} steps, {wall:.1f}s, "
                  f"agreement {r.get('step_agreement', math.nan):.3f}")
        if SECOND_REFERENCE in labels:
            from pipelines.steps import agreement

            ref2 = labels[SECOND_REFERENCE]
            for r in results:
                both = [sid for sid in labels[r["variant"]] if sid in ref2]
                a2 = agreement([labels[r["variant"]][sid] for sid in both], [ref2[sid] for sid in both])
                r["step_agreement_vs_naive_reuse"] = a2["step_agreement"]
                r["first_error_agreement_vs_naive_reuse"] = a2["first_error_agreement"]
        report["part1_labels"] = labels  # per variant, per sample: the hard labels (for analysis after the run)
        from pipelines.steps import prefix_truth

        report["part1_truth"] = {  # per sample: the ground-truth prefix labels (True = right so far)
            r["sample_id"]: prefix_truth(true_first_error(r, problems), len(r["steps"])) for r in samples.to_pylist()}
        repeat = repeat_stats(labels, report["part1_truth"])
        for r in results:
            if r["variant"] in repeat:
                r["vs_repeat"] = repeat[r["variant"]]
        naive = results[0]
        print("\n" + fmt_table(results, naive))
        if repeat:
            print("\n" + fmt_repeat(repeat, {r["variant"]: r for r in results}, naive))
        for r in results[1:]:
            r["token_reduction_vs_naive"] = naive["tokens_per_step"] / r["tokens_per_step"] \
                if r["tokens_per_step"] else math.inf
            r["meets_goal"] = bool(naive["tokens"] > 0 and r["token_reduction_vs_naive"] >= 4
                                   and r.get("step_agreement", 0) >= 0.9)
        print("goal (>= 4x fewer tokens per labelled step than naive at >= 0.90 step agreement): " + ", ".join(
            f"{r['variant']} {'yes' if r['meets_goal'] else 'no'}" for r in results[1:]))
        if repeat:
            # the same goal with naive's own noise taken out: agreement on the steps naive labels the same twice
            for r in results[1:]:
                if "vs_repeat" in r:
                    r["meets_goal_on_reproducible"] = bool(r["token_reduction_vs_naive"] >= 4
                                                           and r["vs_repeat"]["on_reproducible"] >= 0.9)
            print("on naive's reproducible steps (>= 4x at >= 0.90 agreement there): " + ", ".join(
                f"{r['variant']} {'yes' if r['meets_goal_on_reproducible'] else 'no'}"
                for r in results[1:] if "meets_goal_on_reproducible" in r))
    report["part1"] = results

    if args.long_problems:
        long_samples, long_problems = make_samples(engine, model_path, 4, 5, args.long_problems, args.seed + 1, args,
                                                   args.long_min_steps)
        print(f"\n[bench] part 2: {long_samples.num_rows} samples with >= {args.long_min_steps} steps")
        cfg = dataclasses.replace(base, method="naive", rollouts=args.long_rollouts)
        part2 = []
        if long_samples.num_rows:
            prompt_tokens = ray.get(engine.tokenize.remote(
                [p + c for p, c in zip(long_samples.column("prompt").to_pylist(),
                                       long_samples.column("completion").to_pylist())]))
            rows, wall, calls = label(long_samples, cfg, engine, args.batch)
            part2.append({**measure("naive, prefix caching on", rows, wall, calls, None, long_problems),
                          "mean_solution_tokens_with_prompt": sum(map(len, prompt_tokens)) / len(prompt_tokens)})
            ray.kill(engine)
            engine = start_engine(model_path, args.model, False, args)
            RemoteEngine(engine).generate(["warm-up"], {"n": 1, "max_tokens": 4})
            rows, wall, calls = label(long_samples, cfg, engine, args.batch)
            part2.append(measure("naive, prefix caching off", rows, wall, calls, None, long_problems))
            for r in part2:
                print(f"  {r['variant']:<28}{r['wall_s']:>8.1f} s  {r['tokens']:>7} tokens  "
                      f"{r['tokens_per_s']:>6.0f} tokens/s")
        report["part2"] = part2
    ray.kill(engine)

    path = out / "annotation_methods.json"
    path.write_text(json.dumps(_finite(report), indent=1, default=str))
    if args.json:
        Path(args.json).write_text(path.read_text())
    print(f"\n[bench] wrote {path} ({time.time() - t0:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

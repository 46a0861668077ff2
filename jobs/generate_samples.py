"""Generate graded chain-of-thought samples: problems -> vLLM actor pool on Ray Data -> verdicts -> parquet.

    stepray generate --problems synthetic --n 8 --out runs/gen [--model smollm2] [--config cfg.yaml] [key=value ...]
    python -m jobs.generate_samples ...          (the Ray job entrypoint: ray job submit -- python -m jobs...)

Writes under --out: samples/part-*.parquet (schema.SAMPLE, one row per sample, boolean `correct`),
rejects.jsonl (problem rows that could not be used, with reasons), config.json, summary.json; logs the summary to
MLflow. Re-running with the same --out resumes: finished (problem, mode) pairs are not generated again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines import config as C
from pipelines.generate import (GenerationConfig, build_generation, done_keys, format_summary, read_samples,
                                generator_class, sample_mode, stream_to_parquet, summarize)
from pipelines.models import load_path
from pipelines.problems import load_problems, write_rejects
from pipelines.runs import write_problems
from pipelines.runtime import cli_main, init_ray, log_stage


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, GenerationConfig]:
    ap = argparse.ArgumentParser(prog="stepray generate", description=__doc__.split("\n\n")[0],
                                 epilog="config keys (key=value overrides):\n" + C.describe(GenerationConfig),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file with GenerationConfig fields")
    ap.add_argument("--problems", help="source name or file (sets problems=)")
    ap.add_argument("--n", type=int, help="samples per problem (sets sampling.n=)")
    ap.add_argument("--model", help="model name or path (sets engine.model=)")
    ap.add_argument("--out", help="output folder (sets out=)")
    ap.add_argument("--limit", type=int, help="first N problems only (sets limit=)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampling.temperature=0.7")
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in (("problems", "problems"), ("n", "sampling.n"), ("model", "engine.model"), ("out", "out"),
                      ("limit", "limit")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    return args, C.load_config(GenerationConfig, args.config, overrides)


def run(cfg: GenerationConfig, use_mlflow: bool = True, log=print) -> dict:
    # inputs first: a user's mistake ends here, before any output, Ray or engine
    loaded = load_problems(cfg.problems, synthetic=cfg.synthetic, limit=cfg.limit or None)
    model_path = load_path(cfg.engine.model)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(C.to_dict(cfg), indent=1, default=str))
    write_rejects(loaded.rejects, out / "rejects.jsonl")
    write_problems(loaded.problems, out)  # what later stages read the questions and the ground truth from
    log(f"[generate] {cfg.problems}: {loaded.summary()}")

    existing = read_samples(out / "samples")
    skip = done_keys(existing)
    todo = [p for p in loaded.problems
            if any((p["id"], m) not in skip for m in [sample_mode(p["kind"], cfg.hint)] + ["greedy"] * cfg.greedy)]
    if skip:
        log(f"[generate] resuming: {len(skip)} (problem, mode) pairs already in {out / 'samples'}, "
            f"{len(todo)} problems left")
    expected = sum(cfg.sampling.n + (1 if cfg.greedy else 0) for _ in todo)

    wall = {"rows": 0, "tokens": 0, "wall_s": 0.0}
    if todo:
        ray = init_ray()
        ds = ray.data.from_items(todo)
        samples = build_generation(ds, cfg, model_path, generator_cls=generator_class(cfg.engine), skip=skip)
        wall = stream_to_parquet(samples, out / "samples", expected, log=log)

    table = read_samples(out / "samples")
    if table is None:
        raise RuntimeError(f"no samples were written under {out / 'samples'}; see the log above")
    from pipelines.votes import majority_vote

    summary = summarize(table, majority_vote)
    summary["rejected_problems"] = len(loaded.rejects)
    summary["tokens_per_s"] = wall["tokens"] / wall["wall_s"] if wall["wall_s"] else None
    summary["wall_s"] = wall["wall_s"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log("\n" + format_summary(summary, wall))
    if use_mlflow:
        log_stage("generate", cfg, summary, [out / "summary.json"], log=log)
    return summary




@cli_main("stepray generate")
def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    run(cfg, use_mlflow=not args.no_mlflow)
    return 0


if __name__ == "__main__":
    sys.exit(main())

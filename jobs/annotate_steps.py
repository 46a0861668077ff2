"""Label the steps of sampled solutions: Monte-Carlo rollouts (Math-Shepherd), cheaper plans, or a judge model.

    stepray annotate --samples runs/gen/samples --rollouts 8 --method naive|binary|scan [--reuse] [--early-stop]
                     [--problems SPEC] [--model smollm2] [--labels mc|judge|consensus|step_check_consensus]
                     --out runs/annotate
                     [--config cfg.yaml] [key=value ...]
    python -m jobs.annotate_steps ...            (the Ray job entrypoint: ray job submit -- python -m jobs...)

Reads Sample parquet (from `stepray generate`), runs `pipelines.annotate.build_annotation` (a vLLM actor pool on
Ray Data) and writes under --out:
  labels/part-*.parquet        StepLabel rows (schema.STEP_LABEL), what PRM training reads
  diagnostics/part-*.parquet   per sample: MC labels before filtering, judge labels, first error, rollout pools
  rejects.jsonl                samples that could not be labelled, with the reason
  config.json, summary.json, label_histogram.png, and an MLflow run (pipelines.runtime.mlflow_uri()).
Progress: a line every 10 s with samples done, labelled steps, rollouts, tokens, rates and ETA. Re-running with
the same --out continues: samples already in labels/ or diagnostics/ are skipped.

Questions and ground truth come from the generation run's problems.parquet beside the samples folder, or from
--problems (a source name with synthetic.* keys, or a file; a parquet of Problem rows keeps the quantities that
ground truth needs). For synthetic problems the summary compares the labels with the step checks, and planted=N
adds N solutions per problem with exact labels (`pipelines.synthetic.planted_solutions`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from pipelines import config as C
from pipelines import inputs, parts, schema
from pipelines.annotate import LABELS, AnnotateConfig, build_annotation, select_samples
from pipelines.annotate_report import (attach_problems, find_problems, format_summary, log_mlflow, plot_histogram,
                                       step_format, stream_labels, summarize, write_label_rejects,
                                       write_planted)
from pipelines.config import InputError
from pipelines.models import load_path
from pipelines.runs import write_problems
from pipelines.runtime import cli_main, finite_json, init_ray

def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, AnnotateConfig]:
    ap = argparse.ArgumentParser(prog="stepray annotate", description=__doc__.split("\n\n")[0],
                                 epilog="config keys (key=value overrides):\n" + C.describe(AnnotateConfig),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file with AnnotateConfig fields")
    ap.add_argument("--samples", help="Sample parquet folder or file (sets samples=)")
    ap.add_argument("--problems", help="problems behind the samples, for questions and ground truth (sets problems=; "
                                       "default: the generation run's config.json beside the samples folder)")
    ap.add_argument("--rollouts", type=int, help="K, rollouts per prefix (sets rollouts=)")
    ap.add_argument("--method", choices=["naive", "binary", "scan"], help="sets method=")
    ap.add_argument("--reuse", action="store_true", help="sets reuse=true")
    ap.add_argument("--early-stop", action="store_true", help="sets early_stop=true")
    ap.add_argument("--labels", choices=list(LABELS), help="sets labels=")
    ap.add_argument("--model", help="rollout model name or path (sets engine.model=)")
    ap.add_argument("--limit", type=int, help="first N samples only (sets limit=)")
    ap.add_argument("--out", help="output folder (sets out=)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. temperature=0.7 judge.mode=local")
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in (("samples", "samples"), ("problems", "problems"), ("rollouts", "rollouts"),
                      ("method", "method"), ("labels", "labels"), ("model", "engine.model"), ("limit", "limit"),
                      ("out", "out")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.reuse:
        overrides.append("reuse=true")
    if args.early_stop:
        overrides.append("early_stop=true")
    cfg = C.load_config(AnnotateConfig, args.config, overrides)
    if not cfg.samples:
        raise C.ConfigError("samples: give the Sample parquet folder, e.g. --samples runs/gen/samples")
    return args, cfg


def run(cfg: AnnotateConfig, use_mlflow: bool = True, log=print) -> dict:
    # inputs first: a user's mistake ends here, before any output, Ray or engine
    samples = inputs.read_parquet(cfg.samples, "samples", "sample",
                                  hint="give the samples/ folder of a `stepray generate` run")
    if not samples.num_rows:
        raise InputError(f"samples: {cfg.samples} holds no sample rows; give the samples/ folder of a "
                         f"`stepray generate` run that finished")
    samples = samples.filter(pa.compute.is_in(samples.column("mode"), pa.array(list(cfg.modes))))
    if not samples.num_rows:
        raise InputError(f"samples: {cfg.samples} holds no rows of mode {list(cfg.modes)}; set modes= to the modes "
                         f"it holds (sample, greedy)")
    if cfg.limit:
        samples = select_samples(samples, cfg.limit, cfg.select)
    problems, source = find_problems(cfg, log)
    cfg = replace(cfg, step_format=step_format(cfg))  # the samples' separator ends each prefix
    model_path = load_path(cfg.engine.model)
    judge_path = None
    if cfg.judge.mode == "local" and cfg.judge.model != "same":
        judge_path = load_path(cfg.judge.model)

    out = Path(cfg.out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "diagnostics").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(C.to_dict(cfg), indent=1, default=str))
    if problems:  # PRM training on these labels reads its ground truth from here (pipelines/runs.py)
        write_problems(list(problems.values()), out)
    log(f"[annotate] {samples.num_rows} samples (modes {list(cfg.modes)}) from {cfg.samples}; problems: "
        f"{len(problems)} from {source or 'nowhere'}")
    missing = len(set(samples.column("problem_id").to_pylist()) - set(problems))
    if problems and missing:
        log(f"[annotate] {missing} problem ids of the samples are not among those problems (no question, no truth)")
    samples = attach_problems(samples, problems)
    done = parts.read_parts(out / "diagnostics")
    if done is not None:
        seen = pa.array(sorted(set(done.column("sample_id").to_pylist())))
        samples = samples.filter(pa.compute.invert(pa.compute.is_in(samples.column("sample_id"), seen)))
        log(f"[annotate] resuming: {len(seen)} samples already done in {out}, {samples.num_rows} left")

    wall = 0.0
    if samples.num_rows:
        ray = init_ray()
        from actors.vllm_generator import VLLMGenerator

        ds = build_annotation(ray.data.from_arrow(samples), cfg, model_path, VLLMGenerator, judge_path)
        wall = stream_labels(ds, out, samples.num_rows, log)

    labels, diag = parts.read_parts(out / "labels"), parts.read_parts(out / "diagnostics")
    if diag is None:
        raise RuntimeError(f"no labels were written under {out}; see the log above")
    labels = labels if labels is not None else schema.to_table([], "step_label")
    write_label_rejects(diag, out / "rejects.jsonl")
    summary = summarize(labels, diag, problems, cfg)
    summary |= {"wall_s": wall, "problems_source": source,
                "planted_solutions": write_planted(problems, cfg, out) if cfg.planted else 0}
    (out / "summary.json").write_text(json.dumps(finite_json(summary), indent=1))
    plot_histogram(labels, out / "label_histogram.png")
    log("\n" + format_summary(summary))
    log(f"[annotate] labels in {out / 'labels'}, histogram {out / 'label_histogram.png'}")
    if use_mlflow:
        log_mlflow(cfg, summary, out, log)
    return summary


@cli_main("stepray annotate")
def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    run(cfg, use_mlflow=not args.no_mlflow)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

Questions and ground truth. Sample rows carry only problem_id, so the job looks the problems up:
  --problems ''  (default) the generation run's config.json beside the samples folder (`<run>/config.json` for
                 `<run>/samples`): its `problems` source and `synthetic` settings regenerate the same problems
                 (synthetic problems are reproducible from their config, ids included);
  --problems X   a source name (synthetic with synthetic.* keys, gsm8k, ...) or a file; a parquet of Problem rows
                 (stepray problems --out x.parquet) keeps the quantities that ground truth needs.
For synthetic problems (quantities known) the summary compares the labels with `pipelines.verify` step checks:
precision / recall / F1 of "step is wrong" against the prefix truth (wrong from the true first error on, what MC
labels estimate) and against the per-step checks, first-error accuracy, the same for the outcome-only baseline
(every step labelled with the sample's verdict), and for naive runs the metrics at K' = 1, 2, 4, .. K computed
from the first K' outcomes of each pool.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import config as C
from pipelines import inputs, schema
from pipelines.config import InputError
from pipelines.annotate import DIAGNOSTICS, AnnotateConfig, build_annotation, select_samples
from pipelines.models import resolve_model
from pipelines.problems import SyntheticConfig, load_problems
from pipelines.runtime import cli_main, finite_json, init_ray, mlflow_ui_command, mlflow_uri
from pipelines.steps import (
    first_error_accuracy,
    first_error_of,
    hard_at_k,
    label_quality,
    prefix_truth,
)


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
    ap.add_argument("--labels", choices=["mc", "judge", "consensus", "step_check_consensus"], help="sets labels=")
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


# ---------------------------------------------------------------------------------------------- problems

def find_problems(cfg: AnnotateConfig, log=print) -> tuple[dict[str, dict], str]:
    """Problem rows by id, and where they came from ("" and {} when they cannot be found: no ground truth)."""
    spec = cfg.problems
    if not spec:
        run_cfg = Path(cfg.samples).resolve().parent / "config.json"
        if not run_cfg.exists():
            log(f"[annotate] no --problems and no {run_cfg}: labels get no question and no ground truth")
            return {}, ""
        gen = json.loads(run_cfg.read_text())
        syn = C.load_config(SyntheticConfig, base=gen.get("synthetic") or {})
        loaded = load_problems(gen["problems"], synthetic=syn)
        return {p["id"]: p for p in loaded.problems}, f"{run_cfg} (problems={gen['problems']})"
    path = Path(spec)
    if path.suffix == ".parquet" and path.exists():
        table = inputs.read_parquet(path, "problems")
        if "quantities" in table.column_names:
            rows = schema.check_table(table, "problem", where=str(path)).to_pylist()
            return {p["id"]: p for p in rows}, str(path)
    loaded = load_problems(spec, synthetic=cfg.synthetic)
    return {p["id"]: p for p in loaded.problems}, spec


def read_parts(folder: Path) -> pa.Table | None:
    parts = sorted(folder.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default") if parts else None


# ------------------------------------------------------------------------------------------------ summary

def quality(hards: list[list[int]], truths_first: list[int], checks: list[list[bool]]) -> dict:
    """Label quality of `hards` against the prefix truth and the per-step checks (pipelines.steps)."""
    prefix = [prefix_truth(f, len(h)) for f, h in zip(truths_first, hards)]
    return {"prefix": label_quality(hards, prefix), "step_check": label_quality(hards, checks),
            "first_error_accuracy": first_error_accuracy([first_error_of(h) for h in hards], truths_first)}


def summarize(labels: pa.Table, diag: pa.Table, problems: dict[str, dict], cfg: AnnotateConfig) -> dict:
    from pipelines.verify import check_steps, first_error

    lab = {r["sample_id"]: r for r in labels.to_pylist()}
    dia = {r["sample_id"]: r for r in diag.to_pylist()}
    ok = [sid for sid in lab if sid in dia]
    hard_all = [h for sid in ok for h in lab[sid]["hard_labels"]]
    labelled = sum(1 for h in hard_all if h in (0, 1))
    fresh = sum(sum(dia[sid]["fresh"] or []) for sid in ok)
    pooled = sum(sum(lab[sid]["rollouts"]) for sid in ok)
    tokens = sum(lab[sid]["tokens_generated"] for sid in ok)
    judge_tokens = sum(dia[sid]["judge_tokens"] or 0 for sid in ok)
    reasons: dict[str, int] = {}
    for r in dia.values():
        if r["error"]:
            key = r["error"].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    s: dict = {
        "method": cfg.method_name(), "rollouts_k": cfg.rollouts, "samples": len(ok), "rejected": sum(reasons.values()),
        "reject_reasons": reasons, "steps": len(hard_all), "labelled_steps": labelled,
        "label_1": sum(1 for h in hard_all if h == 1), "label_0": sum(1 for h in hard_all if h == 0),
        "label_dropped": sum(1 for h in hard_all if h not in (0, 1)),
        "rollouts_generated": fresh, "rollouts_in_pools": pooled, "tokens_generated": tokens,
        "judge_tokens": judge_tokens,
        "rollouts_per_labelled_step": fresh / labelled if labelled else None,
        "tokens_per_labelled_step": tokens / labelled if labelled else None,
        "mean_soft_label": _mean([x for sid in ok for x in lab[sid]["soft_labels"] if not math.isnan(x)]),
        "sample_accuracy": _mean([float(dia[sid]["verdict"]) for sid in ok]),
    }
    gt = [sid for sid in ok if (problems.get(lab[sid]["problem_id"]) or {}).get("quantities")]
    s["ground_truth_samples"] = len(gt)
    if gt:
        firsts, checks, hards, verdict_only = [], [], [], []
        for sid in gt:
            p, steps = problems[lab[sid]["problem_id"]], lab[sid]["steps"]
            firsts.append(first_error(steps, p["quantities"], p["answer"]))
            checks.append(check_steps(steps, p["quantities"], p["answer"]))
            hards.append(lab[sid]["hard_labels"])
            verdict_only.append([int(dia[sid]["verdict"])] * len(steps))
        s["quality"] = quality(hards, firsts, checks)
        s["quality_outcome_baseline"] = quality(verdict_only, firsts, checks)
        s["true_first_error_share"] = _mean([float(f >= 0) for f in firsts])
        if cfg.method == "naive" and not cfg.early_stop and cfg.labels == "mc":
            ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k < cfg.rollouts} | {cfg.rollouts})
            s["quality_by_k"] = {k: quality([hard_at_k(dia[sid]["outcomes"], k) for sid in gt], firsts, checks)
                                 for k in ks}
    return s


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def plot_histogram(labels: pa.Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    soft = [x for xs in labels.column("soft_labels").to_pylist() for x in xs if not math.isnan(x)]
    hard = [h for hs in labels.column("hard_labels").to_pylist() for h in hs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.hist(soft, bins=[i / 10 for i in range(11)], color="#4477aa", edgecolor="white")
    a.set(title="soft labels (share of verified rollouts)", xlabel="soft label", ylabel="steps")
    names = ["dropped (-1)", "wrong (0)", "right (1)"]
    b.bar(names, [sum(1 for h in hard if h == v) for v in (-1, 0, 1)], color=["#bbbbbb", "#cc6677", "#117733"])
    b.set(title="hard labels", ylabel="steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_summary(s: dict) -> str:
    def f(x, spec=".3f"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    lines = [
        f"{'method':<28}{s['method']} (K={s['rollouts_k']})",
        f"{'samples labelled':<28}{s['samples']} ({s['rejected']} set aside: {json.dumps(s['reject_reasons'])})",
        f"{'labelled steps':<28}{s['labelled_steps']} of {s['steps']} (1: {s['label_1']}, 0: {s['label_0']}, "
        f"dropped: {s['label_dropped']})",
        f"{'rollouts generated':<28}{s['rollouts_generated']} ({s['rollouts_in_pools']} in pools with reuse)",
        f"{'rollouts / labelled step':<28}{f(s['rollouts_per_labelled_step'], '.2f')}",
        f"{'tokens / labelled step':<28}{f(s['tokens_per_labelled_step'], '.1f')}",
        f"{'mean soft label':<28}{f(s['mean_soft_label'])}",
        f"{'sample accuracy':<28}{f(s['sample_accuracy'])}",
    ]
    if "quality" in s:
        lines.append(f"label quality on {s['ground_truth_samples']} samples with ground truth "
                     f"(positive class: step is wrong)")
        for name, q in (("labels", s["quality"]), ("outcome-only baseline", s["quality_outcome_baseline"])):
            p, c = q["prefix"], q["step_check"]
            lines.append(f"  {name:<24}prefix truth P {f(p['precision'])} R {f(p['recall'])} F1 {f(p['f1'])} | "
                         f"step checks F1 {f(c['f1'])} | first-error acc {f(q['first_error_accuracy'])} | "
                         f"coverage {f(p['coverage'])}")
        for k, q in (s.get("quality_by_k") or {}).items():
            p = q["prefix"]
            lines.append(f"  {'K=' + str(k):<24}prefix truth P {f(p['precision'])} R {f(p['recall'])} "
                         f"F1 {f(p['f1'])} | first-error acc {f(q['first_error_accuracy'])}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- run

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
    model_path = str(resolve_model(cfg.engine.model, prepare=cfg.engine.model in ("tiny",)))
    judge_path = None
    if cfg.judge.mode == "local" and cfg.judge.model != "same":
        judge_path = str(resolve_model(cfg.judge.model))

    out = Path(cfg.out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "diagnostics").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(C.to_dict(cfg), indent=1, default=str))
    log(f"[annotate] {samples.num_rows} samples (modes {list(cfg.modes)}) from {cfg.samples}; problems: "
        f"{len(problems)} from {source or 'nowhere'}")
    missing = len(set(samples.column("problem_id").to_pylist()) - set(problems))
    if problems and missing:
        log(f"[annotate] {missing} problem ids of the samples are not among those problems (no question, no truth)")
    samples = samples.append_column("question", pa.array(
        [(problems.get(pid) or {}).get("question", "") for pid in samples.column("problem_id").to_pylist()],
        pa.string()))
    samples = samples.append_column("quantities", pa.array(
        [(problems.get(pid) or {}).get("quantities") or [] for pid in samples.column("problem_id").to_pylist()],
        pa.list_(pa.float64())))
    done = read_parts(out / "diagnostics")
    if done is not None:
        seen = pa.array(sorted(set(done.column("sample_id").to_pylist())))
        samples = samples.filter(pa.compute.invert(pa.compute.is_in(samples.column("sample_id"), seen)))
        log(f"[annotate] resuming: {len(seen)} samples already done in {out}, {samples.num_rows} left")

    wall = 0.0
    if samples.num_rows:
        ray = init_ray()
        ds = build_annotation(ray.data.from_arrow(samples), cfg, model_path, _generator_cls(), judge_path)
        wall = stream_labels(ds, out, samples.num_rows, log)

    labels, diag = read_parts(out / "labels"), read_parts(out / "diagnostics")
    if diag is None:
        raise RuntimeError(f"no labels were written under {out}; see the log above")
    labels = labels if labels is not None else schema.to_table([], "step_label")
    with open(out / "rejects.jsonl", "w") as fh:
        for r in diag.filter(pa.compute.not_equal(diag.column("error"), "")).to_pylist():
            fh.write(json.dumps({"sample_id": r["sample_id"], "problem_id": r["problem_id"],
                                 "reason": r["error"]}) + "\n")
    summary = summarize(labels, diag, problems, cfg)
    summary["wall_s"] = wall
    summary["problems_source"] = source
    (out / "summary.json").write_text(json.dumps(finite_json(summary), indent=1))
    plot_histogram(labels, out / "label_histogram.png")
    log("\n" + format_summary(summary))
    log(f"[annotate] labels in {out / 'labels'}, histogram {out / 'label_histogram.png'}")
    if use_mlflow:
        _log_mlflow(cfg, summary, out, log)
    return summary


def stream_labels(ds, out: Path, expected: int, log=print, every_s: float = 10.0) -> float:
    """Consume `ds` block by block: StepLabel parts to labels/, diagnostics to diagnostics/ (tmp + rename, so a
    killed run leaves no half file); a progress line every `every_s` seconds."""
    from pipelines.runtime import Progress

    progress = Progress("annotate", expected, "samples", log=log, every_s=every_s)
    n = steps = fresh = tokens = rejected = 0
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if block.num_rows == 0:
            continue
        name = f"part-{uuid.uuid4().hex[:12]}.parquet"
        good = block.filter(pa.compute.equal(block.column("error"), ""))
        for folder, table in (("labels", good.select(schema.STEP_LABEL.names).cast(schema.versioned("step_label"))),
                              ("diagnostics", block.select(["sample_id", "problem_id", *DIAGNOSTICS.names]))):
            if table.num_rows:
                pq.write_table(table, out / folder / (name + ".tmp"))
                os.replace(out / folder / (name + ".tmp"), out / folder / name)
        n += block.num_rows
        rejected += block.num_rows - good.num_rows
        steps += sum(len(h) for h in good.column("hard_labels").to_pylist())
        fresh += sum(sum(f) for f in good.column("fresh").to_pylist())
        tokens += int(pa.compute.sum(good.column("tokens_generated")).as_py() or 0)
        progress.update(n, set_aside=rejected, steps=steps, rollouts=fresh, tokens=tokens)
    return progress.elapsed()


def _generator_cls():
    from actors.vllm_generator import VLLMGenerator

    return VLLMGenerator


def _log_mlflow(cfg: AnnotateConfig, summary: dict, out: Path, log) -> None:
    import mlflow

    from pipelines.runtime import stage_run

    with stage_run("annotate", cfg):
        flat = C.flatten({k: v for k, v in summary.items() if k != "reject_reasons"})
        mlflow.log_metrics({k.replace("quality_by_k.", "k"): float(v) for k, v in flat.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
                            and not math.isnan(float(v))})
        mlflow.log_artifact(str(out / "summary.json"))
        mlflow.log_artifact(str(out / "label_histogram.png"))
    log(f"[annotate] logged to MLflow ({mlflow_uri()}); view: {mlflow_ui_command()}")


@cli_main("stepray annotate")
def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    run(cfg, use_mlflow=not args.no_mlflow)
    return 0


if __name__ == "__main__":
    sys.exit(main())

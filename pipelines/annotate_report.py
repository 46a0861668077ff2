"""What `stepray annotate` reports and writes besides the labels: the problems behind the samples (questions and
ground truth), label quality against the step checks, the summary table, the label histogram, the streamed parts,
and the MLflow run.

Label quality (synthetic problems, quantities known): precision / recall / F1 of "step is wrong" against the prefix
truth (wrong from the true first error on, what MC labels estimate) and against the per-step checks, first-error
accuracy, the same for the outcome-only baseline (every step labelled with the sample's verdict), and for naive runs
the metrics at K' = 1, 2, 4, .. K computed from the first K' outcomes of each pool.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa

from pipelines import config as C
from pipelines import parts, runs, runtime, schema
from pipelines.annotate import DIAGNOSTICS, AnnotateConfig
from pipelines.problems import load_problems
from pipelines.steps import first_error_accuracy, first_error_of, hard_at_k, label_quality, prefix_truth


def step_format(cfg: AnnotateConfig) -> str:
    """The prompt format the samples were made in: step_format if set, else the generation run's prompt.format."""
    return cfg.step_format or (runs.run_config(cfg.samples).get("prompt") or {}).get("format") or "lines"


def find_problems(cfg: AnnotateConfig, log=print) -> tuple[dict[str, dict], str]:
    """Problem rows by id, and where they came from ("" and {} when they cannot be found: no ground truth)."""
    spec = cfg.problems
    if not spec:
        found, source = runs.run_problems(cfg.samples)
        if not source:
            log(f"[annotate] no --problems, and the run of {cfg.samples} has no {runs.PROBLEMS_FILE} or config.json: "
                f"labels get no question and no ground truth")
        return found, source
    loaded = load_problems(spec, synthetic=cfg.synthetic)  # a Problem parquet keeps its quantities (ground truth)
    return {p["id"]: p for p in loaded.problems}, spec


def attach_problems(samples: pa.Table, problems: dict[str, dict]) -> pa.Table:
    """The samples with their problem's question and quantities ("" and [] where the problem is unknown)."""
    ids = samples.column("problem_id").to_pylist()
    samples = samples.append_column("question", pa.array(
        [(problems.get(pid) or {}).get("question", "") for pid in ids], pa.string()))
    return samples.append_column("quantities", pa.array(
        [(problems.get(pid) or {}).get("quantities") or [] for pid in ids], pa.list_(pa.float64())))


def quality(hards: list[list[int]], truths_first: list[int], checks: list[list[bool]]) -> dict:
    """Label quality of `hards` against the prefix truth and the per-step checks (pipelines.steps)."""
    prefix = [prefix_truth(f, len(h)) for f, h in zip(truths_first, hards)]
    return {"prefix": label_quality(hards, prefix), "step_check": label_quality(hards, checks),
            "first_error_accuracy": first_error_accuracy([first_error_of(h) for h in hards], truths_first)}


def summarize(labels: pa.Table, diag: pa.Table, problems: dict[str, dict], cfg: AnnotateConfig) -> dict:
    from pipelines.train.metrics import step_truth
    from pipelines.verify import check_steps

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
            truth = step_truth(p, steps, dia[sid]["verdict"], dia[sid].get("answer") or "")
            firsts.append(next((i for i, x in enumerate(truth) if not x), -1))
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


def write_label_rejects(diag: pa.Table, path: Path) -> None:
    """The samples that could not be labelled, one JSON line each with the reason."""
    with open(path, "w") as fh:
        for r in diag.filter(pa.compute.not_equal(diag.column("error"), "")).to_pylist():
            fh.write(json.dumps({"sample_id": r["sample_id"], "problem_id": r["problem_id"],
                                 "reason": r["error"]}) + "\n")


def write_planted(problems: dict[str, dict], cfg: AnnotateConfig, out: Path) -> int:
    """cfg.planted solutions with one planted error (or none) per synthetic problem, with their exact step labels
    (`synthetic.planted_solutions`), as StepLabel rows in <out>/labels/part-planted.parquet; returns the count.
    Rewritten whole on a re-run (the rows follow from the problems and the config alone)."""
    import pyarrow.parquet as pq

    from pipelines.synthetic import planted_solutions

    rows = []
    for pid, p in sorted(problems.items()):
        for j, (steps, hard) in enumerate(planted_solutions(p, cfg.planted)):
            rows.append({"problem_id": pid, "sample_id": f"{pid}/planted{j}", "question": p["question"],
                         "steps": steps, "soft_labels": [float(h) for h in hard], "hard_labels": hard,
                         "rollouts": [0] * len(hard), "tokens_generated": 0, "method": "planted",
                         "model": "synthetic", "verifier": "reference path"})
    pq.write_table(schema.to_table(rows, "step_label"), out / "labels" / "part-planted.parquet")
    return len(rows)


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
    if s.get("planted_solutions"):
        lines.append(f"{'planted solutions':<28}{s['planted_solutions']} (labels/part-planted.parquet)")
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


def stream_labels(ds, out: Path, expected: int, log=print, every_s: float = 10.0) -> float:
    """Consume `ds` block by block: StepLabel parts to labels/, diagnostics to diagnostics/ (tmp + rename, so a
    killed run leaves no half file); a progress line every `every_s` seconds."""
    progress = runtime.Progress("annotate", expected, "samples", log=log, every_s=every_s)
    n = steps = fresh = tokens = rejected = 0
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if block.num_rows == 0:
            continue
        name = parts.new_name()  # one name in both folders: a block's labels and diagnostics pair up
        good = block.filter(pa.compute.equal(block.column("error"), ""))
        for folder, table in (("labels", good.select(schema.STEP_LABEL.names).cast(schema.versioned("step_label"))),
                              ("diagnostics", block.select(["sample_id", "problem_id", *DIAGNOSTICS.names]))):
            if table.num_rows:
                parts.write_part(table, out / folder, name)
        n += block.num_rows
        rejected += block.num_rows - good.num_rows
        steps += sum(len(h) for h in good.column("hard_labels").to_pylist())
        fresh += sum(sum(f) for f in good.column("fresh").to_pylist())
        tokens += int(pa.compute.sum(good.column("tokens_generated")).as_py() or 0)
        progress.update(n, set_aside=rejected, steps=steps, rollouts=fresh, tokens=tokens)
    return progress.elapsed()


def log_mlflow(cfg: AnnotateConfig, summary: dict, out: Path, log) -> None:
    flat = C.flatten({k: v for k, v in summary.items() if k != "reject_reasons"})
    runtime.log_stage("annotate", cfg, {k.replace("quality_by_k.", "k"): v for k, v in flat.items()},
                      [out / "summary.json", out / "label_histogram.png"], log=log)

"""Train the generator on its verified samples (SFT), a process reward model or an outcome reward model on Ray Train.

    stepray train sft --data runs/gen --base smollm2 --out runs/sft [--workers 2] [--epochs 2] [key=value ...]
    stepray train prm --data runs/annotate --base smollm2 --out runs/prm [labels.target=hard]
    stepray train orm --data runs/gen --base smollm2 --out runs/orm
    stepray train sft --data runs/gen-r2 --base smollm2 --out runs/sft-r2 round_mode=star previous=runs/sft/model
    python -m jobs.train_model sft ...          (the Ray job entrypoint: ray job submit -- python -m jobs.train_model)

--data: Sample rows (a generate run folder or parquet) for sft and orm, Trajectory rows for sft; StepLabel rows,
PRM800K ratings (.jsonl) or ProcessBench first-error rows (.json) for prm. Writes under --out: config.json,
rejects.jsonl, model/ (the trained model: a transformers folder, or a RewardModel folder for prm/orm),
history.json, loss_curve.png, eval.json, summary.json, ray_results/<run name>/checkpoint_step_*; logs params,
loss, learning rate, tokens/s, the loss curve, the model and the evaluation to one MLflow run.

Crash or kill, then re-run the same command: training resumes from the latest checkpoint (same --out, so the same
Ray Train run name and storage path), and the MLflow run is reopened. A finished run re-run only re-exports and
re-evaluates. Evaluation after training (eval.enabled): sft, greedy accuracy on held-out problems before and after
(vLLM); prm, step-level F1 and AUC of "step is wrong" against ground-truth step checks on held-out synthetic
problems, and ProcessBench F1; orm, AUC on held-out verdicts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from pipelines import config as C
from pipelines.config import InputError, MissingInput
from pipelines.models import resolve_model
from pipelines.problems import data_root, load_problems, write_rejects
from pipelines.prompts import render
from pipelines.runtime import cli_main, init_ray, mlflow_ui_command, mlflow_uri
from pipelines.train import (TrainConfig, auc, build_trainer, export_model, flag_all_f1, greedy_accuracy,
                             latest_checkpoint_step, mlflow_run, predicted_first_error, problems_by_id,
                             processbench_f1, read_examples, read_rows, scored_rows, step_f1, step_truth,
                             tokenize_examples)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, TrainConfig]:
    ap = argparse.ArgumentParser(prog="stepray train", description=__doc__.split("\n\n")[0],
                                 epilog="config keys (key=value overrides):\n" + C.describe(TrainConfig),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=["sft", "prm", "orm"], help="what to train")
    ap.add_argument("--data", help="training rows (sets data=)")
    ap.add_argument("--base", help="base model: smollm2 | tiny | a path (sets base=)")
    ap.add_argument("--out", help="output folder (sets out=)")
    ap.add_argument("--config", help="YAML file with TrainConfig fields")
    ap.add_argument("--workers", type=int, help="Ray Train workers (sets num_workers=)")
    ap.add_argument("--epochs", type=int, help="sets epochs=")
    ap.add_argument("--lr", type=float, help="sets lr=")
    ap.add_argument("--batch-size", type=int, help="rows per worker per step (sets batch_size=)")
    ap.add_argument("--max-steps", type=int, help="sets max_steps=")
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters (sets lora.enabled=true)")
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker (sets use_gpu=true)")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. select.k=2 labels.target=hard")
    args = ap.parse_intermixed_args(argv)  # the task comes first, overrides last, options anywhere
    overrides = [f"task={args.task}", *args.overrides]
    for flag, key in (("data", "data"), ("base", "base"), ("out", "out"), ("workers", "num_workers"),
                      ("epochs", "epochs"), ("lr", "lr"), ("batch_size", "batch_size"), ("max_steps", "max_steps")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.lora:
        overrides.append("lora.enabled=true")
    if args.gpu:
        overrides.append("use_gpu=true")
    if args.no_eval:
        overrides.append("eval.enabled=false")
    if args.no_mlflow:
        overrides.append("mlflow=false")
    cfg = C.load_config(TrainConfig, args.config, overrides)
    if not cfg.data:
        raise C.ConfigError("give the training rows with --data (a parquet file or folder, or a label file)")
    return args, cfg


@cli_main("stepray train")
def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    return run(cfg)


def run(cfg: TrainConfig, log=print) -> int:
    t0 = time.time()
    # --- inputs first (a user's mistake ends here, before any output, Ray or trainer)
    examples = read_examples(cfg)
    log(f"[train {cfg.task}] {cfg.data}: {examples.summary()}")
    if cfg.task == "prm" and cfg.eval.enabled and cfg.eval.truth_data:
        truth_samples(cfg.eval.truth_data)  # a bad eval.truth_data is the user's to fix now, not after training
    init_name = cfg.init_model()
    init_path = str(resolve_model(init_name, prepare=init_name.lower() in ("smollm2", "tiny")))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(C.to_dict(cfg), indent=1, default=str))

    # --- examples -> token rows
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(init_path)
    rows, token_rejects = tokenize_examples(cfg.task, examples.train, tokenizer, cfg)
    rejects = examples.rejects + token_rejects
    write_rejects([{"source": cfg.data, "line": r["row"], "reason": r["reason"], "row": None} for r in rejects],
                  out / "rejects.jsonl")
    n_tokens = sum(len(r["input_ids"]) for r in rows)
    log(f"[train {cfg.task}] {len(rows)} token rows ({n_tokens} tokens, max_len {cfg.max_len}); "
        f"{len(rejects)} rows set aside (see {out / 'rejects.jsonl'}); starting from {init_path} "
        f"({cfg.round_mode if cfg.task == 'sft' else 'base'})")
    if not rows:
        raise InputError(f"training data {cfg.data}: nothing to train on, every row was set aside (reasons: "
                         f"{sorted({r['reason'].split(':')[0] for r in rejects}) or list(examples.dropped)}; rows in "
                         f"{out / 'rejects.jsonl'})")

    # --- Ray, MLflow, the trainer
    init_ray()
    run_id = None
    if cfg.mlflow:
        run_id = mlflow_run(cfg, out, {**C.flatten(C.to_dict(cfg)), "n_train_rows": len(rows),
                                       "n_train_tokens": n_tokens, "init_path": init_path}, log)
        log(f"[train {cfg.task}] MLflow run {run_id} ({mlflow_uri()})")
    resume_step = latest_checkpoint_step(cfg)
    if resume_step:
        log(f"[train {cfg.task}] found checkpoint_step_{resume_step:06d} of run {cfg.resolved_run_name()}: resuming")
    meta = {"task": cfg.task, "prompt": C.to_dict(cfg.prompt), "train_max_len": cfg.max_len, "data": cfg.data}
    trainer = build_trainer(cfg, rows, init_path, init_path, mlflow_uri=mlflow_uri() if run_id else None,
                            mlflow_run_id=run_id, meta=meta)
    from ray.train import TrainingFailedError

    t_fit = time.time()
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        step = latest_checkpoint_step(cfg)
        log(f"[train {cfg.task}] training failed: {str(e).strip().splitlines()[-1][:300]}\n"
            f"[train {cfg.task}] latest checkpoint: step {step} under {cfg.resolved_storage()}/"
            f"{cfg.resolved_run_name()}; re-run the same command to resume from it")
        return 1
    train = export_model(result, out)
    train["fit_s"] = time.time() - t_fit
    log(f"[train {cfg.task}] trained {train['steps']} steps (resumed from {train['resumed_from']}), loss "
        f"{_f(train['first_loss'])} -> {_f(train['final_loss'])}; model: {train['model']}")

    # --- evaluation hooks
    evaluation: dict = {}
    if cfg.eval.enabled:
        evaluation = EVALUATE[cfg.task](cfg, init_path, str(out / "model"), examples, log)
        (out / "eval.json").write_text(json.dumps(evaluation, indent=1))

    summary = {"task": cfg.task, "data": cfg.data, "init": init_path, "round_mode": cfg.round_mode,
               "train_rows": len(rows), "train_problems": len({e["problem_id"] for e in examples.train}),
               "train_tokens": n_tokens, "rejected": len(rejects),
               "not_selected": examples.dropped, "holdout_rows": len(examples.holdout), "train": train,
               "eval": evaluation, "wall_s": time.time() - t0, "mlflow_run_id": run_id}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if run_id:
        import mlflow

        mlflow.set_tracking_uri(mlflow_uri())
        with mlflow.start_run(run_id=run_id):
            metrics = {f"eval.{k}": float(v) for k, v in C.flatten(evaluation).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            mlflow.log_metrics({**metrics, "train.fit_s": train["fit_s"]})
            mlflow.log_artifact(str(out / "summary.json"))
    log("\n" + format_summary(summary))
    if run_id:
        log(f"MLflow: {mlflow_ui_command()}")
    return 0


def _f(x, fmt: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_summary(s: dict) -> str:
    t = s["train"]
    lines = [f"{'task':<26}{s['task']} ({s['round_mode'] if s['task'] == 'sft' else 'from base'})",
             f"{'training rows':<26}{s['train_rows']} ({s['train_tokens']} tokens), {s['rejected']} set aside, "
             f"{s['holdout_rows']} held out",
             f"{'steps':<26}{t['steps']} (resumed from {t['resumed_from']})",
             f"{'loss':<26}{_f(t['first_loss'])} -> {_f(t['final_loss'])}",
             f"{'tokens/s (mean)':<26}{_f(t['tokens_per_s'], '.0f')}",
             f"{'model':<26}{t['model']}"]
    flat = C.flatten(s["eval"])
    width = max([26, *(len(k) + 7 for k in flat)])
    for k, v in flat.items():
        lines.append(f"{'eval.' + k:<{width}}{_f(v) if isinstance(v, float) else v}")
    lines.append(f"{'wall':<26}{s['wall_s']:.0f}s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Evaluation hooks: one per task (EVALUATE[task])
# ----------------------------------------------------------------------------------------------------------

def evaluate_sft(cfg: TrainConfig, init_path: str, model_path: str, examples, log) -> dict:
    """Greedy accuracy on held-out problems, before (the starting model) and after training, through vLLM."""
    import ray
    from transformers import AutoTokenizer

    from actors.vllm_generator import VLLMGenerator

    problems = load_problems(cfg.eval.problems, synthetic=cfg.eval.synthetic,
                             limit=cfg.eval.limit or None).problems
    # a held-out problem whose question is inside a training prompt is not held out: leave it out, and say so
    train_prompts = [e["prompt"] for e in examples.train]
    overlap = [p for p in problems if any(p["question"] in tp for tp in train_prompts)]
    problems = [p for p in problems if p not in overlap]
    tok = AutoTokenizer.from_pretrained(model_path)
    prompts = [render(tok, p["question"], p["kind"], cfg.prompt) for p in problems]
    eng = cfg.eval.engine
    opts = {"num_cpus": eng.num_cpus, **({"num_gpus": eng.num_gpus} if eng.num_gpus else {})}
    result = {"heldout_problems": len(problems), "overlap_left_out": len(overlap), "source": cfg.eval.problems}
    for name, path in (("before", init_path), ("after", model_path)):
        t = time.time()
        gen = ray.remote(**opts)(VLLMGenerator).remote(path, eng.engine_kwargs(), {}, eng.threads, name)
        try:
            ray.get(gen.ready.remote())
            acc = greedy_accuracy(gen, problems, prompts, cfg.eval.max_tokens)
        finally:
            ray.kill(gen)
        result[f"greedy_{name}"] = acc["accuracy"]
        result[f"tokens_{name}"] = acc["tokens"]
        log(f"[eval sft] greedy accuracy {name}: {acc['correct']}/{acc['problems']} = {acc['accuracy']:.3f} "
            f"({time.time() - t:.0f}s, {path})")
    result["greedy_delta"] = result["greedy_after"] - result["greedy_before"]
    return result


def evaluate_prm(cfg: TrainConfig, init_path: str, model_path: str, examples, log) -> dict:
    """Step-level F1/AUC against ground-truth step checks (held-out synthetic problems) and ProcessBench F1."""
    from transformers import AutoTokenizer

    from actors.prm_scorer import PRMScorer

    tok = AutoTokenizer.from_pretrained(model_path)
    ev = cfg.eval
    result: dict = {}
    truth_problems = problems_by_id([e["problem_id"] for e in examples.holdout], ev.truth_synthetic)
    held = [e for e in examples.holdout if e["problem_id"] in truth_problems]
    if not held:
        result["synthetic_skipped"] = (f"no held-out rows with ground truth ({len(examples.holdout)} held out; "
                                       f"ids must be syn-{ev.truth_synthetic.key()}-<i>, set eval.truth_synthetic "
                                       f"to the generation's synthetic config)")
        log(f"[eval prm] {result['synthetic_skipped']}")
    else:
        result["synthetic"] = _truth_metrics(cfg, tok, model_path, held, truth_problems)
        log(f"[eval prm] held-out labelled solutions: {_truth_line(result['synthetic'])}")
    if ev.truth_data:
        samples, problems, left_out = truth_samples(ev.truth_data)
        result["truth_data"] = {**_truth_metrics(cfg, tok, model_path, samples, problems), "path": ev.truth_data,
                                "left_out": left_out}
        log(f"[eval prm] samples of {ev.truth_data}: {_truth_line(result['truth_data'])}; not scored: "
            f"{left_out or 'none'}")
    for subset in ev.processbench:
        path = data_root() / "processbench" / f"{subset}.json"
        if not path.exists():
            result[f"processbench_{subset}_skipped"] = f"{path} not found (set STEPRAY_DATA)"
            log(f"[eval prm] ProcessBench {subset}: {path} not found, skipped")
            continue
        rows = json.loads(path.read_text())
        if ev.processbench_limit:  # the first N erroneous and the first N correct solutions: both accuracies exist
            rows = ([r for r in rows if r["label"] >= 0][: ev.processbench_limit]
                    + [r for r in rows if r["label"] < 0][: ev.processbench_limit])
        t = time.time()
        items = [{"idx": i, "prompt": render(tok, r["problem"], "math", cfg.prompt), "steps": r["steps"]}
                 for i, r in enumerate(rows)]
        scored = sorted(scored_rows(_items_dataset(items), model_path, PRMScorer, ev.batch_size, ev.max_len,
                                    *_scorer_device(cfg)),
                        key=lambda r: r["idx"])
        pred = [predicted_first_error(list(s["step_scores"]), ev.threshold) for s in scored]
        pb = processbench_f1(pred, [int(r["label"]) for r in rows])
        pb["unscored_steps"] = sum(sum(math.isnan(x) for x in s["step_scores"]) for s in scored)
        result[f"processbench_{subset}"] = pb
        log(f"[eval prm] ProcessBench {subset}: F1 {pb['f1']:.3f} (error acc {pb['error_acc']:.3f}, correct acc "
            f"{pb['correct_acc']:.3f}, {pb['n']} solutions, {time.time() - t:.0f}s)")
    return result


def _items_dataset(items: list[dict]):
    """A Ray Data dataset of the rows to score, on a Ray started here if the caller has none: init_ray is idempotent
    and starts a fresh local cluster, where Ray Data's auto-init would join a stale one named in /tmp/ray."""
    import ray.data

    init_ray()
    return ray.data.from_items(items)


def truth_samples(path: str) -> tuple[list[dict], dict[str, dict], dict[str, int]]:
    """Finished samples of a `stepray generate` run on synthetic problems, those problems rebuilt from the run's
    config.json (their ground-truth quantities give every step's truth), and the rows not scored, by reason."""
    from pipelines.problems import SyntheticConfig

    run = Path(path)
    conf = run / "config.json"
    if not conf.exists():
        raise MissingInput(f"eval.truth_data={path}: no config.json there; give a `stepray generate` run folder "
                                f"made on synthetic problems")
    gen = json.loads(conf.read_text())
    synthetic = C.load_config(SyntheticConfig, base=gen.get("synthetic") or {})
    kind, rows = read_rows(run)
    if kind != "sample":
        raise InputError(f"eval.truth_data={path}: expected Sample rows (a generate run), found {kind} rows")
    problems = problems_by_id([r["problem_id"] for r in rows], synthetic)
    samples, left_out = [], {}
    for r in rows:  # what is not scored is counted by reason (reported in eval.json), never silently dropped
        why = ("not_this_synthetic_config" if r["problem_id"] not in problems else "engine_error" if r.get("error")
               else "unfinished" if r.get("finish_reason") != "stop" else "no_steps" if not r.get("steps") else "")
        if why:
            left_out[why] = left_out.get(why, 0) + 1
        else:
            samples.append(r)
    if not samples:
        raise InputError(f"eval.truth_data={path}: no finished samples of synthetic problems (ids "
                         f"syn-{synthetic.key()}-<i>) to score")
    return samples, problems, left_out


def _truth_metrics(cfg: TrainConfig, tok, model_path: str, rows: list[dict], problems: dict[str, dict]) -> dict:
    """Score rows {problem_id, question | prompt, steps} with the PRM against ground-truth step checks: step-level
    P/R/F1 and AUC of "step is wrong", the flag-all baseline, and the first-error accuracy per solution."""

    from actors.prm_scorer import PRMScorer

    ev = cfg.eval
    items = [{"idx": i, "steps": list(e["steps"]),
              "prompt": render(tok, e["question"], "numeric", cfg.prompt) if e.get("question") else e["prompt"]}
             for i, e in enumerate(rows)]
    scored = sorted(scored_rows(_items_dataset(items), model_path, PRMScorer, ev.batch_size, ev.max_len,
                                *_scorer_device(cfg)), key=lambda r: r["idx"])
    truth, pred, flat_scores, flat_ok, fe_hits = [], [], [], [], 0
    for e, r in zip(rows, scored):
        ok = step_truth(problems[e["problem_id"]], e["steps"])
        scores = list(r["step_scores"])
        keep = [j for j, s in enumerate(scores) if not math.isnan(s)]
        truth.append([ok[j] for j in keep])
        pred.append([scores[j] >= ev.threshold for j in keep])
        flat_scores += [scores[j] for j in keep]
        flat_ok += [ok[j] for j in keep]
        true_fe = next((j for j, o in enumerate(ok) if not o), -1)
        fe_hits += predicted_first_error(scores, ev.threshold) == true_fe
    f1 = step_f1(pred, truth)
    return {**f1, "auc_wrong": auc([-s for s in flat_scores], [not o for o in flat_ok]),
            "flag_all_f1": flag_all_f1(f1["wrong_share"]), "first_error_acc": fe_hits / max(len(rows), 1),
            "solutions": len(rows)}


def _truth_line(m: dict) -> str:
    return (f"F1(step wrong) {m['f1']:.3f} (flag-all baseline {m['flag_all_f1']:.3f}), AUC {m['auc_wrong']:.3f} "
            f"(chance 0.5), first-error accuracy {m['first_error_acc']:.3f}, {m['steps']} steps of "
            f"{m['solutions']} solutions")


def evaluate_orm(cfg: TrainConfig, init_path: str, model_path: str, examples, log) -> dict:
    """AUC of the ORM's score against the verifier's verdicts on held-out problems."""

    from actors.prm_scorer import PRMScorer

    if not examples.holdout:
        log("[eval orm] no held-out rows (eval.holdout_fraction is 0 or too small): skipped")
        return {"skipped": "no held-out rows"}
    items = [{"idx": i, "prompt": e["prompt"], "completion": e["completion"]} for i, e in enumerate(examples.holdout)]
    scored = sorted(scored_rows(_items_dataset(items), model_path, PRMScorer, cfg.eval.batch_size,
                                cfg.eval.max_len, *_scorer_device(cfg)), key=lambda r: r["idx"])
    scores = [r["score"] for r in scored]
    labels = [e["target"] >= 0.5 for e in examples.holdout]
    res = {"auc": auc(scores, labels), "accuracy": sum((s >= 0.5) == y for s, y in zip(scores, labels)) / len(labels),
           "positives": sum(labels), "rows": len(labels)}
    log(f"[eval orm] held-out verdicts: AUC {res['auc']:.3f}, accuracy@0.5 {res['accuracy']:.3f} "
        f"({res['positives']} correct of {res['rows']})")
    return res


def _scorer_device(cfg: TrainConfig) -> tuple[float, str]:
    """(GPUs per scorer actor, torch device): the scorer follows eval.engine.num_gpus (chosen here, in the job)."""
    gpus = cfg.eval.engine.num_gpus
    return gpus, ("cuda" if gpus else "cpu")


EVALUATE = {"sft": evaluate_sft, "prm": evaluate_prm, "orm": evaluate_orm}


if __name__ == "__main__":
    sys.exit(main())

"""Train the generator on its verified samples (SFT), a process or outcome reward model, or a V-STaR verifier (DPO)
on Ray Train.

    stepray train sft --data runs/gen --base smollm2 --out runs/sft [--workers 2] [--epochs 2] [key=value ...]
    stepray train prm --data runs/annotate --base smollm2 --out runs/prm [labels.target=hard]
    stepray train orm --data runs/gen --base smollm2 --out runs/orm
    stepray train dpo --data runs/gen --base runs/sft/model --out runs/vstar     (V-STaR: pairs verified over failed)
    stepray train genrm --data runs/gen --base smollm2 --out runs/genrm          (GenRM: "Is the answer correct?")
    stepray train sft --data runs/gen-r2 --base smollm2 --out runs/sft-r2 round_mode=continue previous=runs/sft/model
    python -m jobs.train_model sft ...          (the Ray job entrypoint: ray job submit -- python -m jobs.train_model)

--data: Sample rows (a generate run folder or parquet) for sft, orm and dpo, Trajectory rows for sft; StepLabel rows,
PRM800K ratings (.jsonl) or ProcessBench first-error rows (.json) for prm. Writes under --out: config.json,
rejects.jsonl, model/ (the trained model: a transformers folder, for dpo with verifier.json naming its reference,
or a RewardModel folder for prm/orm),
history.json, loss_curve.png, eval.json, summary.json, ray_results/<run name>/checkpoint_step_*; logs params,
loss, learning rate, tokens/s, the loss curve, the model and the evaluation to one MLflow run.

Crash or kill, then re-run the same command: training resumes from the latest checkpoint (same --out) and the
MLflow run is reopened. Evaluation after training (eval.enabled): sft, greedy accuracy on held-out problems before
and after; prm, F1 and AUC of "step is wrong" against the step checks and ProcessBench F1; orm, AUC on verdicts;
dpo, how often the verifier ranks the verified solution of a held-out pair first, and its AUC on their verdicts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipelines import config as C
from pipelines.config import InputError
from pipelines.models import load_path
from pipelines.problems import write_rejects
from pipelines.runtime import cli_main, init_ray, mlflow_ui_command, mlflow_uri
from pipelines.train import (TrainConfig, build_trainer, export_model, latest_checkpoint_step, mlflow_run,
                             read_examples, tokenize_examples)
from pipelines.train.evaluation import EVALUATE, fmt, format_summary, log_evaluation, truth_samples

def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, TrainConfig]:
    ap = argparse.ArgumentParser(prog="stepray train", description=__doc__.split("\n\n")[0],
                                 epilog="config keys (key=value overrides):\n" + C.describe(TrainConfig),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=["sft", "prm", "orm", "dpo", "genrm"],
                    help="what to train (dpo: a V-STaR verifier; genrm: a generative verifier)")
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
    switches = {"lora": "lora.enabled=true", "gpu": "use_gpu=true", "no_eval": "eval.enabled=false",
                "no_mlflow": "mlflow=false"}
    overrides += [setting for flag, setting in switches.items() if getattr(args, flag)]
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
    init_path = load_path(init_name)
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
    run_id = mlflow_run(cfg, out, {**C.flatten(C.to_dict(cfg)), "n_train_rows": len(rows),
                                   "n_train_tokens": n_tokens, "init_path": init_path}, log) if cfg.mlflow else None
    if run_id:
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
        f"{fmt(train['first_loss'])} -> {fmt(train['final_loss'])}; model: {train['model']}")

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
    log("\n" + format_summary(summary))
    if run_id:
        log_evaluation(run_id, evaluation, train["fit_s"], out / "summary.json")
        log(f"MLflow: {mlflow_ui_command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

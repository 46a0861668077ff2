"""Driver side: planning steps, the TorchTrainer, resuming, exporting the model, the MLflow run."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from pipelines.config import InputError
from pipelines.train.config import CURVE_FILE, HISTORY_FILE, MALLOC_ENV, STATE_FILE, TrainConfig
from pipelines.train.worker import train_loop_per_worker

def plan_steps(n_rows: int, cfg: TrainConfig) -> tuple[int, int]:
    """(steps per epoch, total steps): every rank gets n_rows // workers rows (equal split), full batches only."""
    per_epoch = (n_rows // cfg.num_workers) // cfg.batch_size
    if per_epoch < 1:
        raise InputError(f"training data: {n_rows} training rows cannot fill one step of {cfg.num_workers} workers x batch "
                         f"{cfg.batch_size}; lower batch_size / num_workers or give more data")
    total = cfg.max_steps or per_epoch * cfg.epochs
    return per_epoch, total


def build_trainer(cfg: TrainConfig, rows: list[dict], init_path: str, tokenizer_path: str,
                  mlflow_uri: str | None = None, mlflow_run_id: str | None = None, meta: dict | None = None,
                  loop_extras: dict | None = None):
    """The TorchTrainer over token rows (shuffled once with random.Random(cfg.seed)); call .fit().
    loop_extras: test-only keys merged into the workers' config (see `train_loop_per_worker`)."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.config import to_dict

    per_epoch, total = plan_steps(len(rows), cfg)
    rows = list(rows)
    random.Random(cfg.seed).shuffle(rows)
    ds = ray.data.from_items(rows)
    resources = {"CPU": cfg.cpus_per_worker}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "init": init_path, "tokenizer": tokenizer_path,
                           "steps_per_epoch": per_epoch, "total_steps": total, "mlflow_uri": mlflow_uri,
                           "mlflow_run_id": mlflow_run_id, "meta": meta or {},
                           "save_dtype": checkpoint_dtype(init_path), **(loop_extras or {})},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.resolved_run_name(), storage_path=cfg.resolved_storage(),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": dict(MALLOC_ENV)} if cfg.tune_malloc else None),
        datasets={"train": ds})


def latest_checkpoint_step(cfg: TrainConfig) -> int:
    """Step of the checkpoint a re-run resumes from (0 when none): the latest one Ray Train registered in its
    `checkpoint_manager_snapshot.json`. A folder written by a run killed before registering it is not counted
    (Ray Train does not resume from it either)."""
    folder = Path(cfg.resolved_storage()) / cfg.resolved_run_name()
    snapshot = folder / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return 0
    m = re.search(r"checkpoint_step_(\d+)$", latest.get("checkpoint_dir_name") or "")
    return int(m.group(1)) if m else 0


def export_model(result, out: Path) -> dict:
    """Copy the final checkpoint's model/, history and loss curve to `out`; return the training summary."""
    import torch

    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint; nothing to export")
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=False)
        if not state.get("done") or not (d / "model").exists():
            raise RuntimeError(f"the latest checkpoint {d} is not a finished run (step {state['step']}); re-run "
                               f"the same command to continue")
        if (out / "model").exists():
            shutil.rmtree(out / "model")
        shutil.copytree(d / "model", out / "model")
        for name in (HISTORY_FILE, CURVE_FILE):
            if (d / name).exists():
                shutil.copy(d / name, out / name)
    history = state["history"]
    return {"steps": state["step"], "resumed_from": state["resumed_from"],
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "tokens_per_s": (sum(h["tokens_per_s"] for h in history) / len(history)) if history else None,
            "checkpoint": str(result.checkpoint.path), "model": str(out / "model")}


def checkpoint_dtype(path: str) -> str:
    """The dtype a checkpoint folder was saved in (config.json `dtype` / `torch_dtype`), "float32" if unknown."""
    try:
        conf = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    value = conf.get("dtype") or conf.get("torch_dtype") or "float32"
    return value if value in ("float32", "bfloat16", "float16") else "float32"


def mlflow_run(cfg: TrainConfig, out: Path, params: dict[str, Any], log: Callable[[str], None] = print) -> str:
    """Create (or, on a re-run of the same out folder, reopen) the MLflow run; returns its id."""
    import mlflow

    from pipelines.runtime import mlflow_uri

    mlflow.set_tracking_uri(mlflow_uri())
    marker = out / "mlflow_run.json"
    if marker.exists():
        run_id = json.loads(marker.read_text())["run_id"]
        try:
            mlflow.get_run(run_id)
            return run_id
        except Exception:  # noqa: BLE001 - the store was wiped or changed: start a new run
            log(f"[train] MLflow run {run_id} not found in {mlflow_uri()}; starting a new one")
    mlflow.set_experiment(cfg.experiment)
    from pipelines.runtime import mlflow_parent_tags

    with mlflow.start_run(run_name=f"train-{cfg.task}-{cfg.resolved_run_name()}", tags=mlflow_parent_tags()) as run:
        mlflow.log_params({k: str(v)[:250] for k, v in params.items()})
    marker.write_text(json.dumps({"run_id": run.info.run_id}))
    return run.info.run_id

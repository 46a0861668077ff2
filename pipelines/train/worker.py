"""What runs on every Ray Train worker: collation, the loss, the model, the optimizer groups and LR schedule,
saving, and `train_loop_per_worker` (a module-level function, so Ray pickles it by reference)."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.train.config import CURVE_FILE, HISTORY_FILE, STATE_FILE, TrainConfig, malloc_tuned

LM_TASKS = ("sft", "dpo", "genrm")  # tasks that train a causal LM (the others a RewardModel with a scalar head)

def collate_batch(task: str, batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """A batch of token rows (dict of columns, lists or numpy arrays) -> padded tensors for the task's loss."""
    import torch

    from pipelines.reward_model import pad_batch

    seqs = [list(map(int, x)) for x in batch["input_ids"]]
    n_prompt = [int(n) for n in batch["n_prompt"]] if task in LM_TASKS else []
    if task == "dpo":  # the chosen rows, then the rejected rows: one forward pass over 2B sequences
        seqs += [list(map(int, x)) for x in batch["rejected_ids"]]
        n_prompt += n_prompt
    input_ids, attention = pad_batch(seqs, pad_id)  # (B or 2B, T), (B or 2B, T)
    out = {"input_ids": input_ids, "attention_mask": attention,
           "weights": torch.tensor([float(w) for w in batch["weight"]], dtype=torch.float32)}  # (B,)
    if task in LM_TASKS:
        n_prompt = torch.tensor(n_prompt)  # (B,) or (2B,)
        pos = torch.arange(input_ids.shape[1])[None, :]  # (1, T)
        out["loss_mask"] = (pos >= n_prompt[:, None]) & attention.bool()  # (B, T)
    elif task == "prm":
        width = max(len(p) for p in batch["positions"])
        positions = torch.full((len(seqs), width), -1, dtype=torch.long)  # (B, S)
        targets = torch.full((len(seqs), width), float("nan"))  # (B, S)
        for i, (p, t) in enumerate(zip(batch["positions"], batch["targets"])):
            positions[i, : len(p)] = torch.tensor(list(map(int, p)), dtype=torch.long)
            targets[i, : len(t)] = torch.tensor(list(map(float, t)))
        out["positions"], out["targets"] = positions, targets
    else:
        out["targets"] = torch.tensor([float(t) for t in batch["target"]])  # (B,)
    return out


def compute_loss(task: str, model, batch: dict[str, Any], reference=None, beta: float = 0.1):
    """The task's loss on a collated batch (model: the causal LM, or a RewardModel; either possibly DDP-wrapped;
    reference: DPO's frozen reference model)."""
    import torch

    from pipelines import losses

    if task in ("sft", "genrm"):  # GenRM is SFT on verdicts (and weighted solutions): tokenize_examples
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        return losses.sft_loss(logits, batch["input_ids"], batch["loss_mask"], batch["weights"])
    if task == "dpo":
        ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]  # (2B, T) each
        policy = losses.sequence_logps(model(input_ids=ids, attention_mask=mask).logits, ids, targets)  # (2B,)
        with torch.no_grad():
            ref = losses.sequence_logps(reference(input_ids=ids, attention_mask=mask).logits, ids, targets)  # (2B,)
        b = batch["weights"].shape[0]
        return losses.dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], beta, batch["weights"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, T)
    if task == "prm":
        step_logits, present = losses.gather_positions(logits, batch["positions"])  # (B, S), (B, S)
        mask = present & ~torch.isnan(batch["targets"])  # (B, S)
        return losses.prm_loss(step_logits, batch["targets"], mask, batch["weights"])
    last = losses.last_positions(batch["attention_mask"])  # (B,)
    return losses.orm_loss(logits.gather(1, last[:, None]).squeeze(1), batch["targets"], batch["weights"])


def build_model(task: str, init_path: str, cfg: TrainConfig, meta: dict | None = None):
    """The model to train, in fp32: a causal LM (sft, dpo, genrm) or a RewardModel (prm/orm), with LoRA adapters if
    asked."""
    import torch

    from pipelines.reward_model import RewardModel, is_reward_model

    if task in LM_TASKS:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(init_path, dtype=torch.float32)
    elif is_reward_model(init_path):
        model = RewardModel.load(init_path)
        if model.kind != task:
            raise ValueError(f"{init_path} is a {model.kind} model, not a {task} model")
    else:
        model = RewardModel.from_base(init_path, kind=task, step_sep=cfg.separator(), meta=meta)
    lm = task in LM_TASKS
    if cfg.freeze_layers:
        freeze_lower(model if lm else model.backbone, cfg.freeze_layers)
    if cfg.gradient_checkpointing:
        # non-reentrant checkpointing works under DDP and with frozen (LoRA) inputs
        (model if lm else model.backbone).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        import peft

        lcfg = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                               target_modules=list(cfg.lora.target_modules),
                               task_type="CAUSAL_LM" if lm else "FEATURE_EXTRACTION")
        if lm:
            model = peft.get_peft_model(model, lcfg)
        else:
            model.backbone = peft.get_peft_model(model.backbone, lcfg)
    return model


def freeze_lower(backbone, n: int) -> None:
    """Freeze the input embeddings and the lowest n transformer blocks of a transformers model (a causal LM or its
    bare backbone): backward then stops at block n, so a step costs the forward plus the upper blocks' backward.

    With tied input/output embeddings (SmolLM2) an SFT model's output layer is frozen with them."""
    inner = getattr(backbone, "model", backbone)  # LlamaForCausalLM.model / LlamaModel
    blocks = getattr(inner, "layers", None)
    if blocks is None:
        raise ValueError(f"freeze_layers: {type(backbone).__name__} has no `layers` list of transformer blocks; "
                         "set freeze_layers=0 for this model")
    if n >= len(blocks):
        raise ValueError(f"freeze_layers={n} would freeze all {len(blocks)} blocks; use fewer (or LoRA)")
    backbone.get_input_embeddings().requires_grad_(False)
    for block in blocks[:n]:
        block.requires_grad_(False)


def worker_setup(cfg, tokenizer_path: str):
    """What every training worker does first (the Ray Train loop's and GRPO's): its rank and world size, torch threads
    (cfg.threads, else its CPUs) and seed, the tokenizer and its pad id. Returns (rank, world, tokenizer, pad_id)."""
    import ray.train
    import torch
    from transformers import AutoTokenizer

    ctx = ray.train.get_context()
    torch.set_num_threads(cfg.threads or max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ctx.get_world_rank(), ctx.get_world_size(), tokenizer, pad_id


def frozen_model(path: str):
    """A causal LM in fp32, in eval mode, with no parameter trained: a reference model (DPO's, GRPO's KL)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def restore_latest(model) -> dict | None:
    """Inside a Ray Train worker: the state of the checkpoint Ray Train resumes from (None on a fresh run), its
    trained parameters loaded into `model` (a checkpoint holding parameters the model lacks is refused)."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
    missing = set(state["model"]) - {n for n, _ in model.named_parameters()}
    if missing:
        raise RuntimeError(f"checkpoint does not fit this model: unknown parameters {sorted(missing)[:5]}")
    model.load_state_dict(state["model"], strict=False)
    return state


def resolve_precision(precision: str, device) -> str:
    """"bf16" or "fp32" for this worker's device (a torch.device): `auto` takes bf16 where the hardware computes it
    natively (`pipelines.models.bf16_native`). The one place the precision is decided, for GPU and CPU workers."""
    from pipelines.models import bf16_native

    if precision != "auto":
        return precision
    return "bf16" if bf16_native(device.type) else "fp32"


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups: the reward model's scalar head at `head_lr`, everything else at `lr`.

    Why a head rate of its own: the head starts from a near-zero init (scores at 0.5) and is the only part without
    pretraining; at a fine-tuning rate (5e-5) each of its 577 weights moves at most ~5e-5 per Adam step, so on a few
    hundred labelled solutions (30-40 steps) it can hardly leave 0.5. A larger head rate is common practice for
    fresh heads on pretrained bodies; measured here it did not help: on the demo's 143 labelled solutions head_lr=1e-3
    gave AUC 0.490 against 0.545 at lr 5e-5 for both (1,265 held-out steps), so the default is off (0 = lr). The schedule (warmup, decay) scales both groups.
    """
    model = model.module if hasattr(model, "module") else model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if n.startswith("head.")] if cfg.task != "sft" and cfg.head_lr else []
    ids = {id(p) for p in head}
    groups = [{"params": [p for _, p in named if id(p) not in ids], "lr": cfg.lr}]
    if head:
        groups.append({"params": head, "lr": cfg.head_lr})
    return groups


def trainable_state(model) -> dict:
    """The parameters being trained (all of them, or LoRA adapters + reward head): what a checkpoint must hold."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_final_model(task: str, model, tokenizer, path: Path, save_dtype, verifier: dict | None = None) -> None:
    """Merge LoRA adapters (if any) and write a loadable folder: a causal LM (sft, dpo, genrm) or a RewardModel
    folder. DPO and GenRM models are verifiers: VERIFIER_FILE says which (and, for DPO, its reference and beta)."""
    if task in LM_TASKS:
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.to(save_dtype).save_pretrained(str(path), safe_serialization=True)
        tokenizer.save_pretrained(str(path))
        if task in ("dpo", "genrm"):
            from actors.vstar_scorer import VERIFIER_FILE

            kind = {"dpo": "vstar", "genrm": "genrm"}[task]
            meta = verifier or {}
            if task == "genrm":  # p(Yes) needs no reference model; cot: a rationale comes before the verdict
                meta = {"prompt": meta.get("prompt"), "cot": bool(meta.get("cot"))}
            else:
                meta = {k: v for k, v in meta.items() if k != "cot"}
            (path / VERIFIER_FILE).write_text(json.dumps({"kind": kind, **meta}, indent=1))
    else:
        if hasattr(model.backbone, "merge_and_unload"):
            model.backbone = model.backbone.merge_and_unload()
        model.save(path, tokenizer=tokenizer, dtype=save_dtype)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def plot_loss_curve(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_loop_per_worker(config: dict) -> None:
    """Runs on each worker. config: {"cfg": TrainConfig as a dict, "init": model path, "steps_per_epoch",
    "total_steps", "tokenizer": path, "mlflow_uri", "mlflow_run_id", "meta", "save_dtype"}, plus what a test adds
    through `build_trainer(loop_extras=...)`: "_test_crash_after_step" (fail after that step's report in a run that
    did not resume), kept out of TrainConfig so no user config can set it."""
    import ray.train
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn
    from ray.train import Checkpoint
    import ray.train.torch
    from ray.train.torch import prepare_model

    from pipelines.config import load_config

    t_begin = time.time()
    cfg = load_config(TrainConfig, base=config["cfg"])
    task = cfg.task
    rank, world, tokenizer, pad_id = worker_setup(cfg, config["tokenizer"])
    model = build_model(task, config["init"], cfg, meta=config.get("meta"))
    # DPO's reference: the model training starts from, frozen (V-STaR: the SFT generator)
    reference = frozen_model(config["init"]) if task == "dpo" else None
    save_dtype = getattr(torch, config.get("save_dtype") or "float32")
    state = restore_latest(model)
    torch.manual_seed(cfg.seed * 1000 + 1 + rank)  # LoRA dropout: different masks per rank, reproducible
    model = prepare_model(model)
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg.precision, device)
    autocast = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": precision == "bf16"}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total, per_epoch = config["total_steps"], config["steps_per_epoch"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total, cfg.schedule))
    step, history = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
    resumed_from = step
    crash_after_step = int(config.get("_test_crash_after_step") or 0)

    mlflow = None
    if rank == 0 and config.get("mlflow_run_id"):
        import mlflow

        mlflow.set_tracking_uri(config["mlflow_uri"])
        mlflow.start_run(run_id=config["mlflow_run_id"])
    tuned = malloc_tuned()  # tune_malloc reached this worker
    if rank == 0:
        print(f"[train {task}] {'resuming from step ' + str(step) if step else 'starting'}: {total} steps "
              f"({per_epoch} per epoch), {world} workers x batch {cfg.batch_size}; model ready in "
              f"{time.time() - t_begin:.1f}s; {precision} on {device.type}; glibc malloc {'tuned' if tuned else 'as is'}",
              flush=True)

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return collate_batch(task, batch, pad_id)

    def unwrapped():
        return model.module if hasattr(model, "module") else model

    def save_state(d: str, done: bool) -> None:
        torch.save({"model": trainable_state(unwrapped()), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "history": history, "done": done,
                    "resumed_from": resumed_from}, os.path.join(d, STATE_FILE))
        (Path(d) / HISTORY_FILE).write_text(json.dumps(history))

    try:
        shard = ray.train.get_dataset_shard("train")
        t_log, tokens_log, t_start = time.time(), 0, time.time()
        report_s = 0.0  # how long the previous report (+ checkpoint) took: the Ray Train overhead inside a window
        data_wait = [0.0]  # seconds this window spent waiting for the next batch from the Ray Data shard
        losses_log: list[float] = []
        while step < total:
            epoch, skip = divmod(step, per_epoch)
            model.train()
            batches = shard.iter_torch_batches(batch_size=cfg.batch_size, collate_fn=Collate(), drop_last=True,
                                               local_shuffle_buffer_size=4 * cfg.batch_size,
                                               local_shuffle_seed=cfg.seed * 1000 + epoch)
            seen = 0
            for i, batch in enumerate(_timed(batches, data_wait)):
                seen = i + 1
                if i < skip:
                    continue  # resumed mid-epoch: these batches were trained on before the interruption
                if i >= per_epoch or step >= total:
                    break
                with torch.autocast(**autocast):  # the loss itself is taken in fp32 (pipelines.losses)
                    loss = compute_loss(task, model, batch, reference, cfg.beta)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                stats = torch.tensor([loss.item(), float(batch["attention_mask"].sum())], dtype=torch.float64,
                                     device=loss.device)  # on the loss's device: nccl reduces GPU tensors only
                if world > 1:
                    torch.distributed.all_reduce(stats)  # sum over ranks: mean loss, global tokens
                losses_log.append(stats[0].item() / world)
                tokens_log += int(stats[1].item())
                last = step == total
                if step % cfg.log_every and step % cfg.checkpoint_every and not last:
                    continue
                now = time.time()
                lr = scheduler.get_last_lr()[0]
                metrics = {"step": step, "epoch": epoch, "loss": sum(losses_log) / len(losses_log), "lr": lr,
                           "tokens_per_s": tokens_log / max(now - t_log, 1e-9), "resumed_from": resumed_from,
                           "window_tokens": tokens_log, "window_s": now - t_log, "report_s": report_s,
                           "data_s": data_wait[0], "malloc_tuned": int(tuned), "bf16": int(precision == "bf16")}
                history.append({k: metrics[k] for k in ("step", "loss", "lr", "tokens_per_s", "window_tokens",
                                                        "window_s", "report_s", "data_s")})
                if rank == 0:
                    eta = (now - t_start) / max(step - resumed_from, 1) * (total - step)
                    print(f"[train {task}] step {step}/{total} epoch {epoch} loss {metrics['loss']:.4f} "
                          f"lr {lr:.2e} {metrics['tokens_per_s']:.0f} tokens/s ETA {eta:.0f}s", flush=True)
                    if mlflow is not None:
                        mlflow.log_metrics({k: float(metrics[k]) for k in ("loss", "lr", "tokens_per_s", "epoch")},
                                           step=step)
                # the next window starts now: it includes this report and checkpoint, so tokens/s counts their cost
                losses_log, tokens_log, t_log, data_wait[0] = [], 0, now, 0.0
                with tempfile.TemporaryDirectory() as d:
                    ckpt = None
                    if rank == 0 and (step % cfg.checkpoint_every == 0 or last):
                        save_state(d, done=last)
                        if last:
                            plot_loss_curve(history, Path(d) / CURVE_FILE, f"{task}: {cfg.resolved_run_name()}")
                            save_final_model(task, unwrapped(), tokenizer, Path(d) / "model", save_dtype,
                                             verifier={"reference": config["init"], "beta": cfg.beta,
                                                       "cot": cfg.genrm_cot,
                                                       "prompt": (config.get("meta") or {}).get("prompt")})
                            if mlflow is not None:
                                mlflow.log_artifact(str(Path(d) / CURVE_FILE))
                                if cfg.mlflow_log_model:
                                    mlflow.log_artifacts(str(Path(d) / "model"), artifact_path="model")
                        ckpt = Checkpoint.from_directory(d)
                    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_step_{step:06d}"
                                     if ckpt is not None else None)
                report_s = time.time() - now
                if crash_after_step and step == crash_after_step and resumed_from == 0:
                    # "After this step's report" = after Ray Train registered it. report() returns once the
                    # checkpoint is uploaded; the controller registers it asynchronously, and a failure it sees first
                    # leaves the previous checkpoint as the latest (seen on a slow machine: 4 instead of 8).
                    ray.train.get_all_reported_checkpoints(
                        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
                    raise RuntimeError(f"crash_after_step={step}: simulated failure after this step's report "
                                       f"(re-run the same command to resume)")
            if step < total and seen < per_epoch:  # the shard ran dry early: the equal split failed
                raise RuntimeError(f"rank {rank}: epoch {epoch} gave {seen} batches, expected {per_epoch}")
        if mlflow is not None:
            mlflow.end_run()
    except BaseException:
        if mlflow is not None:
            mlflow.end_run(status="FAILED")
        raise


def _timed(batches, wait: list[float]):
    """Yields from `batches`, adding the time each `next` blocked to wait[0]: how long training waited on data."""
    it = iter(batches)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        wait[0] += time.perf_counter() - t
        yield batch

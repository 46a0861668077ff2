"""Training on Ray Train: generator SFT on verified samples (ReST-EM / STaR), process and outcome reward models.

    parquet ──read_examples──> examples (pure: selection, labels, hold-out)  ──tokenize_examples──> token rows
            ──ray.data.from_items──> TorchTrainer(train_loop_per_worker, datasets={"train": ...}) ──> checkpoints
            ──export_model──> <out>/model  (a transformers folder: the generator, or a RewardModel folder)

Data (driver side, pure functions tested as tables). Rejection sampling keeps only verified samples; what is
kept for the generator (`select_sft`): correct, no generation error, finished by a stop (not cut at max_tokens)
when `select.require_stop`, deduplicated per problem on whitespace-normalised text, at most `select.k` per
problem (in sample order: samples are i.i.d., so the first k are as good as any k), and, with `select.balance`,
weighted 1/n_p so every problem with a kept sample weighs the same (easy problems would otherwise dominate with k
samples each). Trajectory rows are used as given. Process labels come from (`labels.source`):
    step_label    StepLabel rows (Monte-Carlo annotation): soft_labels (NaN = no estimate) or hard_labels (-1 = none)
    prm800k       PRM800K ratings per step, -1 / 0 / 1: flat rows {question, steps, ratings} or PRM800K's own
                  jsonl ({question: {problem}, label: {steps: [{completions, chosen_completion, ...}]}})
    processbench  ProcessBench rows {problem, steps, label}: label = index of the first wrong step, -1 if none
All become prefix values (what Monte-Carlo labels estimate): c_t = 1 while no error has occurred up to step t;
after the first wrong step later steps are 0 (`labels.after_error="zero"`) or carry no label ("drop").
PRM800K's neutral rating 0 maps to `labels.neutral` (1.0 by default: a neutral step is not an error, so the
prefix is still correct; 0.5 reads it as uncertain). Outcome labels are Sample.correct.
Problems whose hashed id falls in `eval.holdout_fraction` are kept out of PRM/ORM training for evaluation.

Token rows (`tokenize_examples`): SFT rows are `prompt + completion + <eos>` with the loss on the completion and
<eos> only (the end-of-turn token teaches the model to stop); PRM rows use `reward_model.encode_steps` (the score at
the separator ending each step); ORM rows `encode_outcome`. Rows whose prompt alone fills max_len are set aside.

Ray Train (V2, the default on Ray 2.60). One function runs on every worker: `prepare_model` (DDP: gloo on CPU,
nccl on GPU), data from `get_dataset_shard("train").iter_torch_batches` (equal streaming split, drop_last, so every
rank takes the same number of steps), `ray.train.report(metrics, checkpoint=...)` every `checkpoint_every` steps
and at the end, `FailureConfig(max_failures)` retries from the latest checkpoint. Resume after a crash or a kill:
re-run with the same `run_name` and `storage_path` (the defaults derive both from `out`); `ray.train.get_checkpoint()`
then returns the latest checkpoint, and the loop restores model, optimizer, LR schedule and step, and skips the
batches of the interrupted epoch it already trained on (the same number of batches: which rows they hold may differ,
since Ray Data's streaming split hands out blocks dynamically). A run that already finished resumes at its last step
and ends at once.

MLflow (rank 0 only): the driver creates the run (params, so a re-run can reopen it), rank 0 reopens it by id and
logs loss, learning rate and tokens/s per logged step, and at the end the loss curve PNG and the final model as
artifacts. Why not `ray.air.integrations.mlflow.setup_mlflow` (it works on 2.60 inside a V2 train function):
it always starts a new MLflow run, so a resumed training would split one loss curve over two runs.

Seeds: the run seed S seeds the model/head init (torch.manual_seed(S) on every rank, so all ranks build the same
model before DDP also broadcasts rank 0's), the driver's row shuffle (random.Random(S)), each epoch's local
shuffle buffer (seed S * 1000 + epoch; ranks read different shards, so they need no separate seed) and, after the
model is built, torch's RNG on rank r (S * 1000 + 1 + r: LoRA dropout masks differ between ranks).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pipelines import schema
from pipelines.config import help_field
from pipelines.generate import EngineConfig
from pipelines.problems import SyntheticConfig
from pipelines.prompts import PromptConfig, render

TASKS = ("sft", "prm", "orm")
LABEL_SOURCES = ("auto", "step_label", "prm800k", "processbench", "sample", "trajectory")
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
CURVE_FILE = "loss_curve.png"
# glibc malloc settings for the training workers (`TrainConfig.tune_malloc`). Ray Train V2 runs the train function
# in a thread of the worker actor, and glibc gives a non-main thread an arena of its own whose heaps hold at most
# 64 MB: every larger block (one SFT batch's logits, ~300 MB for SmolLM2 at batch 8) is mmapped and munmapped at
# every step and its pages faulted in again. One arena with fixed mmap and trim thresholds keeps such blocks in the
# heap for reuse. Measured here (SmolLM2 SFT, the plain loop run in a Python thread, 2 threads, one run each):
# 235 tokens/s as is, 275 with these three, 184 with the arena and trim settings alone (a fixed trim threshold
# turns off glibc's adaptive mmap threshold). An env var because glibc reads these at process start; no allocator
# library (jemalloc, tcmalloc) is installable from PyPI here, and glibc's own knobs need none.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def malloc_tuned() -> bool:
    """Whether this process started under MALLOC_ENV (glibc reads it at process start only)."""
    return all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = help_field(False, "train LoRA adapters (peft) instead of all weights; merged into the saved model")
    r: int = help_field(16, "LoRA rank")
    alpha: int = help_field(32, "LoRA alpha (scale = alpha / r)")
    dropout: float = help_field(0.05, "dropout on the LoRA input")
    target_modules: tuple[str, ...] = help_field(("q_proj", "k_proj", "v_proj", "o_proj"),
                                                 "module names that get adapters")

    def __post_init__(self) -> None:
        if self.enabled and (self.r < 1 or self.alpha < 1 or not self.target_modules):
            raise ValueError("LoRA needs r >= 1, alpha >= 1 and at least one target module")


@dataclass(frozen=True)
class SelectConfig:
    k: int = help_field(2, "SFT: most verified samples kept per problem (after dedup); 0 = no cap")
    dedup: bool = help_field(True, "drop samples of a problem whose whitespace-normalised text repeats")
    balance: bool = help_field(False, "SFT: weight samples 1/n_p so each problem weighs the same")
    require_stop: bool = help_field(True, "SFT: keep only samples that ended with a stop, not at max_tokens")

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"select.k must be >= 0, got {self.k}")


@dataclass(frozen=True)
class LabelConfig:
    source: str = help_field("auto", "auto | step_label | prm800k | processbench | sample | trajectory")
    target: str = help_field("soft", "PRM from StepLabel rows: soft (MC share) or hard (any success) labels")
    neutral: float = help_field(1.0, "PRM800K: the target of a neutral (0) rating")
    after_error: str = help_field("zero", "steps after the first wrong one: zero (prefix value 0) or drop (no label)")

    def __post_init__(self) -> None:
        if self.source not in LABEL_SOURCES:
            raise ValueError(f"labels.source {self.source!r} is not one of {list(LABEL_SOURCES)}")
        if self.target not in ("soft", "hard"):
            raise ValueError(f"labels.target must be soft or hard, got {self.target!r}")
        if self.after_error not in ("zero", "drop"):
            raise ValueError(f"labels.after_error must be zero or drop, got {self.after_error!r}")
        if not 0.0 <= self.neutral <= 1.0:
            raise ValueError(f"labels.neutral must be within [0, 1], got {self.neutral}")


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = help_field(True, "run the evaluation hooks after training")
    holdout_fraction: float = help_field(0.1, "PRM/ORM: share of problems (by hashed id) kept out of training")
    problems: str = help_field("synthetic", "SFT: held-out problems for greedy accuracy (source name or file)")
    synthetic: SyntheticConfig = help_field(SyntheticConfig(seed=1), "SFT held-out synthetic problems (seed 1: "
                                            "disjoint from the generation default, seed 0)")
    limit: int = help_field(200, "SFT: held-out problems evaluated (0 = all)")
    max_tokens: int = help_field(160, "SFT: most new tokens of a greedy answer")
    truth_synthetic: SyntheticConfig = help_field(SyntheticConfig(), "PRM: the synthetic config that made the "
                                                  "labelled problems (their ids carry its key); ground-truth steps")
    truth_data: str = help_field("", "PRM: a `stepray generate` run folder on held-out synthetic problems: every "
                                 "finished sample's steps are scored against the ground-truth step checks (the "
                                 "problems are rebuilt from the run's config.json); empty = skip")
    processbench: tuple[str, ...] = help_field(("gsm8k", "math"), "PRM: ProcessBench subsets (empty = skip)")
    processbench_limit: int = help_field(0, "PRM: first N erroneous + first N correct solutions per ProcessBench "
                                         "subset (0 = all)")
    threshold: float = help_field(0.5, "PRM: a step scoring below this is predicted wrong")
    max_len: int = help_field(2048, "PRM/ORM: most tokens scored per solution")
    batch_size: int = help_field(8, "PRM/ORM: solutions per scorer forward pass")
    engine: EngineConfig = help_field(EngineConfig(max_model_len=1024), "SFT: the vLLM engine for greedy "
                                      "decoding (its `model` is ignored: the models under test are used)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"eval.holdout_fraction must be within [0, 1), got {self.holdout_fraction}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"eval.threshold must be within (0, 1), got {self.threshold}")


@dataclass(frozen=True)
class TrainConfig:
    task: str = help_field("sft", "sft (generator) | prm (process reward model) | orm (outcome reward model)")
    data: str = help_field("", "parquet file or folder (a generate run's folder works), or a .json/.jsonl label file")
    base: str = help_field("smollm2", "base checkpoint: smollm2 | tiny | a local path")
    out: str = help_field("runs/train", "output folder: model/, summary.json, loss_curve.png, ray_results/")
    round_mode: str = help_field("rest_em", "rest_em: start from `base` each round; star: continue from `previous`")
    previous: str = help_field("", "star: the previous round's model folder")
    prompt: PromptConfig = help_field(PromptConfig(), "how questions become prompts (PRM rows, SFT evaluation)")
    step_sep: str = help_field("\n", "PRM: the separator that ends each step (where the score is read)")
    max_len: int = help_field(512, "most tokens per training example")
    epochs: int = help_field(2, "passes over the training rows")
    max_steps: int = help_field(0, "stop after this many optimizer steps (0 = epochs decide)")
    batch_size: int = help_field(4, "rows per worker per step (global batch = batch_size * num_workers)")
    lr: float = help_field(2e-5, "peak learning rate (AdamW)")
    head_lr: float = help_field(0.0, "PRM/ORM: peak learning rate of the fresh scalar head (0 = lr); see "
                                "`param_groups`")
    weight_decay: float = help_field(0.0, "AdamW weight decay")
    warmup_steps: int = help_field(0, "linear warmup steps")
    schedule: str = help_field("constant", "after warmup: constant | linear | cosine (decay to 0)")
    grad_clip: float = help_field(1.0, "clip the global gradient norm (0 = off)")
    gradient_checkpointing: bool = help_field(False, "recompute activations in backward: far less memory per "
                                              "worker (SmolLM2 at batch 4 x 512 tokens: several GB), ~30% slower")
    seed: int = help_field(0, "seeds model init, row shuffle and epoch shuffles (see the module docstring)")
    num_workers: int = help_field(2, "Ray Train workers (DDP ranks)")
    use_gpu: bool = help_field(False, "one GPU per worker (nccl); False = CPU workers (gloo)")
    cpus_per_worker: float = help_field(1.0, "CPUs Ray reserves per worker")
    threads: int = help_field(0, "torch threads per worker (0 = cpus_per_worker, at least 1)")
    checkpoint_every: int = help_field(50, "report a checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = help_field(2, "checkpoints kept in storage (the latest ones)")
    log_every: int = help_field(10, "report metrics and print a progress line every N steps")
    run_name: str = help_field("", "Ray Train run name (empty = <task>-<name of out>); the same name resumes")
    storage_path: str = help_field("", "Ray Train storage (empty = <out>/ray_results); shared storage on a cluster")
    max_failures: int = help_field(0, "FailureConfig: worker-group failures retried from the latest checkpoint")
    crash_after_step: int = help_field(0, "testing: fail after this step's report in a run that did not resume")
    tune_malloc: bool = help_field(True, "start the workers with glibc malloc settings (MALLOC_ENV) that keep each "
                                   "step's large tensors in the heap instead of mmap + page faults (CPU: ~15% "
                                   "more tokens/s measured); no effect off glibc")
    mlflow: bool = help_field(True, "log to MLflow (MLFLOW_TRACKING_URI, else ./mlruns.db)")
    experiment: str = help_field("stepray", "MLflow experiment")
    mlflow_log_model: bool = help_field(True, "log the final model folder as an MLflow artifact")
    lora: LoraConfig = help_field(LoraConfig(), "LoRA adapters instead of full fine-tuning")
    select: SelectConfig = help_field(SelectConfig(), "SFT sample selection")
    labels: LabelConfig = help_field(LabelConfig(), "where labels come from and how they map to targets")
    eval: EvalConfig = help_field(EvalConfig(), "evaluation after training")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {list(TASKS)}")
        if self.round_mode not in ("rest_em", "star"):
            raise ValueError(f"round_mode must be rest_em or star, got {self.round_mode!r}")
        if self.head_lr < 0:
            raise ValueError(f"head_lr must be >= 0 (0 = lr), got {self.head_lr}")
        if self.round_mode == "star" and not self.previous:
            raise ValueError("round_mode=star continues from the previous round's model: set previous=<model folder>")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule must be constant, linear or cosine, got {self.schedule!r}")
        if self.num_workers < 1 or self.batch_size < 1 or self.epochs < 1 or self.max_steps < 0:
            raise ValueError("need num_workers >= 1, batch_size >= 1, epochs >= 1, max_steps >= 0")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("checkpoint_every, log_every and keep_checkpoints must be >= 1")
        if self.max_len < 16 or self.lr <= 0:
            raise ValueError("max_len must be >= 16 and lr > 0")
        if not self.step_sep:
            raise ValueError("step_sep must not be empty")

    def init_model(self) -> str:
        """What the run starts from: the base (ReST-EM) or the previous round's model (STaR)."""
        return self.previous if self.round_mode == "star" else self.base

    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.task}-{Path(self.out).name}"

    def resolved_storage(self) -> str:
        return self.storage_path or str(Path(self.out).resolve() / "ray_results")


# ----------------------------------------------------------------------------------------------------------
# Reading rows and turning them into examples (pure)
# ----------------------------------------------------------------------------------------------------------

def data_files(path: str | Path) -> list[Path]:
    """The files behind --data: a file, or a folder's *.parquet (a generate run's `samples/`, an annotate run's
    `labels/`)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"training data {p} does not exist; give a parquet file or folder (e.g. the "
                                f"samples/ of `stepray generate`), or a .json/.jsonl label file")
    if p.is_file():
        return [p]
    for sub in ("samples", "labels"):  # a `stepray generate` or a `stepray annotate` output folder
        if (p / sub).is_dir() and not list(p.glob("*.parquet")):
            p = p / sub
            break
    files = sorted(f for f in p.glob("*.parquet") if f.is_file())
    if not files:
        raise FileNotFoundError(f"no *.parquet files in {p}")
    return files


def read_rows(path: str | Path) -> tuple[str, list[dict]]:
    """(detected row kind, rows) from parquet files (schema-checked when they are a stepray kind) or json/jsonl."""
    files = data_files(path)
    rows: list[dict] = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(f)
            kind = detect_kind(table.column_names, {})
            if kind in ("sample", "step_label", "trajectory"):
                table = schema.check_table(table, kind, where=str(f))
            rows.extend(table.to_pylist())
        elif f.suffix == ".json":
            data = json.loads(f.read_text())
            if not isinstance(data, list):
                raise ValueError(f"{f}: expected a JSON array of rows (ProcessBench layout)")
            rows.extend(data)
        elif f.suffix == ".jsonl":
            with f.open() as fh:
                rows.extend(json.loads(line) for line in fh if line.strip())
        else:
            raise ValueError(f"{f}: unsupported file type {f.suffix!r}; use .parquet, .json or .jsonl")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return detect_kind(list(rows[0].keys()), rows[0]), rows


def detect_kind(columns: Sequence[str], first: dict) -> str:
    cols = set(columns)
    if "soft_labels" in cols and "steps" in cols:
        return "step_label"
    if {"correct", "completion", "prompt"} <= cols:
        return "sample"
    if {"completion", "prompt", "weight"} <= cols:
        return "trajectory"
    if "steps" in cols and "label" in cols and isinstance(first.get("label"), int):
        return "processbench"
    if "steps" in cols and "ratings" in cols:
        return "prm800k"
    if isinstance(first.get("label"), dict) and "steps" in first["label"]:
        return "prm800k"
    return "unknown"


_ACCEPTS = {"sft": ("sample", "trajectory"), "prm": ("step_label", "prm800k", "processbench"), "orm": ("sample",)}


def _norm_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def select_sft(samples: Sequence[dict], cfg: SelectConfig) -> tuple[list[dict], dict[str, int]]:
    """Verified samples -> Trajectory rows (module docstring). Returns (rows, counts of why the others were left)."""
    why: dict[str, int] = {}
    by_problem: dict[str, list[dict]] = {}
    for s in samples:
        reason = ("error" if s.get("error") else "not_correct" if not s.get("correct")
                  else "no_stop" if cfg.require_stop and s.get("finish_reason") != "stop"
                  else "empty" if not str(s.get("completion") or "").strip() else "")
        if reason:
            why[reason] = why.get(reason, 0) + 1
            continue
        by_problem.setdefault(s["problem_id"], []).append(s)
    kept: list[dict] = []
    for pid, rows in by_problem.items():
        rows = sorted(rows, key=lambda r: (r.get("mode") != "sample", r.get("sample_idx") or 0, r["sample_id"]))
        seen: set[str] = set()
        mine = []
        for r in rows:
            key = _norm_text(r["completion"])
            if cfg.dedup and key in seen:
                why["duplicate"] = why.get("duplicate", 0) + 1
                continue
            seen.add(key)
            if cfg.k and len(mine) >= cfg.k:
                why["over_k"] = why.get("over_k", 0) + 1
                continue
            mine.append(r)
        weight = 1.0 / len(mine) if cfg.balance else 1.0
        kept += [{"problem_id": pid, "sample_id": r["sample_id"], "prompt": r["prompt"],
                  "completion": r["completion"], "weight": weight} for r in mine]
    return kept, why


def targets_from_step_label(soft: Sequence[float | None], hard: Sequence[int | None], target: str) -> list[float]:
    """StepLabel -> targets; NaN where there is no label (soft NaN/None, hard -1/None)."""
    if target == "soft":
        return [float("nan") if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in soft]
    return [float("nan") if v is None or v < 0 else float(v) for v in hard]


def targets_from_ratings(ratings: Sequence[int], neutral: float, after_error: str) -> list[float]:
    """PRM800K ratings (-1 / 0 / 1) -> prefix values: 1 (good), `neutral` (0), 0 from the first -1 on."""
    out: list[float] = []
    failed = False
    for r in ratings:
        if failed:
            out.append(0.0 if after_error == "zero" else float("nan"))
        elif r is None:
            out.append(float("nan"))
        elif r < 0:
            out.append(0.0)
            failed = True
        else:
            out.append(1.0 if r > 0 else float(neutral))
    return out


def targets_from_first_error(first_error: int, n_steps: int, after_error: str) -> list[float]:
    """ProcessBench label (first wrong step, -1 = none) -> prefix values 1 ... 1, 0, then 0 or no label."""
    if first_error < 0:
        return [1.0] * n_steps
    after = 0.0 if after_error == "zero" else float("nan")
    return [1.0 if i < first_error else 0.0 if i == first_error else after for i in range(n_steps)]


def _prm800k_native(row: dict) -> tuple[str, list[str], list[int | None]] | None:
    """PRM800K's own jsonl row -> (question, steps, ratings) along the chosen path; None when unusable."""
    question = (row.get("question") or {}).get("problem")
    steps, ratings = [], []
    for st in (row.get("label") or {}).get("steps") or []:
        comps = st.get("completions") or []
        chosen = st.get("chosen_completion")
        if chosen is not None and 0 <= chosen < len(comps):
            c = comps[chosen]
        elif st.get("human_completion"):
            c = {"text": st["human_completion"].get("text", ""), "rating": 1}  # written by the labeller
        else:  # no choice: the labeller stopped here, at a wrong step if one was rated -1
            c = next((c for c in comps if c.get("rating") == -1), comps[0] if comps else None)
            if c is None:
                break
            steps.append(c.get("text", ""))
            ratings.append(c.get("rating"))
            break
        steps.append(c.get("text", ""))
        ratings.append(c.get("rating"))
    if not question or not steps:
        return None
    return question, steps, ratings


def in_holdout(problem_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether a problem is held out: sha1(f"{seed}:{problem_id}") as a number in [0, 1) below `fraction`."""
    if fraction <= 0:
        return False
    h = int(hashlib.sha1(f"{seed}:{problem_id}".encode()).hexdigest()[:8], 16)
    return h / 2**32 < fraction


@dataclass
class Examples:
    kind: str  # the row kind that was read
    train: list[dict]
    holdout: list[dict]  # PRM/ORM rows of held-out problems (evaluation)
    rejects: list[dict]  # {"row": id, "reason": ...}: rows set aside, with why
    dropped: dict[str, int]  # SFT: samples not selected, by reason

    def summary(self) -> str:
        s = f"{len(self.train)} training examples ({self.kind} rows)"
        if self.holdout:
            s += f", {len(self.holdout)} held out"
        if self.dropped:
            s += ", not selected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items()))
        if self.rejects:
            s += f", {len(self.rejects)} rejected"
        return s


def build_examples(kind: str, rows: Sequence[dict], cfg: TrainConfig) -> Examples:
    """Rows of a detected kind -> the task's examples (see the module docstring for every source)."""
    if cfg.labels.source not in ("auto", kind):
        raise ValueError(f"labels.source={cfg.labels.source} but {cfg.data} holds {kind} rows")
    if kind not in _ACCEPTS[cfg.task]:
        raise ValueError(f"`stepray train {cfg.task}` needs {' or '.join(_ACCEPTS[cfg.task])} rows, but {cfg.data} "
                         f"holds {kind} rows")
    rejects: list[dict] = []
    dropped: dict[str, int] = {}
    out: list[dict] = []
    if cfg.task == "sft":
        if kind == "sample":
            out, dropped = select_sft(rows, cfg.select)
        else:
            out = [{k: r[k] for k in ("problem_id", "sample_id", "prompt", "completion", "weight")} for r in rows]
    elif cfg.task == "orm":
        seen: set[tuple[str, str]] = set()
        for r in rows:
            if r.get("error"):
                rejects.append({"row": r.get("sample_id"), "reason": "generation_error"})
                continue
            key = (r["problem_id"], _norm_text(r["completion"]))
            if cfg.select.dedup and key in seen:
                dropped["duplicate"] = dropped.get("duplicate", 0) + 1
                continue
            seen.add(key)
            out.append({"problem_id": r["problem_id"], "sample_id": r["sample_id"], "prompt": r["prompt"],
                        "completion": r["completion"], "target": 1.0 if r["correct"] else 0.0, "weight": 1.0})
    else:
        for i, r in enumerate(rows):
            if kind == "step_label":
                q, steps = r["question"], list(r["steps"] or [])
                tg = targets_from_step_label(r["soft_labels"] or [], r["hard_labels"] or [], cfg.labels.target)
                pid, sid = r["problem_id"], r["sample_id"]
            elif kind == "processbench":
                q, steps = r["problem"], list(r["steps"])
                tg = targets_from_first_error(int(r["label"]), len(steps), cfg.labels.after_error)
                pid = sid = str(r.get("id", i))
            else:
                if "ratings" in r:
                    parsed = (r.get("question") or r.get("problem"), list(r["steps"]), list(r["ratings"]))
                else:
                    parsed = _prm800k_native(r)
                if parsed is None or not parsed[0]:
                    rejects.append({"row": i, "reason": "prm800k: no question or no rated step"})
                    continue
                q, steps, ratings = parsed
                tg = targets_from_ratings(ratings, cfg.labels.neutral, cfg.labels.after_error)
                pid = str(r.get("id") or hashlib.sha1(q.encode()).hexdigest()[:12])
                sid = f"{pid}/{i}"
            if len(tg) != len(steps):
                rejects.append({"row": sid if kind != "prm800k" else i,
                                "reason": f"label_length: {len(tg)} labels for {len(steps)} steps"})
                continue
            if not steps or all(math.isnan(t) for t in tg):
                rejects.append({"row": sid, "reason": "no_labelled_step"})
                continue
            out.append({"problem_id": pid, "sample_id": sid, "question": q, "steps": steps, "targets": tg,
                        "weight": 1.0})
    train, holdout = out, []
    if cfg.task in ("prm", "orm") and cfg.eval.enabled and cfg.eval.holdout_fraction > 0:
        train = [e for e in out if not in_holdout(e["problem_id"], cfg.eval.holdout_fraction, cfg.seed)]
        holdout = [e for e in out if in_holdout(e["problem_id"], cfg.eval.holdout_fraction, cfg.seed)]
    return Examples(kind, train, holdout, rejects, dropped)


def read_examples(cfg: TrainConfig) -> Examples:
    kind, rows = read_rows(cfg.data)
    return build_examples(kind, rows, cfg)


# ----------------------------------------------------------------------------------------------------------
# Tokenizing (driver) and collating (workers)
# ----------------------------------------------------------------------------------------------------------

def encode_sft(tokenizer, prompt: str, completion: str, max_len: int) -> tuple[list[int], int] | None:
    """prompt + completion + eos -> (ids, number of prompt tokens); the completion is cut at max_len.

    None when the prompt leaves no room for a completion token (the row is set aside by the caller).
    """
    p = tokenizer.encode(prompt, add_special_tokens=False)
    c = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    if len(p) >= max_len:
        return None
    return (p + c)[:max_len], len(p)


def tokenize_examples(task: str, examples: Sequence[dict], tokenizer, cfg: TrainConfig
                      ) -> tuple[list[dict], list[dict]]:
    """Examples -> token rows for Ray Data and rejects. Columns: input_ids, weight, and per task
    sft: n_prompt (prompt tokens, no loss); prm: positions (step-end token indices), targets (NaN = no label);
    orm: target."""
    rows, rejects = [], []
    for e in examples:
        row: dict[str, Any] = {"weight": float(e.get("weight", 1.0))}  # only the task's columns (no empty lists)
        if task == "sft":
            enc = encode_sft(tokenizer, e["prompt"], e["completion"], cfg.max_len)
            if enc is None:
                rejects.append({"row": e["sample_id"], "reason": f"prompt_too_long: max_len={cfg.max_len}"})
                continue
            row["input_ids"], row["n_prompt"] = enc
        elif task == "prm":
            from pipelines.reward_model import encode_steps

            prompt = render(tokenizer, e["question"], "numeric", cfg.prompt)
            ids, pos = encode_steps(tokenizer, prompt, e["steps"], cfg.step_sep, cfg.max_len)
            targets = e["targets"][: len(pos)]
            if not pos or all(math.isnan(t) for t in targets):
                rejects.append({"row": e["sample_id"], "reason": f"no_labelled_step_within max_len={cfg.max_len}"})
                continue
            row["input_ids"], row["positions"], row["targets"] = ids, pos, targets
        else:
            from pipelines.reward_model import encode_outcome

            ids, _ = encode_outcome(tokenizer, e["prompt"], e["completion"], cfg.max_len)
            row["input_ids"], row["target"] = ids, float(e["target"])
        rows.append(row)
    return rows, rejects


def collate_batch(task: str, batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """A batch of token rows (dict of columns, lists or numpy arrays) -> padded tensors for the task's loss."""
    import torch

    from pipelines.reward_model import pad_batch

    seqs = [list(map(int, x)) for x in batch["input_ids"]]
    input_ids, attention = pad_batch(seqs, pad_id)  # (B, T), (B, T)
    out = {"input_ids": input_ids, "attention_mask": attention,
           "weights": torch.tensor([float(w) for w in batch["weight"]], dtype=torch.float32)}  # (B,)
    if task == "sft":
        n_prompt = torch.tensor([int(n) for n in batch["n_prompt"]])  # (B,)
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


def compute_loss(task: str, model, batch: dict[str, Any]):
    """The task's loss on a collated batch (model: the causal LM, or a RewardModel; either possibly DDP-wrapped)."""
    import torch

    from pipelines import losses

    if task == "sft":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        return losses.sft_loss(logits, batch["input_ids"], batch["loss_mask"], batch["weights"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, T)
    if task == "prm":
        step_logits, present = losses.gather_positions(logits, batch["positions"])  # (B, S), (B, S)
        mask = present & ~torch.isnan(batch["targets"])  # (B, S)
        return losses.prm_loss(step_logits, batch["targets"], mask, batch["weights"])
    last = losses.last_positions(batch["attention_mask"])  # (B,)
    return losses.orm_loss(logits.gather(1, last[:, None]).squeeze(1), batch["targets"], batch["weights"])


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------

def build_model(task: str, init_path: str, cfg: TrainConfig, meta: dict | None = None):
    """The model to train, in fp32: a causal LM (sft) or a RewardModel (prm/orm), with LoRA adapters if asked."""
    import torch

    from pipelines.reward_model import RewardModel, is_reward_model

    if task == "sft":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(init_path, dtype=torch.float32)
    elif is_reward_model(init_path):
        model = RewardModel.load(init_path)
        if model.kind != task:
            raise ValueError(f"{init_path} is a {model.kind} model, not a {task} model")
    else:
        model = RewardModel.from_base(init_path, kind=task, step_sep=cfg.step_sep, meta=meta)
    if cfg.gradient_checkpointing:
        # non-reentrant checkpointing works under DDP and with frozen (LoRA) inputs
        (model if task == "sft" else model.backbone).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        import peft

        lcfg = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                               target_modules=list(cfg.lora.target_modules),
                               task_type="CAUSAL_LM" if task == "sft" else "FEATURE_EXTRACTION")
        if task == "sft":
            model = peft.get_peft_model(model, lcfg)
        else:
            model.backbone = peft.get_peft_model(model.backbone, lcfg)
    return model


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


def save_final_model(task: str, model, tokenizer, path: Path, save_dtype) -> None:
    """Merge LoRA adapters (if any) and write a loadable folder: a causal LM (sft) or a RewardModel folder."""
    if task == "sft":
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.to(save_dtype).save_pretrained(str(path), safe_serialization=True)
        tokenizer.save_pretrained(str(path))
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


# ----------------------------------------------------------------------------------------------------------
# The loop on every Ray Train worker
# ----------------------------------------------------------------------------------------------------------

def train_loop_per_worker(config: dict) -> None:
    """Runs on each worker. config: {"cfg": TrainConfig as a dict, "init": model path, "steps_per_epoch",
    "total_steps", "tokenizer": path, "mlflow_uri", "mlflow_run_id", "meta", "save_dtype"}."""
    import ray.train
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model
    from transformers import AutoTokenizer

    from pipelines.config import load_config

    t_begin = time.time()
    cfg = load_config(TrainConfig, base=config["cfg"])
    task = cfg.task
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads or max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(config["tokenizer"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = build_model(task, config["init"], cfg, meta=config.get("meta"))
    save_dtype = getattr(torch, config.get("save_dtype") or "float32")

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        missing = set(state["model"]) - {n for n, _ in model.named_parameters()}
        if missing:
            raise RuntimeError(f"checkpoint does not fit this model: unknown parameters {sorted(missing)[:5]}")
        model.load_state_dict(state["model"], strict=False)
    torch.manual_seed(cfg.seed * 1000 + 1 + rank)  # LoRA dropout: different masks per rank, reproducible
    model = prepare_model(model)
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

    mlflow = None
    if rank == 0 and config.get("mlflow_run_id"):
        import mlflow

        mlflow.set_tracking_uri(config["mlflow_uri"])
        mlflow.start_run(run_id=config["mlflow_run_id"])
    tuned = malloc_tuned()  # tune_malloc reached this worker
    if rank == 0:
        print(f"[train {task}] {'resuming from step ' + str(step) if step else 'starting'}: {total} steps "
              f"({per_epoch} per epoch), {world} workers x batch {cfg.batch_size}; model ready in "
              f"{time.time() - t_begin:.1f}s; glibc malloc {'tuned' if tuned else 'as is'}", flush=True)

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
                loss = compute_loss(task, model, batch)
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
                           "data_s": data_wait[0], "malloc_tuned": int(tuned)}
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
                            save_final_model(task, unwrapped(), tokenizer, Path(d) / "model", save_dtype)
                            if mlflow is not None:
                                mlflow.log_artifact(str(Path(d) / CURVE_FILE))
                                if cfg.mlflow_log_model:
                                    mlflow.log_artifacts(str(Path(d) / "model"), artifact_path="model")
                        ckpt = Checkpoint.from_directory(d)
                    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_step_{step:06d}"
                                     if ckpt is not None else None)
                report_s = time.time() - now
                if cfg.crash_after_step and step == cfg.crash_after_step and resumed_from == 0:
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


# ----------------------------------------------------------------------------------------------------------
# Driver side: the trainer, resuming, exporting
# ----------------------------------------------------------------------------------------------------------

def plan_steps(n_rows: int, cfg: TrainConfig) -> tuple[int, int]:
    """(steps per epoch, total steps): every rank gets n_rows // workers rows (equal split), full batches only."""
    per_epoch = (n_rows // cfg.num_workers) // cfg.batch_size
    if per_epoch < 1:
        raise ValueError(f"{n_rows} training rows cannot fill one step of {cfg.num_workers} workers x batch "
                         f"{cfg.batch_size}; lower batch_size / num_workers or give more data")
    total = cfg.max_steps or per_epoch * cfg.epochs
    return per_epoch, total


def build_trainer(cfg: TrainConfig, rows: list[dict], init_path: str, tokenizer_path: str,
                  mlflow_uri: str | None = None, mlflow_run_id: str | None = None, meta: dict | None = None):
    """The TorchTrainer over token rows (shuffled once with random.Random(cfg.seed)); call .fit()."""
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
                           "save_dtype": checkpoint_dtype(init_path)},
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


# ----------------------------------------------------------------------------------------------------------
# Evaluation hooks (metrics are pure; the runners take the engine/scorer they use)
# ----------------------------------------------------------------------------------------------------------

def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """ROC AUC by the Mann-Whitney statistic (ties count 1/2); NaN when one class is absent."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2  # ranks i+1..j share their mean
        rank_sum += mean_rank * sum(lab for _, lab in ranked[i:j])
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def predicted_first_error(step_scores: Sequence[float], threshold: float) -> int:
    """The first step whose score is below threshold, -1 if none (unscored steps, NaN, are not flagged)."""
    for i, s in enumerate(step_scores):
        if not math.isnan(s) and s < threshold:
            return i
    return -1


def processbench_f1(pred: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """ProcessBench: accuracy on erroneous solutions (predicted index == label), on correct ones (predicted -1),
    and their harmonic mean (the paper's F1)."""
    err = [p == y for p, y in zip(pred, labels) if y >= 0]
    ok = [p == -1 for p, y in zip(pred, labels) if y < 0]
    acc_err = sum(err) / len(err) if err else float("nan")
    acc_ok = sum(ok) / len(ok) if ok else float("nan")
    if math.isnan(acc_err) or math.isnan(acc_ok):
        f1 = float("nan")
    else:
        f1 = 2 * acc_err * acc_ok / (acc_err + acc_ok) if acc_err + acc_ok > 0 else 0.0
    return {"error_acc": acc_err, "correct_acc": acc_ok, "f1": f1, "n": len(pred)}


def step_truth(problem: dict, steps: Sequence[str]) -> list[bool]:
    """Ground truth for a synthetic problem's steps, prefix-level: step i is right while no step up to it is wrong."""
    from pipelines.verify import first_error

    fe = first_error(list(steps), problem["quantities"], problem["answer"])
    return [fe < 0 or i < fe for i in range(len(steps))]


def problems_by_id(ids: Sequence[str], synthetic: SyntheticConfig) -> dict[str, dict]:
    """Synthetic problems for ids of the form syn-<key>-<index> whose key is synthetic.key() (others are left out)."""
    from pipelines.problems import synthetic_problem

    out = {}
    prefix = f"syn-{synthetic.key()}-"
    for pid in set(ids):
        if pid.startswith(prefix) and pid[len(prefix):].isdigit():
            out[pid] = synthetic_problem(synthetic, int(pid[len(prefix):]))
    return out


def greedy_accuracy(generator, problems: Sequence[dict], prompts: Sequence[str], max_tokens: int,
                    timeout_s: float = 5.0) -> dict[str, Any]:
    """Greedy decoding through a VLLMGenerator actor handle, graded by the verifier: accuracy and counts."""
    import ray

    from pipelines.verify import grade

    outs = ray.get(generator.generate.remote(list(prompts), {"n": 1, "temperature": 0.0, "max_tokens": max_tokens}))
    correct, tokens, errors = 0, 0, 0
    for p, comps in zip(problems, outs):
        c = comps[0]
        errors += bool(c["error"])
        tokens += len(c["token_ids"])
        correct += grade(c["text"], p["answer"], kind=p["kind"], timeout_s=timeout_s).correct
    return {"accuracy": correct / max(len(problems), 1), "correct": correct, "problems": len(problems),
            "tokens": tokens, "errors": errors}


def scored_rows(ds, model_path: str, scorer_cls: type, batch_size: int, max_len: int, num_gpus: float = 0.0,
                device: str = "cpu") -> list[dict]:
    """Score a Ray Dataset of {prompt, steps | completion} rows with a scorer pool (PRMScorer): rows + scores.
    num_gpus and device come together from the caller (the job), which picks the accelerator."""
    import ray.data

    # threads=-1: a CPU scorer uses every core (it runs alone, after training)
    return ds.map_batches(scorer_cls, fn_constructor_kwargs={"model_path": model_path, "max_len": max_len,
                                                             "batch_size": batch_size, "device": device,
                                                             "threads": -1 if device == "cpu" else 0},
                          batch_format="pyarrow", batch_size=64, num_cpus=1, num_gpus=num_gpus or None,
                          compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1)).take_all()


def step_f1(pred_ok: Sequence[Sequence[bool]], truth_ok: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Precision / recall / F1 of "step is wrong" (the positive class) over all steps, plus accuracy."""
    tp = fp = fn = tn = 0
    for pred, truth in zip(pred_ok, truth_ok, strict=True):
        for p, t in zip(pred, truth, strict=True):
            tp += (not p) and (not t)
            fp += (not p) and t
            fn += p and (not t)
            tn += p and t
    prec = tp / (tp + fp) if tp + fp else float("nan")
    rec = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * prec * rec / (prec + rec) if tp else 0.0
    n = tp + fp + fn + tn
    return {"precision": prec, "recall": rec, "f1": f1, "accuracy": (tp + tn) / n if n else float("nan"),
            "steps": n, "wrong_share": (tp + fn) / n if n else float("nan")}


def flag_all_f1(wrong_share: float) -> float:
    """The trivial baseline: F1 of "step is wrong" when every step is flagged (precision p, recall 1)."""
    return 2 * wrong_share / (1 + wrong_share) if wrong_share == wrong_share else float("nan")


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

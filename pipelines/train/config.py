"""Training configs: the run, LoRA, SFT selection, label mapping and evaluation; the file names a run writes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import help_field
from pipelines.generate import EngineConfig
from pipelines.problems import SyntheticConfig
from pipelines.prompts import PromptConfig

TASKS = ("sft", "prm", "orm", "dpo", "genrm")
# Training precision. bf16 autocast runs matmuls in bf16 and keeps fp32 master weights, so it changes speed and
# rounding, not the optimizer. Measured here (SmolLM2 PRM, full fine-tuning, batch 8 x 200 tokens, 2 threads, tuned
# malloc, AMD EPYC with avx512_bf16): fp32 145 tokens/s, bf16 336; with the lowest 20 of 30 blocks frozen: fp32 430,
# bf16 670. CPUs without native bf16 emulate it (slower than fp32), hence `auto`.
PRECISIONS = ("auto", "fp32", "bf16")
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
    corrections: int = help_field(0, "SFT: also up to N correction rows per problem (learning to correct): a failed "
                                     "sample and the revise cue as context, a verified one as the target; 0 = none")
    stream_of_search: int = help_field(0, "SFT: also one stream-of-search row per solved problem: up to N failed "
                                          "attempts cut at their first wrong step, each followed by a backtrack "
                                          "line, then a verified solution; 0 = none")
    step_checks: bool = help_field(False, "SFT: where a problem allows step checks (synthetic: every intermediate "
                                   "value known), drop verified samples with a wrong step (a right answer reached "
                                   "by wrong steps, e.g. after a STaR hint); other problems keep outcome verification")
    shows_work: bool = help_field(False, "SFT: drop verified samples of numeric problems in which no true "
                                         "arithmetic claim computes the final answer (an answer stated, not "
                                         "derived: what a weak model writes after a STaR hint)")

    def __post_init__(self) -> None:
        if min(self.k, self.corrections, self.stream_of_search) < 0:
            raise ValueError(f"select.k, select.corrections and select.stream_of_search must be >= 0, got {self.k}, "
                             f"{self.corrections}, {self.stream_of_search}")


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
    holdout_fraction: float = help_field(0.1, "PRM/ORM/DPO: share of problems (by hashed id) kept out of training")
    problems: str = help_field("synthetic", "SFT: held-out problems for greedy accuracy (source name or file)")
    synthetic: SyntheticConfig = help_field(SyntheticConfig(seed=1), "SFT held-out synthetic problems (seed 1: "
                                            "disjoint from the generation default, seed 0)")
    limit: int = help_field(200, "SFT: held-out problems evaluated (0 = all)")
    max_tokens: int = help_field(160, "SFT: most new tokens of a greedy answer")
    truth_synthetic: SyntheticConfig = help_field(SyntheticConfig(), "PRM: the synthetic config that made the "
                                                  "labelled problems (their ids carry its key); ground-truth steps")
    truth_data: str = help_field("", "PRM: a `stepray generate` run folder on held-out synthetic problems: every "
                                 "finished sample's steps are scored against the ground-truth step checks (the "
                                 "problems come from the run's problems.parquet); empty = skip")
    processbench: tuple[str, ...] = help_field(("gsm8k", "math"), "PRM: ProcessBench subsets (empty = skip)")
    processbench_limit: int = help_field(0, "PRM: first N erroneous + first N correct solutions per ProcessBench "
                                         "subset (0 = all)")
    threshold: float = help_field(0.5, "PRM: a step scoring below this is predicted wrong (the fixed threshold; a "
                                       "fitted one is reported beside it where held-out truth exists)")
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
    task: str = help_field("sft", "sft (generator) | prm (process reward model) | orm (outcome reward model) | "
                                  "dpo (V-STaR verifier: DPO on verified-over-failed pairs against the model it "
                                  "starts from)")
    data: str = help_field("", "parquet file or folder (a generate run's folder works), or a .json/.jsonl label file")
    base: str = help_field("smollm2", "base checkpoint: smollm2 | tiny | a local path")
    out: str = help_field("runs/train", "output folder: model/, summary.json, loss_curve.png, ray_results/")
    round_mode: str = help_field("rest_em", "rest_em: start from `base` (ReST-EM, and STaR, which also restarts from "
                                            "the base each round); continue: start from `previous`")
    previous: str = help_field("", "continue: the previous round's model folder")
    extra_data: tuple[str, ...] = help_field((), "more rows of the same kind as `data`, read with it (e.g. the "
                                                 "loop's STaR rationalizations beside the round's samples)")
    prompt: PromptConfig = help_field(PromptConfig(), "how questions become prompts (PRM rows, SFT evaluation)")
    step_sep: str = help_field("", "PRM: the text that ends each step (where the score is read); empty = the "
                                   "separator of prompt.format (prompts.separator), the one the samples were split by")
    max_len: int = help_field(512, "most tokens per training example")
    epochs: int = help_field(2, "passes over the training rows")
    max_steps: int = help_field(0, "stop after this many optimizer steps (0 = epochs decide)")
    batch_size: int = help_field(4, "rows per worker per step (global batch = batch_size * num_workers)")
    beta: float = help_field(0.1, "DPO: the weight of the log-likelihood ratio to the reference (the model "
                                  "training starts from); the verifier's score is beta x that ratio")
    pairs_per_problem: int = help_field(8, "DPO: most (verified, failed) pairs drawn per problem (V-STaR pairs "
                                           "every verified with every failed sample of a problem)")
    genrm_per_problem: int = help_field(4, "GenRM: most verified and most failed samples per problem that become "
                                           "verification examples (each side; balances the verdicts)")
    genrm_lambda: float = help_field(1.0, "GenRM: weight of SFT on the verified solutions beside the verification "
                                          "loss (the unified objective; 0 = verification only)")
    genrm_cot: bool = help_field(False, "GenRM-CoT: the verifier writes a verification rationale (each step's "
                                        "arithmetic rechecked, the final answer) before 'Verdict: Yes|No'; scored "
                                        "by sampling rationales on vLLM and averaging p(Yes) over them "
                                        "(pipelines.train.data.genrm_rationale, actors/genrm_scorer.py)")
    lr: float = help_field(2e-5, "peak learning rate (AdamW)")
    head_lr: float = help_field(0.0, "PRM/ORM: peak learning rate of the fresh scalar head (0 = lr); see "
                                "`param_groups`")
    weight_decay: float = help_field(0.0, "AdamW weight decay")
    warmup_steps: int = help_field(0, "linear warmup steps")
    schedule: str = help_field("constant", "after warmup: constant | linear | cosine (decay to 0)")
    grad_clip: float = help_field(1.0, "clip the global gradient norm (0 = off)")
    precision: str = help_field("auto", "forward/backward precision: bf16 (autocast; weights, gradients and Adam "
                                "state stay fp32) | fp32 | auto (bf16 where the device computes it natively: a CUDA "
                                "GPU with bf16, a CPU with avx512_bf16 or AMX; else fp32). See `PRECISIONS`")
    freeze_layers: int = help_field(0, "freeze the input embeddings and the lowest N transformer blocks (a partly "
                                    "frozen backbone: backward stops at block N); 0 = train every weight")
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
        if self.round_mode == "star":
            raise ValueError("round_mode=star is gone from training: STaR restarts from the base model each round "
                             "(round_mode=rest_em; `stepray iterate round_mode=star` adds its rationalization), and "
                             "continuing from the previous model is round_mode=continue")
        if self.round_mode not in ("rest_em", "continue"):
            raise ValueError(f"round_mode must be rest_em or continue, got {self.round_mode!r}")
        if self.head_lr < 0:
            raise ValueError(f"head_lr must be >= 0 (0 = lr), got {self.head_lr}")
        if self.round_mode == "continue" and not self.previous:
            raise ValueError("round_mode=continue starts from the previous round's model: set previous=<model folder>")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule must be constant, linear or cosine, got {self.schedule!r}")
        if self.num_workers < 1 or self.batch_size < 1 or self.epochs < 1 or self.max_steps < 0:
            raise ValueError("need num_workers >= 1, batch_size >= 1, epochs >= 1, max_steps >= 0")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("checkpoint_every, log_every and keep_checkpoints must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.freeze_layers < 0:
            raise ValueError(f"freeze_layers must be >= 0 (0 = train every weight), got {self.freeze_layers}")
        if self.genrm_per_problem < 1 or self.genrm_lambda < 0:
            raise ValueError(f"need genrm_per_problem >= 1 and genrm_lambda >= 0, got {self.genrm_per_problem}, "
                             f"{self.genrm_lambda}")
        if self.beta <= 0 or self.pairs_per_problem < 1:
            raise ValueError(f"need beta > 0 and pairs_per_problem >= 1, got {self.beta}, {self.pairs_per_problem}")
        if self.max_len < 16 or self.lr <= 0:
            raise ValueError("max_len must be >= 16 and lr > 0")

    def separator(self) -> str:
        """The step separator of the PRM's rows: step_sep if given, else the prompt format's."""
        from pipelines.prompts import separator

        return self.step_sep or separator(self.prompt.format)

    def init_model(self) -> str:
        """What the run starts from: the base (ReST-EM, STaR) or the previous round's model (continue)."""
        return self.previous if self.round_mode == "continue" else self.base

    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.task}-{Path(self.out).name}"

    def resolved_storage(self) -> str:
        return self.storage_path or str(Path(self.out).resolve() / "ray_results")

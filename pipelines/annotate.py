"""Monte-Carlo step annotation on Ray Data: Sample rows -> step prefixes -> rollouts from a vLLM actor pool ->
verdicts -> StepLabel rows; optional judge labels (WizardMath-style) alone or in consensus with the MC labels.

    samples ──map_batches(StepAnnotator, ActorPoolStrategy(min_engines, max_engines))──> StepLabel rows
            (+ diagnostics)

`StepAnnotator` is a callable class: each actor builds one generic engine (`VLLMGenerator`, or the
`generator_cls` given) and, for each batch of samples, runs the chosen labelling plan (`pipelines.steps.Planner`:
naive or first-error search, with reuse and early stop as switches) round by round: all rollouts that any sample
of the batch needs in a round go to the engine in ONE `generate` call (the batching that keeps an engine busy).

Rollouts. The prompt of prefix t is the sample's `prompt` + `completion[:end_t]` (`steps.step_ends` locates the
end of step t in the original text, so prefixes are exactly what the model wrote), sampled at `temperature` up
to `max_tokens`; the rollout's verdict is `pipelines.verify.grade(completion[:end_t] + continuation, gold, kind)`.
The sample's own verdict is re-graded the same way (`grade(completion, gold, kind)`) so that rollouts and sample
are judged by one verifier. vLLM refuses n > 1 at temperature 0, so greedy rollouts are sent as n copies of the
prompt with n = 1 (prefix caching makes the copies cheap). Arithmetic of the labels: see `pipelines/steps.py`.

Judge labels (WizardMath-style): a second model is asked, step by step, whether step t of the solution so far is
correct ("Yes"/"No"; the first yes/no word of its reply; -1 when it gives neither, or when the row has
no `question` to show it). `judge.mode`:
  local     a VLLMGenerator in the same actor: `judge.model = "same"` reuses the rollout engine, any other name or
            path loads a second engine (mind the memory); prompts use the judge model's chat template;
  endpoint  any OpenAI-compatible server (vLLM serve, Ray Serve LLM, a hosted API) through the `openai` client:
            `judge.base_url`, `judge.model`, key from the environment variable `judge.api_key_env`.
`labels`: "mc" (rollouts only), "judge" (judge only: soft = hard = the judge's answer), "consensus" (MC labels
kept only where the judge agrees, else -1), "step_check_consensus" (synthetic problems: MC labels kept only where
the ground truth agrees: the prefix truth from `verify.first_error(steps, quantities, gold)`, which needs a
`quantities` column; a sample without quantities keeps no label), and two that need no engine: "step_check" (that
prefix truth itself: the process ground truth PRM800K's human labels stand for, exact on synthetic problems) and
"outcome" (every step labelled with the sample's verdict: the outcome-only baseline as PRM labels). `min_soft_good` > 0 also drops MC labels 1
whose soft value is below it (the K rollouts do not agree strongly).

Output columns: the StepLabel schema (`pipelines.schema.STEP_LABEL`) plus diagnostics the job summarises and drops
before writing labels: `mc_hard` (MC hard labels before any filtering), `judge_labels`, `first_error` (of the MC
labels), `outcomes` (per prefix, its pool as "1"/"0" characters in arrival order, reused outcomes included),
`fresh` (rollouts generated per prefix), `rounds`, `judge_tokens`, `verdict` (the sample's own verdict), `error`.
A sample that cannot be labelled (generation error, no steps, code, steps not found in the text, a rollout the
engine refused) comes out with empty labels and `error` saying why; the job sets it aside in rejects.jsonl.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines import schema
from pipelines.config import help_field
from pipelines.generate import EngineConfig
from pipelines.problems import SyntheticConfig
from pipelines.prompts import FORMATS, separator
from pipelines.steps import METHODS, Planner, Rollout, consensus, run_planners, step_ends

LABELS = ("mc", "judge", "consensus", "step_check_consensus", "step_check", "outcome")
FREE_LABELS = ("step_check", "outcome")  # label sources that need no engine: no rollouts, no judge
JUDGE_MODES = ("off", "local", "endpoint")


@dataclass(frozen=True)
class JudgeConfig:
    mode: str = help_field("off", "off | local (a VLLMGenerator in the actor) | endpoint (OpenAI-compatible server)")
    model: str = help_field("same", "local: 'same' = the rollout engine, else a model name/path; endpoint: the "
                                    "model name the server knows")
    base_url: str = help_field("", "endpoint: e.g. http://localhost:8000/v1")
    api_key_env: str = help_field("OPENAI_API_KEY", "endpoint: environment variable holding the API key")
    max_tokens: int = help_field(8, "tokens of the judge's reply (only its first yes/no word is read)")
    concurrency: int = help_field(8, "endpoint: requests in flight")
    timeout_s: float = help_field(60.0, "endpoint: time limit per request")

    def __post_init__(self) -> None:
        if self.mode not in JUDGE_MODES:
            raise ValueError(f"judge.mode {self.mode!r} is not one of {list(JUDGE_MODES)}")
        if self.mode == "endpoint" and not self.base_url:
            raise ValueError("judge.mode=endpoint needs judge.base_url (e.g. http://localhost:8000/v1)")
        if self.mode == "endpoint" and self.model == "same":
            raise ValueError("judge.mode=endpoint needs judge.model: the model name the server serves")
        if self.max_tokens < 1 or self.concurrency < 1:
            raise ValueError("judge.max_tokens and judge.concurrency must be >= 1")


@dataclass(frozen=True)
class AnnotateConfig:
    samples: str = help_field("", "folder (or file) of Sample parquet, e.g. runs/gen/samples")
    problems: str = help_field("", "problems behind the samples, for questions and ground truth: '' = read the "
                                   "generation run's config.json beside the samples folder; else a source name "
                                   "(synthetic, gsm8k, ...) or a file (a Problem parquet keeps the quantities)")
    synthetic: SyntheticConfig = help_field(SyntheticConfig(), "the synthetic generator, when problems=synthetic")
    engine: EngineConfig = help_field(EngineConfig(batch_size=8), "the vLLM engine pool (batch_size = samples per "
                                                                  "annotator call; their rollouts share calls)")
    method: str = help_field("naive", "naive (every prefix) | binary (first-error search, midpoint probes) | "
                                      "scan (first-error search, probes from the first step on)")
    rollouts: int = help_field(8, "K: rollouts per prefix")
    reuse: bool = help_field(False, "count the sample itself and rollouts passing through a prefix as its rollouts")
    early_stop: bool = help_field(False, "stop a prefix's rollouts at its first success (decides the hard label)")
    chunk: int = help_field(2, "early stop: rollouts per prefix in its first round")
    chunk_growth: float = help_field(1.0, "early stop: 1 = `chunk` every round (fewest tokens); 2 = each round "
                                          "doubles the rollouts spent on the prefix (2, 2, 4, 8: fewer, larger "
                                          "engine calls, less wall time)")
    temperature: float = help_field(0.7, "rollout temperature (the samples' own, for reuse to be unbiased)")
    top_p: float = help_field(1.0, "rollout nucleus sampling")
    max_tokens: int = help_field(128, "most new tokens per rollout")
    step_format: str = help_field("", "the samples' prompt format (its step separator ends a prefix); empty = the "
                                      "generation run's prompt.format (its config.json), else lines")
    labels: str = help_field("mc", "mc | judge | consensus (MC labels kept where the judge agrees) | "
                                   "step_check_consensus (kept where the synthetic ground truth agrees) | "
                                   "step_check (the synthetic ground truth itself, no rollouts) | outcome (every "
                                   "step gets the sample's verdict, no rollouts)")
    judge: JudgeConfig = help_field(JudgeConfig(), "the judge model (WizardMath-style step labels)")
    min_soft_good: float = help_field(0.0, "drop an MC label 1 whose soft value is below this (0 = keep all)")
    planted: int = help_field(0, "synthetic problems: add N solutions per problem written from its reference path, "
                                 "about half with one planted error at a known step (a wrong operation with right "
                                 "arithmetic, a slip, a wrong final line), with exact labels (0 = none)")
    modes: tuple[str, ...] = help_field(("sample",), "which Sample modes to label (sample, greedy, ...)")
    limit: int = help_field(0, "label only N samples (0 = all), chosen by `select`")
    select: str = help_field("first", "which samples `limit` keeps: first (file order) | balanced (up to half "
                                      "verified ones, the rest wrong ones, each pool in a fixed hashed order, so a "
                                      "weak model's labels are not nearly all zeros)")
    verify_timeout_s: float = help_field(5.0, "time limit per answer check")
    out: str = help_field("runs/annotate", "output folder: labels/ parquet, rejects.jsonl, summary.json, PNG")

    def __post_init__(self) -> None:
        if self.select not in ("first", "balanced"):
            raise ValueError(f"select {self.select!r} is not one of first, balanced")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {list(METHODS)}")
        if self.labels not in LABELS:
            raise ValueError(f"labels {self.labels!r} is not one of {list(LABELS)}")
        if self.labels in ("judge", "consensus") and self.judge.mode == "off":
            raise ValueError(f"labels={self.labels} needs a judge: set judge.mode=local or judge.mode=endpoint")
        if self.planted < 0:
            raise ValueError(f"planted must be >= 0 (solutions per synthetic problem; 0 = none), got {self.planted}")
        if self.rollouts < 1 or self.chunk < 1 or self.max_tokens < 1:
            raise ValueError("rollouts, chunk and max_tokens must be >= 1")
        if not self.chunk_growth >= 1:
            raise ValueError(f"chunk_growth must be >= 1 (1 = a fixed chunk), got {self.chunk_growth}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need temperature >= 0 and 0 < top_p <= 1")
        if not 0.0 <= self.min_soft_good <= 1.0:
            raise ValueError(f"min_soft_good must be within [0, 1], got {self.min_soft_good}")
        if self.step_format and self.step_format not in FORMATS:
            raise ValueError(f"step_format {self.step_format!r} is not one of {list(FORMATS)}")

    def method_name(self) -> str:
        """What the `method` column says: the plan and its switches, and the judge when it takes part."""
        stop = (["early_stop"] + (["grow"] if self.chunk_growth > 1 else [])) if self.early_stop else []
        mc = "+".join([self.method] + (["reuse"] if self.reuse else []) + stop)
        if self.labels in ("judge", *FREE_LABELS):
            return self.labels
        if self.labels == "step_check_consensus":
            return f"consensus({mc},step_check)"
        return f"consensus({mc},judge)" if self.labels == "consensus" else mc


# --------------------------------------------------------------------------------------------------- judge

JUDGE_SYSTEM = ("You are a strict math teacher. You check one step of a student's solution at a time: its "
                "arithmetic and its use of the numbers in the problem and in earlier steps.")


def judge_messages(question: str, steps: list[str], t: int) -> list[dict[str, str]]:
    """The chat asking whether step t (0-based) of `steps` is correct, given the steps before it."""
    shown = "\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(steps[: t + 1]))
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Problem: {question}\n\nSolution so far:\n{shown}\n\n"
                                        f"Is step {t + 1} correct? Answer with Yes or No."}]


_YES_NO = re.compile(r"(?i)\b(yes|no|correct|incorrect|wrong)\b")


def parse_judgement(text: str) -> int:
    """1 for yes/correct, 0 for no/incorrect/wrong (the first such word wins), -1 when there is none."""
    m = _YES_NO.search(text or "")
    if m is None:
        return -1
    return 1 if m.group(1).lower() in ("yes", "correct") else 0


def _endpoint_judge(cfg: JudgeConfig, chats: list[list[dict]]) -> tuple[list[str], int]:
    """Replies of an OpenAI-compatible server to each chat (greedy), and the completion tokens it reported."""
    import openai

    client = openai.OpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
                           timeout=cfg.timeout_s, max_retries=2)

    def ask(msgs: list[dict]) -> tuple[str, int]:
        r = client.chat.completions.create(model=cfg.model, messages=msgs, max_tokens=cfg.max_tokens,
                                           temperature=0.0)
        used = r.usage.completion_tokens if r.usage is not None else 0
        return r.choices[0].message.content or "", int(used or 0)

    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        answers = list(pool.map(ask, chats))
    return [a for a, _ in answers], sum(n for _, n in answers)


# ----------------------------------------------------------------------------------------------- annotator

def _greedy_safe(prompts: list[str], params: list[dict]) -> tuple[list[str], list[dict], list[int]]:
    """vLLM rejects n > 1 at temperature 0: send such a prompt as n copies with n = 1. Returns the expanded
    prompts and params and, for each original prompt, how many expanded entries it owns."""
    out_p, out_s, owned = [], [], []
    for p, s in zip(prompts, params):
        n = int(s.get("n", 1))
        if s.get("temperature", 1.0) == 0 and n > 1:
            out_p += [p] * n
            out_s += [{**s, "n": 1}] * n
            owned.append(n)
        else:
            out_p.append(p)
            out_s.append(s)
            owned.append(1)
    return out_p, out_s, owned


class StepAnnotator:
    """Ray Data callable class: a batch of Sample rows (pyarrow) -> StepLabel rows with diagnostics.

    generator_cls: the engine class (VLLMGenerator when None), built here as
    generator_cls(model, engine_kwargs, sampling, threads, model_name); or `generator`, an already built object
    with the same `generate(prompts, sampling)` method (benchmarks share one engine across labelling variants).
    """

    def __init__(self, cfg: AnnotateConfig, model_path: str, generator_cls: type | None = None,
                 judge_path: str | None = None, generator: Any = None):
        self.cfg = cfg
        eng = cfg.engine
        needs_engine = cfg.labels not in ("judge", *FREE_LABELS) or (cfg.judge.mode == "local"
                                                                       and cfg.judge.model == "same")
        if generator_cls is None:
            from actors.vllm_generator import VLLMGenerator

            generator_cls = VLLMGenerator
        self.gen = generator
        if self.gen is None and needs_engine:
            self.gen = generator_cls(model_path, eng.engine_kwargs(), {"max_tokens": cfg.max_tokens}, eng.threads,
                                     eng.model)
        self.judge_gen, self.judge_tok = None, None
        if cfg.judge.mode == "local":
            from transformers import AutoTokenizer

            same = cfg.judge.model == "same"
            path = model_path if same else (judge_path or cfg.judge.model)
            self.judge_gen = self.gen if same else generator_cls(path, eng.engine_kwargs(), {}, eng.threads,
                                                                 cfg.judge.model)
            self.judge_tok = AutoTokenizer.from_pretrained(path)
        self.verifier_name = "pipelines.verify.grade"
        self.judge_name = "" if cfg.judge.mode == "off" else (
            f"judge:{eng.model if cfg.judge.model == 'same' else cfg.judge.model}")

    # -- rollouts -----------------------------------------------------------------------------------------
    def _grade(self, text: str, gold: str, kind: str) -> bool:
        from pipelines.verify import grade

        return grade(text, gold, kind=kind, timeout_s=self.cfg.verify_timeout_s).correct

    def _oracle(self, rows: list[dict], ends: list[list[int]], errors: list[str]):
        cfg = self.cfg

        def rollouts(batch: list[tuple[int, int, int]]) -> list[list[Rollout]]:
            prompts = [rows[s]["prompt"] + rows[s]["completion"][: ends[s][i]] for s, i, _ in batch]
            params = [{"n": n, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
                      for _, _, n in batch]
            xp, xs, owned = _greedy_safe(prompts, params)
            results = self.gen.generate(xp, xs)
            out, at = [], 0
            for (s, i, n), k in zip(batch, owned):
                comps = [c for r in results[at: at + k] for c in r]
                at += k
                row, prefix = rows[s], rows[s]["completion"][: ends[s][i]]
                got = []
                for c in comps:
                    if c["error"] and not errors[s]:
                        errors[s] = f"rollout_error: prefix {i}: {c['error']}"[:500]
                    ok = not c["error"] and self._grade(prefix + c["text"], row["gold"], row["kind"])
                    got.append(Rollout(ok, c["text"], len(c["token_ids"])))
                out.append(got)
            return out

        return rollouts

    # -- judge --------------------------------------------------------------------------------------------
    def _judge(self, rows: list[dict], todo: list[int]) -> tuple[dict[int, list[int]], dict[int, int]]:
        """Judge labels per sample index, and the judge's generated tokens per sample."""
        cfg = self.cfg.judge
        asks = [(s, t) for s in todo for t in range(len(rows[s]["steps"])) if rows[s].get("question")]
        chats = [judge_messages(rows[s]["question"], list(rows[s]["steps"]), t) for s, t in asks]
        if cfg.mode == "endpoint":
            replies, total = _endpoint_judge(cfg, chats)
            per_tokens = [total / max(len(asks), 1)] * len(asks)  # the server reports totals; spread evenly
        else:
            prompts = [self.judge_tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                       for c in chats]
            outs = self.judge_gen.generate(prompts, {"n": 1, "temperature": 0.0,
                                                     "max_tokens": cfg.max_tokens}) if prompts else []
            replies = [o[0]["text"] for o in outs]
            per_tokens = [len(o[0]["token_ids"]) for o in outs]
        labels = {s: [-1] * len(rows[s]["steps"]) for s in todo}
        tokens = {s: 0 for s in todo}
        for (s, t), reply, n in zip(asks, replies, per_tokens):
            labels[s][t] = parse_judgement(reply)
            tokens[s] += int(round(n))
        return labels, tokens

    # -- the batch ----------------------------------------------------------------------------------------
    def _check(self, r: dict) -> str:
        """Why a sample cannot be labelled ("" when it can)."""
        if r.get("error"):
            return f"generation_error: {r['error']}"[:500]
        if r["kind"] == "code":
            return "code: a program is one step; nothing to label step by step"
        if not r["steps"]:
            return "no_steps: the completion is empty"
        if r["kind"] not in ("numeric", "math"):
            return f"kind {r['kind']!r}: only numeric and math answers are graded here"
        return ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.cfg
        rows = batch.to_pylist()
        errors = [self._check(r) for r in rows]
        ends: list[list[int]] = [[] for _ in rows]
        verdicts = [False] * len(rows)
        sep = separator(cfg.step_format or "lines")
        for s, r in enumerate(rows):
            if errors[s]:
                continue
            try:
                ends[s] = step_ends(r["completion"], list(r["steps"]), sep)
            except ValueError as e:
                errors[s] = f"steps_not_in_text: {e}"[:500]
                continue
            verdicts[s] = self._grade(r["completion"], r["gold"], r["kind"])
        todo = [s for s in range(len(rows)) if not errors[s]]

        mc: dict[int, Any] = {}
        if cfg.labels not in ("judge", *FREE_LABELS):
            planners = [Planner(rows[s]["completion"], ends[s], verdicts[s], k=cfg.rollouts, method=cfg.method,
                                reuse=cfg.reuse, early_stop=cfg.early_stop, chunk=cfg.chunk,
                                chunk_growth=cfg.chunk_growth) for s in todo]
            # rows of the batch in `todo` order, so the oracle's sample index is the planner's index
            sub_rows = [rows[s] for s in todo]
            sub_err = [""] * len(todo)
            results = run_planners(planners, self._oracle(sub_rows, [ends[s] for s in todo], sub_err))
            for j, s in enumerate(todo):
                mc[s] = results[j]
                errors[s] = errors[s] or sub_err[j]
        judge, judge_tokens = ({}, {}) if cfg.judge.mode == "off" else self._judge(rows, todo)

        out = []
        for s, r in enumerate(rows):
            base = {"problem_id": r["problem_id"], "sample_id": r["sample_id"], "question": r.get("question") or "",
                    "steps": list(r["steps"] or []), "method": cfg.method_name(), "model": self._model(),
                    "verifier": self._verifier(), "verdict": verdicts[s],
                    "answer": r.get("answer") or "", "error": errors[s]}
            if errors[s]:
                out.append({**base, "soft_labels": [], "hard_labels": [], "rollouts": [], "tokens_generated": 0,
                            "mc_hard": [], "judge_labels": [], "first_error": -1, "outcomes": [], "fresh": [],
                            "rounds": 0, "judge_tokens": 0})
                continue
            j = judge.get(s)
            if cfg.labels in FREE_LABELS:  # process ground truth, or the outcome on every step
                hard = (self._step_truth(r, verdicts[s]) if cfg.labels == "step_check"
                        else [int(verdicts[s])] * len(base["steps"]))
                out.append({**base, "soft_labels": [math.nan if h < 0 else float(h) for h in hard],
                            "hard_labels": hard, "rollouts": [0] * len(hard), "tokens_generated": 0, "mc_hard": [],
                            "judge_labels": j or [], "first_error": -1, "outcomes": [], "fresh": [], "rounds": 0,
                            "judge_tokens": judge_tokens.get(s, 0)})
                continue
            if cfg.labels == "judge":
                soft = [math.nan if x < 0 else float(x) for x in j]
                out.append({**base, "soft_labels": soft, "hard_labels": list(j), "rollouts": [0] * len(j),
                            "tokens_generated": 0, "mc_hard": [], "judge_labels": j, "first_error": -1,
                            "outcomes": [], "fresh": [], "rounds": 0, "judge_tokens": judge_tokens[s]})
                continue
            lab = mc[s]
            other = j if cfg.labels == "consensus" else None
            if cfg.labels == "step_check_consensus":
                other = self._step_truth(r, verdicts[s])
            hard = consensus(lab.hard, lab.soft, other=other, min_soft_good=cfg.min_soft_good)
            out.append({**base, "soft_labels": lab.soft, "hard_labels": hard, "rollouts": lab.rollouts,
                        "tokens_generated": lab.tokens, "mc_hard": lab.hard, "judge_labels": j or [],
                        "first_error": lab.first_error, "outcomes": lab.outcomes, "fresh": lab.fresh,
                        "rounds": lab.rounds, "judge_tokens": judge_tokens.get(s, 0)})
        return to_label_table(out)

    @staticmethod
    def _step_truth(r: dict, verdict: bool) -> list[int]:
        """Prefix truth (1 = no error up to this step, `train.metrics.step_truth`); all -1 without quantities."""
        from pipelines.train.metrics import step_truth

        steps = list(r["steps"])
        if not r.get("quantities"):
            return [-1] * len(steps)
        truth = step_truth({"quantities": r["quantities"], "answer": r["gold"]}, steps, verdict,
                           r.get("answer") or "")
        return [int(x) for x in truth]

    def _model(self) -> str:
        """The model whose outputs made the labels: the rollout engine's, or the judge's for judge labels."""
        if self.cfg.labels == "judge":
            return self.judge_name.removeprefix("judge:")
        return self.cfg.engine.model

    def _verifier(self) -> str:
        if self.cfg.labels == "judge":
            return self.judge_name
        if self.cfg.labels == "consensus":
            return f"{self.verifier_name}+{self.judge_name}"
        if self.cfg.labels == "step_check_consensus":
            return f"{self.verifier_name}+pipelines.verify.first_error"
        if self.cfg.labels == "step_check":
            return "pipelines.verify.first_error"
        return self.verifier_name


DIAGNOSTICS = pa.schema([
    ("mc_hard", pa.list_(pa.int8())),
    ("judge_labels", pa.list_(pa.int8())),
    ("first_error", pa.int32()),
    ("outcomes", pa.list_(pa.string())),
    ("fresh", pa.list_(pa.int32())),
    ("rounds", pa.int32()),
    ("judge_tokens", pa.int64()),
    ("verdict", pa.bool_()),
    ("answer", pa.string()),
    ("error", pa.string()),
])


def to_label_table(rows: list[dict]) -> pa.Table:
    """StepLabel columns (the versioned schema) followed by the diagnostics columns."""
    table = schema.to_table(rows, "step_label")
    for f in DIAGNOSTICS:
        table = table.append_column(f, pa.array([r.get(f.name) for r in rows], f.type))
    return table


def build_annotation(samples_ds, cfg: AnnotateConfig, model_path: str, generator_cls: type | None = None,
                     judge_path: str | None = None):
    """The lazy Ray Dataset of StepLabel rows (+ diagnostics). `generator_cls` is VLLMGenerator in real runs.

    Input rows: Sample columns, optionally `question` (carried into the labels and shown to a judge) and
    `quantities` (the problem's numbers, for labels=step_check_consensus).
    """
    import ray.data

    eng = cfg.engine
    return samples_ds.map_batches(
        StepAnnotator,
        fn_constructor_kwargs={"cfg": cfg, "model_path": model_path, "generator_cls": generator_cls,
                               "judge_path": judge_path},
        batch_format="pyarrow", batch_size=eng.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=eng.min_engines, max_size=eng.max_engines),
        num_cpus=eng.num_cpus, num_gpus=eng.num_gpus or None)


def annotate_table(samples: pa.Table, annotator: StepAnnotator, batch_size: int) -> tuple[pa.Table, float]:
    """Label a table in the driver with an already built annotator (benchmarks); returns (labels, wall seconds)."""
    t0 = time.time()
    parts = [annotator(samples.slice(i, batch_size)) for i in range(0, samples.num_rows, batch_size)]
    return pa.concat_tables(parts), time.time() - t0


def select_samples(samples: pa.Table, limit: int, how: str) -> pa.Table:
    """`limit` samples: the first ones, or balanced (up to half verified, the rest wrong), deterministic."""
    if how == "first":
        return samples.slice(0, limit)
    ids = samples.column("sample_id").to_pylist()
    correct = samples.column("correct").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha1(ids[i].encode()).hexdigest())
    good = [i for i in order if correct[i]]
    bad = [i for i in order if not correct[i]]
    n_good = min(len(good), (limit + 1) // 2)
    n_bad = min(len(bad), limit - n_good)
    n_good = min(len(good), limit - n_bad)  # top up with verified ones when the wrong ones run out
    take = good[:n_good] + bad[:n_bad]
    return samples.take(pa.array(sorted(take), pa.int64()))

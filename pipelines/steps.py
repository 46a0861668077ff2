"""Monte-Carlo step labels (Math-Shepherd) and the cheaper ways to get them, as pure logic over a rollout oracle.

Notation: a sampled solution z = (z_1, ..., z_T) of problem x with verdict v = Ver_x(z) in {0, 1}; prefix t is
z_1..z_t (t = 1..T; code indexes prefixes 0-based, i = t - 1). Each prefix t has a pool R_t of rollout outcomes
(verdicts of continuations from prefix t, graded as `grade(prefix_text + continuation, gold, kind)`). Labels:

    soft_t = |{r in R_t : r = 1}| / |R_t|        (NaN when R_t is empty)
    hard_t = 1[exists r in R_t : r = 1]          (naive); by first-error search (binary), see below
    rollouts_t = |R_t|                           (outcomes the label rests on, generated or reused)

Prefix text. `step_ends` locates the end of step t in the original completion text (steps are stripped pieces of
it, found in order), and extends it over trailing spaces and one step separator, so the prefix is exactly
`completion[:end_t]`: never steps re-joined with a separator that might differ from the original.

The last prefix is the whole solution: its only continuation is the end of the text, so in every method
R_T = {v} and no rollout is spent on it (Math-Shepherd labels the last step with the final answer's correctness).

Methods (`Planner`), each a round-by-round plan: `requests()` says how many fresh rollouts each prefix needs this
round, the caller generates all rounds' rollouts of many samples in one engine call and hands the outcomes back with
`observe()`; `result()` gives the labels. K = `rollouts` is the budget per prefix.

- naive: every prefix t < T gets K - |R_t| fresh rollouts in one round (K when reuse is off).
- binary (OmegaPRM-style first-error search). Assumption: hard values are monotone, h_1 >= h_2 >= ... >= h_T
  (a prefix with a verified continuation makes every shorter prefix good; after a wrong step nothing recovers).
  Known good G = {t : exists r in R_t, r = 1}; known bad B = {t : |R_t| >= K, no r = 1} plus {T} when v = 0.
  lo = max(G, default 0) (prefix 0, the question alone, is taken as good), hi = min{t in B : t > lo} (T + 1
  when none). While hi - lo > 1, query mid = floor((lo + hi) / 2) until it is decided (a success puts it in G,
  K failures in B), then recompute lo, hi. Each prefix is queried at most once, about log2(T) per sample.
  The located first error is t* = hi (none when hi = T + 1); hard_t = 1[t <= lo] = 1[t < t*], inferred for the
  prefixes never queried. A correct sample has lo = T at once: all hard labels 1, no rollout.
- scan (first-error search probing from the front). The same known-good / known-bad sets, bounds and inferred
  labels as binary, but the probe is lo + 1 instead of the midpoint: prefixes are checked in order until the first
  one that fails K times. Worst case T - 1 prefixes instead of about log2(T), but when first errors sit early (a
  weak model's wrong solutions mostly go wrong at step 1: 1 probe where binary needs 2-3) it queries fewer, and
  with early stop a good prefix costs about 1/p rollouts. Written here because no library plans MC rollouts;
  under monotone outcomes it locates the same first error as binary and naive (tested).
- reuse (switch, for every method). (a) The sampled solution is itself a rollout of each of its prefixes: R_t
  starts as {v} for every t (its continuation from prefix t is z_{t+1..T}, drawn from the same model).
  (b) A rollout from prefix t with continuation c passes through prefix u (t < u < T) exactly when it reproduces
  the original text between the two prefix ends: c.startswith(completion[end_t:end_u]) (character-exact, steps
  and separators). Its verdict is then added to R_u as well. Reused outcomes cost 0 tokens and a prefix asks only
  for K - |R_t| fresh rollouts, so reused outcomes replace fresh ones; a pool may end above K when pass-throughs
  arrive after its own rollouts (more evidence for free, kept). Reuse never adds to R_T.
- early stop (switch). A prefix's hard label is decided by its first success, so rollouts come in chunks and a
  prefix stops at the first success or when |R_t| reaches K. The chunk of a round is
  min(K - |R_t|, max(`chunk`, ceil((g - 1) * f_t))), f_t = fresh rollouts spent on the prefix so far and
  g = `chunk_growth`: g = 1 (default) asks `chunk` every round (K / chunk rounds to decide a bad prefix); g = 2
  doubles the spent total each round (chunk 2, K 16: 2, 2, 4, 8), so a bad prefix is decided in about
  log2(K / chunk) + 1 rounds while a good prefix whose first rollouts succeed still costs only `chunk`. Rounds
  matter because each is one engine call that waits for its longest rollout: with a fixed chunk, early stop saved
  tokens but cost wall time (more, smaller calls). Measured (README, runs 7 and 8): doubling cuts early stop's wall
  time by 16-32% for 4-5% fewer tokens saved, and is still slower than no early stop.
  With early stop the soft label is the share over the rollouts actually spent, biased upward by the stopping rule
  (a pool that stopped at its first success ends in a success): use hard labels, or no early stop, where soft
  labels matter.

Label quality against ground truth (synthetic problems, `pipelines.verify.check_steps` / `first_error`): "step
is wrong" is the positive class; predicted wrong = hard label 0. MC labels are prefix values (0 from the first
error on), so the primary truth is prefix-level: step i is wrong when i >= first_error (`prefix_truth`); the
per-step check truth (a step that correctly continues from a wrong number counts as right) is reported beside it.
Labels of -1 (filtered out by consensus, or no verdict from a judge) are left out and counted as not covered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

METHODS = ("naive", "binary", "scan")


# ----------------------------------------------------------------------------------------------- prefix text

def step_ends(completion: str, steps: Sequence[str], sep: str = "\n") -> list[int]:
    """End offset of each step's prefix in `completion`: after the step's text, trailing spaces and one `sep`.

    Raises ValueError naming the step when a step is not found in order (the steps do not come from this text).
    """
    ends, pos = [], 0
    for i, step in enumerate(steps):
        if not step:
            raise ValueError(f"step {i} is empty; steps must be the non-empty pieces of the completion")
        at = completion.find(step, pos)
        if at < 0:
            raise ValueError(f"step {i} ({step[:40]!r}) is not in the completion after offset {pos}; "
                             f"the steps were not split from this completion")
        end = at + len(step)
        j = end
        while j < len(completion) and completion[j] in " \t":
            j += 1
        if sep and completion.startswith(sep, j):
            end = j + len(sep)
        ends.append(end)
        pos = end
    return ends


# ------------------------------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class Rollout:
    correct: bool  # the verdict of prefix + continuation
    text: str = ""  # the continuation after the prefix (reuse checks which later prefixes it passes through)
    tokens: int = 0  # generated tokens (0 for reused outcomes)


@dataclass
class Labels:
    soft: list[float]  # per step, NaN when the pool is empty
    hard: list[int]  # per step, 0 / 1
    rollouts: list[int]  # |R_t| per step (generated + reused)
    fresh: list[int]  # rollouts generated from each prefix
    tokens: int  # generated tokens over all prefixes
    first_error: int  # 0-based index of the first step with hard label 0; -1 when none
    outcomes: list[str]  # per step, the pool in arrival order as "1"/"0" characters (reused ones included)
    rounds: int  # engine rounds this sample took part in


@dataclass
class Planner:
    """The rollout plan for one sample. Call `requests()` once per round, then `observe()` for each requested
    prefix; when `requests()` returns {} the sample is done and `result()` holds its labels."""

    completion: str
    ends: list[int]  # from step_ends
    verdict: bool  # the sampled solution's own verdict
    k: int = 8
    method: str = "naive"
    reuse: bool = False
    early_stop: bool = False
    chunk: int = 2
    chunk_growth: float = 1.0
    pools: list[list[bool]] = field(init=False)
    fresh: list[int] = field(init=False)
    tokens: int = field(init=False, default=0)
    rounds: int = field(init=False, default=0)
    _pending: dict[int, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {list(METHODS)}")
        if self.k < 1 or self.chunk < 1 or not self.chunk_growth >= 1:
            raise ValueError(f"need k >= 1, chunk >= 1 and chunk_growth >= 1, got k={self.k}, chunk={self.chunk}, "
                             f"chunk_growth={self.chunk_growth}")
        n = len(self.ends)
        self.pools = [[bool(self.verdict)] if (self.reuse or i == n - 1) else [] for i in range(n)]
        self.fresh = [0] * n

    @property
    def n_steps(self) -> int:
        return len(self.ends)

    def _decided(self, i: int) -> bool:
        """Prefix i needs no more rollouts: it is the last, or its pool is full, or (early stop) it has a success."""
        if i == self.n_steps - 1 or len(self.pools[i]) >= self.k:
            return True
        return self.early_stop and any(self.pools[i])

    def _want(self, i: int) -> int:
        left = self.k - len(self.pools[i])
        if not self.early_stop:
            return left
        return min(left, max(self.chunk, math.ceil((self.chunk_growth - 1) * self.fresh[i])))

    def _bounds(self) -> tuple[int, int]:
        """(lo, hi) of the first-error search in 1-based prefix numbers (see the module docstring)."""
        T = self.n_steps
        good = [t for t in range(1, T + 1) if any(self.pools[t - 1])]
        lo = max(good, default=0)
        bad = [t for t in range(lo + 1, T + 1)
               if not any(self.pools[t - 1]) and (len(self.pools[t - 1]) >= self.k or t == T)]
        return lo, min(bad, default=T + 1)

    def requests(self) -> dict[int, int]:
        """Fresh rollouts to generate this round: {prefix index: count}. {} when the sample is done."""
        if self._pending:
            raise RuntimeError(f"requests() called again before observe() for prefixes {sorted(self._pending)}")
        if self.method == "naive":
            want = {i: self._want(i) for i in range(self.n_steps - 1) if not self._decided(i)}
        else:
            lo, hi = self._bounds()
            probe = (lo + hi) // 2 if self.method == "binary" else lo + 1  # 1-based prefix number
            want = {} if hi - lo <= 1 else {probe - 1: self._want(probe - 1)}
        want = {i: n for i, n in want.items() if n > 0}
        if want:
            self.rounds += 1
        self._pending = dict(want)
        return want

    def observe(self, i: int, rollouts: Sequence[Rollout]) -> None:
        """The outcomes of the fresh rollouts asked for prefix i this round."""
        if i not in self._pending:
            raise ValueError(f"prefix {i} was not requested this round (pending: {sorted(self._pending)})")
        asked = self._pending.pop(i)
        if len(rollouts) != asked:
            raise ValueError(f"prefix {i}: {asked} rollouts were requested, {len(rollouts)} observed")
        for r in rollouts:
            self.pools[i].append(bool(r.correct))
            self.fresh[i] += 1
            self.tokens += int(r.tokens)
            if self.reuse:
                for u in range(i + 1, self.n_steps - 1):
                    if r.text.startswith(self.completion[self.ends[i]:self.ends[u]]):
                        self.pools[u].append(bool(r.correct))
                    else:
                        break  # a rollout that leaves the text at prefix u passes through no later prefix

    def result(self) -> Labels:
        if self._pending:
            raise RuntimeError(f"result() with rollouts still pending for prefixes {sorted(self._pending)}")
        soft = [sum(p) / len(p) if p else math.nan for p in self.pools]
        if self.method == "naive":
            hard = [int(any(p)) for p in self.pools]
        else:
            lo, _ = self._bounds()
            hard = [int(t <= lo) for t in range(1, self.n_steps + 1)]
        return Labels(soft=soft, hard=hard, rollouts=[len(p) for p in self.pools], fresh=list(self.fresh),
                      tokens=self.tokens, first_error=first_error_of(hard),
                      outcomes=["".join("1" if o else "0" for o in p) for p in self.pools], rounds=self.rounds)


Oracle = Callable[[list[tuple[int, int, int]]], list[list[Rollout]]]


def run_planners(planners: Sequence[Planner], oracle: Oracle, max_rounds: int = 1000) -> list[Labels]:
    """Drive many planners round by round: each round's requests of all samples go to `oracle` in ONE call.

    oracle([(sample index, prefix index, n), ...]) -> for each request, its n rollouts. This is the batching the
    annotator does with the engine; tests pass a deterministic function of (sample, prefix).
    """
    for _ in range(max_rounds):
        batch = [(s, i, n) for s, p in enumerate(planners) for i, n in p.requests().items()]
        if not batch:
            return [p.result() for p in planners]
        outs = oracle(batch)
        if len(outs) != len(batch):
            raise ValueError(f"oracle returned {len(outs)} results for {len(batch)} requests")
        for (s, i, _), rollouts in zip(batch, outs):
            planners[s].observe(i, rollouts)
    raise RuntimeError(f"planners not done after {max_rounds} rounds")


# ----------------------------------------------------------------------------------------- label arithmetic

def mc_values(outcomes: Sequence[Sequence[bool]]) -> tuple[list[float], list[int]]:
    """Math-Shepherd estimates per prefix: soft = mean of the outcomes, hard = any; NaN / 0 for an empty pool."""
    soft = [sum(map(bool, o)) / len(o) if len(o) else math.nan for o in outcomes]
    hard = [int(any(o)) for o in outcomes]
    return soft, hard


def first_error_of(hard: Sequence[int]) -> int:
    """0-based index of the first step labelled 0 (wrong); -1 when none. Unlabelled steps (-1) are skipped."""
    for i, h in enumerate(hard):
        if h == 0:
            return i
    return -1


def hard_at_k(outcomes: Sequence[str], k: int) -> list[int]:
    """Naive hard labels from the first k outcomes of each pool ("1"/"0" strings): the label a run with K = k
    would have given (the last step's pool is the verdict alone, so it keeps its label)."""
    return [int("1" in o[:k]) for o in outcomes]


def consensus(hard: Sequence[int], soft: Sequence[float], other: Sequence[int] | None = None,
              min_soft_good: float = 0.0) -> list[int]:
    """Consensus filtering: keep hard_t when `other` (judge labels or step checks, 0/1, -1 = none) agrees with it
    and, for a label 1 with a measured soft value, when soft_t >= min_soft_good (the K rollouts agree strongly;
    a label 1 from 1 success in 8 is the noise Qwen's PRM lessons warn about). Dropped labels become -1."""
    out = []
    for t, h in enumerate(hard):
        keep = h in (0, 1)
        if keep and other is not None:
            keep = other[t] == h
        if keep and h == 1 and not math.isnan(soft[t]):
            keep = soft[t] >= min_soft_good
        out.append(h if keep else -1)
    return out


def prefix_truth(first_error: int, n_steps: int) -> list[bool]:
    """Prefix-level truth from a ground-truth first error: step i is right when no error happened up to it."""
    return [first_error < 0 or i < first_error for i in range(n_steps)]


def wrong_step_scores(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Precision / recall / F1 / accuracy of "step is wrong" (the positive class) from counts; the one convention for
    every such F1 (labels here, a trained PRM's flags in pipelines/train/metrics.py)."""
    labelled = tp + fp + fn + tn
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    if tp:
        f1 = 2 * precision * recall / (precision + recall)
    else:  # no true positive: F1 is 0 when anything was claimed or missed, undefined when there was nothing
        f1 = 0.0 if fp + fn else math.nan
    return {"precision": precision, "recall": recall, "f1": f1,
            "accuracy": (tp + tn) / labelled if labelled else math.nan}


def label_quality(pred_hard: Sequence[Sequence[int]], truth_ok: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Precision / recall / F1 of "step is wrong" (prediction: hard label 0; truth: not ok) over all steps of all
    samples; labels of -1 are left out and counted in `coverage` (share of steps with a label)."""
    tp = fp = fn = tn = total = 0
    for pred, truth in zip(pred_hard, truth_ok, strict=True):
        if len(pred) != len(truth):
            raise ValueError(f"{len(pred)} labels against {len(truth)} ground-truth steps")
        for h, ok in zip(pred, truth):
            total += 1
            if h not in (0, 1):
                continue
            wrong_pred, wrong_true = h == 0, not ok
            tp += wrong_pred and wrong_true
            fp += wrong_pred and not wrong_true
            fn += (not wrong_pred) and wrong_true
            tn += (not wrong_pred) and not wrong_true
    return {**wrong_step_scores(tp, fp, fn, tn), "coverage": (tp + fp + fn + tn) / total if total else math.nan,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn, "steps": total}


def first_error_accuracy(pred: Sequence[int], truth: Sequence[int]) -> float:
    """Share of samples whose predicted first error (index, -1 = none) equals the true one."""
    pairs = list(zip(pred, truth, strict=True))
    return sum(p == t for p, t in pairs) / len(pairs) if pairs else math.nan


def agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> dict[str, float]:
    """How two labellings of the same samples agree: share of steps with equal hard labels, share of samples with
    the same first error."""
    steps = same = first = 0
    pairs = list(zip(a, b, strict=True))
    for x, y in pairs:
        steps += len(x)
        same += sum(int(p == q) for p, q in zip(x, y, strict=True))
        first += first_error_of(x) == first_error_of(y)
    return {"step_agreement": same / steps if steps else math.nan,
            "first_error_agreement": first / len(pairs) if pairs else math.nan}


def agreement_vs_repeat(labels: Sequence[Sequence[int]], ref1: Sequence[Sequence[int]],
                        ref2: Sequence[Sequence[int]], truth: Sequence[Sequence[bool]] | None = None,
                        boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Agreement of one labelling with a stochastic reference that was run twice (naive MC labels, two independent
    runs ref1, ref2 on the same samples), separated from the reference's own noise. Per step, with m the labelling:

        floor      F = share of steps with ref1 = ref2                   (the reference agrees with itself)
        agreement  A = share of (step, run) pairs with m = ref_run, over both runs   (= mean of agree(m, ref1),
                       agree(m, ref2): a less noisy estimate of the agreement with one naive run)
        margin     A - F                                                  (> 0: agrees with naive better than naive
                                                                           agrees with itself)
        on_reproducible = share of the steps with ref1 = ref2 where m = ref1 too

    Identity: A = F * on_reproducible + (1 - F) / 2 (where the two runs differ, m matches exactly one), so no
    labelling can score A above (1 + F) / 2 (`ceiling`): a fixed agreement goal is out of reach whenever the
    reference's floor is below 2 * goal - 1. on_reproducible is the part that depends on the labelling alone.
    95% intervals: percentile bootstrap over samples (steps of one sample are correlated), `boot` resamples.
    With `truth` (per step: True = the prefix is right, `prefix_truth`), the steps where ref1 = ref2 != m are
    split by who the ground truth sides with: `disputed_truth_with_labels` / `disputed_truth_with_reference`.
    Written here because the statistic is specific to repeated MC labels; the bootstrap is a plain resample loop."""
    import random

    per = [list(zip(m, a, b, strict=True)) for m, a, b in zip(labels, ref1, ref2, strict=True)]

    def stats(samples: list[list[tuple[int, int, int]]]) -> tuple[float, float, float, int, int]:
        """agreement, floor, on_reproducible, reproducible steps, steps"""
        steps = sum(len(s) for s in samples)
        same = sum(a == b for s in samples for _, a, b in s)
        if not steps:
            return math.nan, math.nan, math.nan, 0, 0
        agree = sum((m == a) + (m == b) for s in samples for m, a, b in s) / (2 * steps)
        repro = sum(m == a for s in samples for m, a, b in s if a == b)
        return agree, same / steps, repro / same if same else math.nan, same, steps

    agree, floor, repro, same, steps = stats(per)
    rng = random.Random(seed)
    margins, repros = [], []
    for _ in range(boot if per else 0):
        a, f, r, _, _ = stats([per[rng.randrange(len(per))] for _ in per])
        margins.append(a - f)
        if not math.isnan(r):
            repros.append(r)

    def ci(xs: list[float]) -> tuple[float, float]:
        xs = sorted(xs)
        return (xs[int(0.025 * (len(xs) - 1))], xs[int(0.975 * (len(xs) - 1))]) if xs else (math.nan, math.nan)

    out = {"agreement_two_refs": agree, "noise_floor": floor, "margin": agree - floor,
           "margin_ci": ci(margins), "on_reproducible": repro, "on_reproducible_ci": ci(repros),
           "reproducible_steps": same, "steps": steps, "ceiling": (1 + floor) / 2}
    if truth is not None:
        with_m = with_ref = 0
        for s, t in zip(per, truth, strict=True):
            for (m, a, b), ok in zip(s, t, strict=True):
                if a == b != m:
                    with_m += int(bool(m) == bool(ok))
                    with_ref += int(bool(a) == bool(ok))
        out.update(disputed_truth_with_labels=with_m, disputed_truth_with_reference=with_ref)
    return out

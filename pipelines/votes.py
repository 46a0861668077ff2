"""Answer aggregation (pure): votes and selections over sampled answers, and step scores reduced to one.

Aggregators. Answers are grouped by verified equivalence, not by string: "1/2", "0.5" and "\\frac{1}{2}" are one
group (`pipelines.verify.answers_equivalent`). Each aggregator returns one of the given answers: the first member
(in input order) of the winning group. Tie-breaking, the same everywhere: among groups with equal vote (or summed
score), the larger group wins, then the group whose first member appears earliest in the input; best-of-N keeps the
earliest of equal scores.
With samples in generation order this is deterministic and reproducible.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

Equiv = Callable[[str, str], bool]


def default_equivalence(kind: str) -> Equiv:
    from pipelines.verify import answers_equivalent

    return lambda a, b: answers_equivalent(a, b, kind)


# ==========================================================================================================
# Aggregators
# ==========================================================================================================

def group_answers(answers: Sequence[str | None], equivalent: Equiv) -> list[list[int]]:
    """Indices of `answers` grouped by equivalence (None answers are left out), groups in first-seen order.

    An answer joins the first group whose first member it is equivalent to (equivalence is checked against the
    group's representative, so a chain a~b, b~c with a!~c cannot merge a and c).
    """
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            rep = answers[g[0]]
            if a == rep or equivalent(rep, a):  # type: ignore[arg-type]
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def argmax_group(groups: list[list[int]], value: Callable[[list[int]], float]) -> list[int] | None:
    """The group of the largest value; on a tie the larger group (a weighted vote whose scores tie, e.g. a 0/1
    verifier that passes none or several groups alike, falls back to the count), then the earliest."""
    best, best_v = None, (-math.inf, 0)
    for g in groups:  # strict ">" keeps the earliest group on full ties
        v = (value(g), len(g))
        if v > best_v:
            best, best_v = g, v
    return best


def vote_index(answers: Sequence[str | None], scores: Sequence[float] | None = None, kind: str = "math",
               equivalent: Equiv | None = None) -> int | None:
    """Index of the winning group's first member: by count (scores None) or by summed scores; None if no answer."""
    if scores is not None and len(answers) != len(scores):
        raise ValueError(f"vote: {len(answers)} answers but {len(scores)} scores")
    groups = group_answers(answers, equivalent or default_equivalence(kind))
    g = argmax_group(groups, len if scores is None else (lambda g: sum(scores[i] for i in g)))
    return g[0] if g else None


def majority_vote(answers: Sequence[str | None], kind: str = "math", equivalent: Equiv | None = None) -> str | None:
    """Self-consistency: the answer of the largest equivalence group."""
    i = vote_index(answers, None, kind, equivalent)
    return answers[i] if i is not None else None


def best_index(answers: Sequence[str | None], scores: Sequence[float]) -> int | None:
    """Index of the highest score among non-None answers (the earliest on ties); None when no answer at all."""
    if len(answers) != len(scores):
        raise ValueError(f"best_of_n: {len(answers)} answers but {len(scores)} scores")
    best, best_s = None, -math.inf
    for i, (a, s) in enumerate(zip(answers, scores)):
        if a is not None and s > best_s:
            best, best_s = i, s
    return best


def best_of_n(answers: Sequence[str | None], scores: Sequence[float]) -> str | None:
    """The answer with the highest verifier score (the earliest on ties; None answers never win)."""
    i = best_index(answers, scores)
    return answers[i] if i is not None else None


def weighted_majority_vote(answers: Sequence[str | None], scores: Sequence[float], kind: str = "math",
                           equivalent: Equiv | None = None) -> str | None:
    """Math-Shepherd's sc+rm: argmax over answer groups of the summed verifier scores."""
    if len(answers) != len(scores):
        raise ValueError(f"weighted_majority_vote: {len(answers)} answers but {len(scores)} scores")
    i = vote_index(answers, scores, kind, equivalent)
    return answers[i] if i is not None else None


def reduce_steps(step_scores: Sequence[float], how: str = "min") -> float:
    """A solution's score from its PRM step scores: min (Let's Verify Step by Step), last, or product.

    NaN scores (steps the scorer could not read, e.g. cut by its max_len) are left out; no score at all gives 0.
    """
    step_scores = [s for s in step_scores if not math.isnan(s)]
    if not step_scores:
        return 0.0
    if how == "min":
        return float(min(step_scores))
    if how == "last":
        return float(step_scores[-1])
    if how == "prod":
        return float(math.prod(step_scores))
    raise ValueError(f"step-score reduction {how!r} is not one of min, last, prod")


AGGREGATE = {"min": lambda s: reduce_steps(s, "min"), "last": lambda s: reduce_steps(s, "last"),
             "prod": lambda s: reduce_steps(s, "prod")}


# ==========================================================================================================
# Search over generate / score callables
# ==========================================================================================================

"""Intervals for accuracies measured on a few hundred problems (pure Python): the percentile bootstrap over
problems, and the paired difference of two models or strategies on the same problems.

Why resample problems, not samples: a problem's samples, votes and steps are correlated; the problem is the unit
the held-out set draws. Why paired: two models scored on the same problems differ less from problem to problem
than two independent sets would, so the interval of the difference is the one to read ("after - before").
"""

from __future__ import annotations

import math
import random
from typing import Callable, Hashable, Mapping, Sequence


def bootstrap_ci(units: Sequence[Hashable], stat: Callable[[list], float], reps: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of stat(resampled units) over `reps` resamples with replacement (NaN stats skipped);
    (nan, nan) when no resample gave a number. The seed is fixed so a report reads the same each time."""
    rng = random.Random(seed)
    units = list(units)
    if not units:
        return math.nan, math.nan
    vals = sorted(v for v in (stat([rng.choice(units) for _ in units]) for _ in range(reps)) if not math.isnan(v))
    if not vals:
        return math.nan, math.nan
    lo = (1.0 - level) / 2.0
    return vals[int(lo * len(vals))], vals[max(0, int((1.0 - lo) * len(vals)) - 1)]


def paired_gain(before: Mapping[str, bool], after: Mapping[str, bool], reps: int = 1000, seed: int = 0) -> dict:
    """Accuracy after - before on the problems both were scored on, with its paired 95% bootstrap interval.

    Returns {"n", "before", "after", "gain", "ci": (lo, hi), "excludes_zero"}."""
    ids = sorted(set(before) & set(after))
    if not ids:
        return {"n": 0, "before": math.nan, "after": math.nan, "gain": math.nan, "ci": (math.nan, math.nan),
                "excludes_zero": False}

    def mean(d: Mapping[str, bool], ps: list) -> float:
        return sum(bool(d[p]) for p in ps) / len(ps)

    ci = bootstrap_ci(ids, lambda ps: mean(after, ps) - mean(before, ps), reps, seed)
    return {"n": len(ids), "before": mean(before, ids), "after": mean(after, ids),
            "gain": mean(after, ids) - mean(before, ids), "ci": ci, "excludes_zero": ci[0] > 0 or ci[1] < 0}

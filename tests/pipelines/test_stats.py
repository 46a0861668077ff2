"""Bootstrap intervals over problems and the paired gain of two models on the same problems."""

import math

import pytest

from pipelines.stats import bootstrap_ci, paired_gain


def test_bootstrap_of_a_constant_is_that_constant_and_empty_is_nan():
    assert bootstrap_ci(list(range(50)), lambda ps: 0.25) == (0.25, 0.25)
    assert all(math.isnan(x) for x in bootstrap_ci([], lambda ps: 1.0))
    assert all(math.isnan(x) for x in bootstrap_ci([1, 2], lambda ps: math.nan))


def test_bootstrap_interval_of_a_mean_brackets_it_at_about_two_standard_errors():
    # 200 problems, 30% solved: the mean's standard error is sqrt(0.3 * 0.7 / 200) = 0.0324
    solved = {i: i % 10 < 3 for i in range(200)}
    lo, hi = bootstrap_ci(list(solved), lambda ps: sum(solved[p] for p in ps) / len(ps), reps=2000)
    assert lo < 0.3 < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * 0.0324, rel=0.15)


def test_paired_gain_sees_a_consistent_gain_and_not_a_shuffle():
    before = {f"p{i}": i < 20 for i in range(100)}  # 0.20
    after = {f"p{i}": i < 35 for i in range(100)}  # the same 20 plus 15 more: 0.35, never worse on a problem
    g = paired_gain(before, after)
    assert g["n"] == 100 and g["gain"] == pytest.approx(0.15) and g["excludes_zero"] and g["ci"][0] > 0.05
    # the same accuracy on other problems: no gain, the interval straddles zero
    moved = {f"p{i}": 50 <= i < 70 for i in range(100)}
    g = paired_gain(before, moved)
    assert g["gain"] == 0 and not g["excludes_zero"] and g["ci"][0] < 0 < g["ci"][1]
    # only problems scored on both sides count
    g = paired_gain({"a": True, "b": False}, {"b": True, "c": True})
    assert g["n"] == 1 and g["before"] == 0 and g["after"] == 1
    assert paired_gain({}, {"a": True})["n"] == 0

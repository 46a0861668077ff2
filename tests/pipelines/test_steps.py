"""MC step labels as pure logic: prefix text, Math-Shepherd estimates, naive / first-error search / reuse / early stop
planned over a scripted rollout oracle (a fake of the engine, named as such), and label-quality metrics. Every
expected value below is derived by hand in the comment beside it."""

import math
import random

import pytest

from pipelines.prompts import split_steps
from pipelines.steps import (Planner, Rollout, agreement, agreement_vs_repeat, consensus, first_error_accuracy,
                             first_error_of, hard_at_k, label_quality, mc_values, prefix_truth, run_planners, step_ends,
                             wrong_step_scores)

# ------------------------------------------------------------------------------------------------ prefix text


@pytest.mark.parametrize("completion, fmt, sep, ends", [
    # "5 + 2 = 7" (9) + "\n" -> 10; "7 * 3 = 21" (10) + "\n" -> 21; "The answer is 21." (17) -> 38
    ("5 + 2 = 7\n7 * 3 = 21\nThe answer is 21.", "lines", "\n", [10, 21, 38]),
    # trailing spaces before the separator belong to the prefix; a blank line is not doubled: "a  \n" -> 4
    ("a  \n\nb", "lines", "\n", [4, 6]),
    ("a\n\nb\n\nc", "paragraphs", "\n\n", [3, 6, 7]),
    # staged: "<SUMMARY> s </SUMMARY>\n<REASONING>\n" is 23 + 12 = 35 chars; "1 + 1 = 2\n" ends at 45;
    # "</REASONING>\n<CONCLUSION> " is 13 + 13 more (71), "The answer is 2." (16) ends at 87
    ("<SUMMARY> s </SUMMARY>\n<REASONING>\n1 + 1 = 2\n</REASONING>\n<CONCLUSION> The answer is 2. </CONCLUSION>",
     "staged", "\n", [45, 87]),
])
def test_step_ends_locate_prefixes_in_the_original_text(completion, fmt, sep, ends):
    steps = split_steps(completion, fmt)
    assert step_ends(completion, steps, sep) == ends
    for step, end in zip(steps, ends):
        assert completion[:end].rstrip().endswith(step)


def test_step_ends_names_a_step_that_is_not_in_the_text():
    with pytest.raises(ValueError, match="step 1"):
        step_ends("a\nb", ["a", "c"])


# ------------------------------------------------------------------------------------------ label arithmetic


def test_mc_values_table():
    soft, hard = mc_values([[1, 0, 1, 1], [0, 0], [], [1]])
    assert soft[:2] == [0.75, 0.0] and math.isnan(soft[2]) and soft[3] == 1.0
    assert hard == [1, 0, 0, 1]


class ScriptedOracle:
    """A FAKE of the engine for unit tests of the planning logic: per (sample, prefix) a list of (verdict, text)
    handed out in order, 10 tokens each. It records every call, so a test can count engine rounds."""

    def __init__(self, script: dict[tuple[int, int], list[tuple[int, str]]]):
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[list[tuple[int, int, int]]] = []

    def __call__(self, batch):
        self.calls.append(batch)
        out = []
        for s, i, n in batch:
            items = [self.script[(s, i)].pop(0) for _ in range(n)]
            out.append([Rollout(bool(c), text, 10) for c, text in items])
        return out


COMPLETION = "s1\ns2\ns3\ns4"  # four steps; prefix ends 3, 6, 9, 11
STEPS = ["s1", "s2", "s3", "s4"]


def _script():
    # verdicts scripted per prefix (the last prefix is the solution itself and never rolled out)
    return {(0, 0): [(1, "s2\ns3\nend"), (0, "s2\nx"), (1, "y"), (1, "z")],
            (0, 1): [(0, "a"), (0, "b"), (1, "c"), (0, "d")],
            (0, 2): [(0, "e"), (0, "f"), (0, "g"), (0, "h")]}


def _label(**kw):
    oracle = ScriptedOracle(_script())
    p = Planner(COMPLETION, step_ends(COMPLETION, STEPS), verdict=False, k=4, **kw)
    return run_planners([p], oracle)[0], oracle


def test_naive_labels():
    lab, oracle = _label(method="naive")
    # prefix 0: 1,0,1,1 -> 3/4; prefix 1: 0,0,1,0 -> 1/4; prefix 2: all 0; prefix 3: the wrong solution itself
    assert lab.soft == [0.75, 0.25, 0.0, 0.0]
    assert lab.hard == [1, 1, 0, 0] and lab.first_error == 2
    assert lab.rollouts == [4, 4, 4, 1] and lab.fresh == [4, 4, 4, 0]
    assert lab.tokens == 120 and lab.rounds == 1 and len(oracle.calls) == 1
    assert lab.outcomes == ["1011", "0010", "0000", "0"]


def test_naive_early_stop_arithmetic():
    lab, oracle = _label(method="naive", early_stop=True, chunk=2)
    # round 1: p0 gets 1,0 (stops), p1 0,0, p2 0,0; round 2: p1 1,0 (stops), p2 0,0 (K reached)
    assert lab.outcomes == ["10", "0010", "0000", "0"]
    assert lab.soft == [0.5, 0.25, 0.0, 0.0] and lab.hard == [1, 1, 0, 0]
    assert lab.fresh == [2, 4, 4, 0] and lab.tokens == 100 and lab.rounds == 2
    assert [[(i, n) for _, i, n in c] for c in oracle.calls] == [[(0, 2), (1, 2), (2, 2)], [(1, 2), (2, 2)]]


def test_naive_reuse_arithmetic():
    lab, oracle = _label(method="naive", reuse=True)
    # every pool starts with the sample's own verdict (0); each prefix asks K - 1 = 3.
    # p0: 0 + (1, 0, 1). Its 1st rollout "s2\ns3\nend" passes through p1 ("s2\n") and p2 ("s2\ns3\n"): +1 each;
    # its 2nd "s2\nx" passes through p1 only: +0. p1: 0, 1, 0 + own (0, 0, 1). p2: 0, 1 + own (0, 0, 0).
    assert oracle.calls == [[(0, 0, 3), (0, 1, 3), (0, 2, 3)]]
    assert lab.outcomes == ["0101", "010001", "01000", "0"]
    assert lab.soft == pytest.approx([2 / 4, 2 / 6, 1 / 5, 0.0])
    assert lab.hard == [1, 1, 1, 0] and lab.first_error == 3
    assert lab.rollouts == [4, 6, 5, 1] and lab.fresh == [3, 3, 3, 0] and lab.tokens == 90


def test_binary_search_arithmetic():
    lab, oracle = _label(method="binary")
    # lo=0, hi=T=4 (wrong solution) -> mid 2 (index 1): 0,0,1,0 has a success -> lo=2; mid 3 (index 2): 4 failures
    # -> hi=3; done: first error at prefix 3 (index 2); prefix 1 never rolled out, labelled 1 by monotonicity.
    assert [[(i, n) for _, i, n in c] for c in oracle.calls] == [[(1, 4)], [(2, 4)]]
    assert lab.hard == [1, 1, 0, 0] and lab.first_error == 2
    assert math.isnan(lab.soft[0]) and lab.soft[1:] == [0.25, 0.0, 0.0]
    assert lab.rollouts == [0, 4, 4, 1] and lab.tokens == 80 and lab.rounds == 2


def test_binary_with_reuse_and_early_stop_arithmetic():
    lab, oracle = _label(method="binary", reuse=True, early_stop=True, chunk=2)
    # pools start [0]; mid = index 1 asks min(2, 4 - 1) = 2: 0,0; again min(2, 1) = 1: 1 -> good, lo = 2;
    # mid = index 2 asks 2: 0,0, then 1: 0 -> pool 0000 = K failures -> bad, hi = 3.
    assert [[(i, n) for _, i, n in c] for c in oracle.calls] == [[(1, 2)], [(1, 1)], [(2, 2)], [(2, 1)]]
    assert lab.outcomes == ["0", "0001", "0000", "0"]
    assert lab.hard == [1, 1, 0, 0] and lab.soft == [0.0, 0.25, 0.0, 0.0]
    assert lab.fresh == [0, 3, 3, 0] and lab.tokens == 60 and lab.rounds == 4


@pytest.mark.parametrize("growth, reuse, asks", [
    (1.0, False, [2] * 8),  # a fixed chunk: K / chunk = 8 rounds to decide a bad prefix
    (2.0, False, [2, 2, 4, 8]),  # each round asks what was spent so far: totals 2, 4, 8, 16
    (2.0, True, [2, 2, 4, 7]),  # the pool starts with the sample (K - 1 = 15 left): the last round takes what is left
    (1.5, False, [2, 2, 2, 3, 5, 2]),  # max(2, ceil(0.5 * spent)): spent 0, 2, 4, 6, 9, 14 -> 16
])
def test_growing_chunk_decides_a_bad_prefix_in_fewer_rounds(growth, reuse, asks):
    completion, steps = "a\nb", ["a", "b"]
    oracle = ScriptedOracle({(0, 0): [(0, "x")] * 16})
    p = Planner(completion, step_ends(completion, steps), verdict=False, k=16, method="scan", reuse=reuse,
                early_stop=True, chunk=2, chunk_growth=growth)
    lab = run_planners([p], oracle)[0]
    assert [n for c in oracle.calls for _, _, n in c] == asks and lab.rounds == len(asks)
    assert lab.hard == [0, 0] and lab.rollouts[0] == 16 and lab.tokens == 10 * sum(asks)


def test_growing_chunk_still_stops_a_good_prefix_at_its_first_success():
    completion, steps = "a\nb\nc", ["a", "b", "c"]
    # prefix 0: fails twice, then its 3rd rollout succeeds (round 2 asks 2: "1" and one more that is still spent);
    # prefix 1: fails 16 times -> first error at step 2 (index 1)
    script = {(0, 0): [(0, "x"), (0, "x"), (1, "y"), (0, "x")], (0, 1): [(0, "z")] * 16}
    oracle = ScriptedOracle(script)
    p = Planner(completion, step_ends(completion, steps), verdict=False, k=16, method="scan", early_stop=True,
                chunk=2, chunk_growth=2.0)
    lab = run_planners([p], oracle)[0]
    assert [[(i, n) for _, i, n in c] for c in oracle.calls] == [[(0, 2)], [(0, 2)], [(1, 2)], [(1, 2)], [(1, 4)],
                                                               [(1, 8)]]
    assert lab.outcomes == ["0010", "0" * 16, "0"] and lab.hard == [1, 0, 0] and lab.first_error == 1
    assert lab.fresh == [4, 16, 0] and lab.rounds == 6


def test_chunk_schedule_does_not_change_what_the_labels_estimate():
    """A stochastic FAKE engine with pass-throughs: a rollout from prefix t reproduces the next step with
    probability q (and then continues as a rollout from there), else leaves the text and succeeds with r_t. The hard
    label of a prefix is "a success among up to K rollouts" whatever the chunks, so fixed and doubling chunks must
    label alike up to sampling noise (seen on the real model: runs 7-8 differed by 0.02-0.04 in agreement)."""
    rng = random.Random(0)
    cases = [(rng.randint(2, 5), rng.choice([0.0, 0.3, 0.6]), rng.random() < 0.5) for _ in range(1500)]
    rates = [[rng.choice([0.0, 0.02, 0.1, 0.3, 0.6]) for _ in range(T)] for T, _, _ in cases]

    def oracle(batch):
        out = []
        for s, i, n in batch:
            T, q, verdict = cases[s]
            rolls = []
            for _ in range(n):
                t, text = i, ""
                while t < T - 1 and rng.random() < q:
                    t += 1
                    text += f"s{t}\n"
                ok = verdict if t == T - 1 else rng.random() < rates[s][t]
                rolls.append(Rollout(bool(ok), text + "x", 1))
            out.append(rolls)
        return out

    def run(**kw):
        ps = []
        for T, _, verdict in cases:
            text = "\n".join(f"s{t}" for t in range(T))
            ps.append(Planner(text, step_ends(text, [f"s{t}" for t in range(T)]), verdict=verdict, k=16, **kw))
        return [lab.hard for lab in run_planners(ps, oracle)]

    naive = run(method="naive")
    share = {}
    for g in (1.0, 2.0):
        hard = run(method="scan", reuse=True, early_stop=True, chunk=2, chunk_growth=g)
        share[g] = (agreement(hard, naive)["step_agreement"], sum(map(sum, hard)) / sum(map(len, hard)))
    # ~5,200 steps: one agreement has a standard error of ~0.005, one share of good labels ~0.007
    assert abs(share[1.0][0] - share[2.0][0]) < 0.02 and abs(share[1.0][1] - share[2.0][1]) < 0.025


def test_binary_jumps_over_prefixes_a_successful_rollout_passes_through():
    completion, steps = "a\nb\nc\nd\ne", ["a", "b", "c", "d", "e"]
    oracle = ScriptedOracle({(0, 1): [(1, "c\nd\n The answer is 3.")]})
    p = Planner(completion, step_ends(completion, steps), verdict=False, k=2, method="binary", reuse=True)
    lab = run_planners([p], oracle)[0]
    # mid = (0 + 5) // 2 = 2 (index 1) asks K - 1 = 1 rollout (the pool holds the sample); its success
    # reproduces "c\nd\n": prefixes 3 and 4 become good -> lo = 4, hi = 5: one query located the error at the
    # last step
    assert len(oracle.calls) == 1 and lab.hard == [1, 1, 1, 1, 0] and lab.first_error == 4
    assert lab.outcomes == ["0", "01", "01", "01", "0"]


def test_correct_sample_costs_nothing_with_first_error_search():
    p = Planner(COMPLETION, step_ends(COMPLETION, STEPS), verdict=True, k=4, method="binary")
    lab = run_planners([p], ScriptedOracle({}))[0]
    assert lab.hard == [1, 1, 1, 1] and lab.first_error == -1 and lab.tokens == 0 and lab.rounds == 0
    # naive still rolls out every prefix but the last
    p = Planner(COMPLETION, step_ends(COMPLETION, STEPS), verdict=True, k=1, method="naive")
    lab = run_planners([p], ScriptedOracle({(0, 0): [(0, "")], (0, 1): [(0, "")], (0, 2): [(1, "")]}))[0]
    assert lab.hard == [0, 0, 1, 1] and lab.first_error == 0


def test_one_engine_call_per_round_across_samples():
    script = {**_script(), **{(1, i): v for (_, i), v in _script().items()}}
    oracle = ScriptedOracle(script)
    planners = [Planner(COMPLETION, step_ends(COMPLETION, STEPS), verdict=False, k=4, method="binary")
                for _ in range(2)]
    labs = run_planners(planners, oracle)
    assert len(oracle.calls) == 2 and [len(c) for c in oracle.calls] == [2, 2]
    assert labs[0].hard == labs[1].hard == [1, 1, 0, 0]


def _deterministic_oracle(values: list[list[int]], k_texts: str = ""):
    """A FAKE engine whose rollouts from prefix t of sample s always have verdict values[s][t]."""
    def oracle(batch):
        return [[Rollout(bool(values[s][i]), k_texts, 5) for _ in range(n)] for s, i, n in batch]
    return oracle


def test_scan_probes_from_the_front():
    lab, oracle = _label(method="scan")
    # lo=0 -> probe prefix 1 (index 0): 1,0,1,1 good -> lo=1; probe index 1: 0,0,1,0 good -> lo=2; probe index 2:
    # 4 failures -> hi=3: the same first error as naive and binary, three prefixes queried (binary: two)
    assert [[(i, n) for _, i, n in c] for c in oracle.calls] == [[(0, 4)], [(1, 4)], [(2, 4)]]
    assert lab.hard == [1, 1, 0, 0] and lab.first_error == 2 and lab.tokens == 120
    # a solution wrong at its first step: one probe where binary needs two
    script = {(0, 0): [(0, "a")] * 4, (0, 1): [(0, "b")] * 4, (0, 2): [(0, "c")] * 4}
    for method, probes in (("scan", [[(0, 4)]]), ("binary", [[(1, 4)], [(0, 4)]])):
        oracle = ScriptedOracle({k: list(v) for k, v in script.items()})
        p = Planner(COMPLETION, step_ends(COMPLETION, STEPS), verdict=False, k=4, method=method)
        lab = run_planners([p], oracle)[0]
        assert [[(i, n) for _, i, n in c] for c in oracle.calls] == probes
        assert lab.hard == [0, 0, 0, 0] and lab.first_error == 0


@pytest.mark.parametrize("method", ["binary", "scan"])
@pytest.mark.parametrize("flags", [dict(), dict(reuse=True), dict(early_stop=True, chunk=1),
                                   dict(reuse=True, early_stop=True, chunk=3),
                                   dict(reuse=True, early_stop=True, chunk=2, chunk_growth=2.0)])
def test_binary_finds_the_naive_first_error_when_rollouts_are_deterministic(flags, method):
    rng = random.Random(0)
    values, planners_n, planners_b = [], [], []
    for _ in range(200):
        T = rng.randint(1, 9)
        f = rng.randint(0, T)  # first wrong prefix (0-based); f = T: no error
        v = [int(t < f) for t in range(T)]
        values.append(v)
        text = "\n".join(f"step {t}" for t in range(T))
        ends = step_ends(text, [f"step {t}" for t in range(T)])
        planners_n.append(Planner(text, ends, verdict=bool(v[-1]), k=4, method="naive", **flags))
        planners_b.append(Planner(text, ends, verdict=bool(v[-1]), k=4, method=method, **flags))
    naive = run_planners(planners_n, _deterministic_oracle(values))
    binary = run_planners(planners_b, _deterministic_oracle(values))
    for v, a, b in zip(values, naive, binary):
        assert a.first_error == b.first_error == first_error_of(v)
        assert a.hard == b.hard == v
        assert b.tokens <= a.tokens
        queried = sum(1 for n in b.fresh if n)
        if method == "binary":  # at most ceil(log2 T) prefixes are queried by the search
            assert queried <= math.ceil(math.log2(len(v))) if len(v) > 1 else b.tokens == 0
        else:  # the prefixes up to the first error, none after it
            assert queried == (min(first_error_of(v) + 1, len(v) - 1) if first_error_of(v) >= 0 else 0)
    # naive without early stop spends K on every prefix; binary about log2(T) prefixes; scan (first errors spread
    # evenly here, its worst case) about half of them
    factor = 2 if method == "binary" and not flags.get("early_stop") else 1
    assert sum(b.tokens for b in binary) < sum(a.tokens for a in naive) / factor


def test_binary_on_non_monotone_values_finds_a_drop():
    rng = random.Random(1)
    for _ in range(200):
        T = rng.randint(2, 9)
        v = [rng.randint(0, 1) for _ in range(T)]
        text = "\n".join(f"s{t}" for t in range(T))
        p = Planner(text, step_ends(text, [f"s{t}" for t in range(T)]), verdict=bool(v[-1]), k=2,
                    method="binary")
        lab = run_planners([p], _deterministic_oracle([v]))[0]
        i = lab.first_error
        if i >= 0:  # a located error is a good-to-bad transition of the oracle (or the first step being bad)
            assert v[i] == 0 and (i == 0 or v[i - 1] == 1)
        else:
            assert v[-1] == 1


def test_planner_rejects_misuse():
    with pytest.raises(ValueError, match="method"):
        Planner("a", [1], verdict=True, method="ternary")
    with pytest.raises(ValueError, match="chunk_growth >= 1"):
        Planner("a", [1], verdict=True, early_stop=True, chunk_growth=0.5)
    p = Planner(COMPLETION, step_ends(COMPLETION, STEPS), verdict=False, k=2)
    want = p.requests()
    with pytest.raises(RuntimeError, match="before observe"):
        p.requests()
    with pytest.raises(ValueError, match="2 rollouts were requested, 1 observed"):
        p.observe(0, [Rollout(True)])
    assert want == {0: 2, 1: 2, 2: 2}


# -------------------------------------------------------------------------------------------- label quality


def test_hard_at_k_and_first_error_of():
    assert hard_at_k(["0011", "0000", "1", "0"], 2) == [0, 0, 1, 0]
    assert hard_at_k(["0011", "0000", "1", "0"], 4) == [1, 0, 1, 0]
    assert first_error_of([1, 1, 0, 1]) == 2 and first_error_of([1, 1]) == -1 and first_error_of([-1, 0]) == 1


def test_consensus_filter_table():
    hard, soft = [1, 1, 0, 1, 0], [0.125, 0.75, 0.0, math.nan, 0.0]
    # min_soft_good 0.5: 1/8 is too weak a good label -> -1; NaN soft (inferred label) is kept
    assert consensus(hard, soft, min_soft_good=0.5) == [-1, 1, 0, 1, 0]
    # with a judge: keep only where it agrees; a judge's -1 (no verdict) drops the label
    assert consensus(hard, soft, other=[1, 0, 0, -1, 1]) == [1, -1, 0, -1, -1]


def test_label_quality_table():
    pred = [[1, 0, 0], [1, 1, -1]]
    truth = [[True, False, False], [True, False, True]]
    q = label_quality(pred, truth)
    # tn, tp, tp | tn, fn, (skipped): P = 2/2, R = 2/3, F1 = 2 * 1 * 2/3 / (5/3) = 0.8
    assert (q["tp"], q["fp"], q["fn"], q["tn"]) == (2, 0, 1, 2)
    assert q["precision"] == 1.0 and q["recall"] == pytest.approx(2 / 3) and q["f1"] == pytest.approx(0.8)
    assert q["accuracy"] == pytest.approx(4 / 5) and q["coverage"] == pytest.approx(5 / 6)
    # nothing wrong predicted or true: P, R, F1 undefined
    q = label_quality([[1, 1]], [[True, True]])
    assert math.isnan(q["precision"]) and math.isnan(q["f1"]) and q["accuracy"] == 1.0
    # everything wrong predicted on right steps: F1 0
    assert label_quality([[0, 0]], [[True, True]])["f1"] == 0.0
    # wrong steps all missed: F1 0
    assert label_quality([[1, 1]], [[True, False]])["f1"] == 0.0


@pytest.mark.parametrize("counts,f1", [
    ((0, 0, 0, 3), math.nan),  # nothing wrong, nothing flagged: undefined
    ((0, 0, 2, 1), 0.0),       # wrong steps all missed
    ((0, 2, 0, 1), 0.0),       # false flags only
    ((1, 1, 1, 2), 0.5),       # P = R = 1/2
])
def test_wrong_step_scores_no_true_positive_convention(counts, f1):
    got = wrong_step_scores(*counts)["f1"]
    assert (math.isnan(got) and math.isnan(f1)) or got == f1


def test_prefix_truth_first_error_accuracy_and_agreement():
    assert prefix_truth(1, 3) == [True, False, False] and prefix_truth(-1, 2) == [True, True]
    assert first_error_accuracy([1, -1, 2], [1, -1, 0]) == pytest.approx(2 / 3)
    a = agreement([[1, 0, 0], [1, 1]], [[1, 1, 0], [1, 1]])
    # steps: 2 of 3 + 2 of 2 = 4/5; first errors: (1 vs 2), (-1 vs -1) -> 1/2
    assert a == {"step_agreement": pytest.approx(4 / 5), "first_error_agreement": 0.5}


def test_agreement_vs_repeat_separates_the_reference_noise():
    # sample 1: m=[1,1,0], ref1=[1,0,0], ref2=[1,1,0]; sample 2: m=[0,1], ref1=[0,1], ref2=[1,1]
    m, r1, r2 = [[1, 1, 0], [0, 1]], [[1, 0, 0], [0, 1]], [[1, 1, 0], [1, 1]]
    truth = [[True, True, False], [False, True]]
    s = agreement_vs_repeat(m, r1, r2, truth, boot=300)
    # ref1 = ref2 on steps (1,0), (1,2), (2,1): floor 3/5; m equals them on all 3: on_reproducible 1
    assert s["noise_floor"] == pytest.approx(3 / 5) and s["on_reproducible"] == 1.0
    assert s["reproducible_steps"] == 3 and s["steps"] == 5
    # pairs (m = ref_run): step (1,0) 2, (1,1) 1, (1,2) 2, (2,0) 1, (2,1) 2 -> 8 of 10
    assert s["agreement_two_refs"] == pytest.approx(0.8) and s["margin"] == pytest.approx(0.2)
    # the identity A = F * on_reproducible + (1 - F) / 2, and A at the ceiling (1 + F) / 2
    assert s["agreement_two_refs"] == pytest.approx(s["noise_floor"] * 1.0 + (1 - s["noise_floor"]) / 2)
    assert s["ceiling"] == pytest.approx(0.8)
    assert s["margin_ci"][0] <= s["margin"] <= s["margin_ci"][1]
    assert s["disputed_truth_with_labels"] == 0 and s["disputed_truth_with_reference"] == 0  # no dispute
    # a labelling that contradicts the reproducible steps: m2 = [0,1,1],[0,0]; disputed steps (1,0), (1,2), (2,1)
    s2 = agreement_vs_repeat([[0, 1, 1], [0, 0]], r1, r2, truth, boot=300)
    assert s2["on_reproducible"] == 0.0 and s2["agreement_two_refs"] == pytest.approx((0 + 1 + 0 + 1 + 0) / 10)
    # truth on those: (1,0) True -> ref's 1; (1,2) False -> ref's 0; (2,1) True -> ref's 1: all with the reference
    assert (s2["disputed_truth_with_labels"], s2["disputed_truth_with_reference"]) == (0, 3)
    assert s2["margin_ci"][1] < 0  # every resample scores below the floor
    # deterministic for a seed; lengths must match
    assert agreement_vs_repeat(m, r1, r2, boot=50, seed=3) == agreement_vs_repeat(m, r1, r2, boot=50, seed=3)
    with pytest.raises(ValueError):
        agreement_vs_repeat([[1]], [[1, 0]], [[1, 0]])

"""Tests for pipelines/verify.py: tables of hand-derived cases, math-verify's own cases, time limits, batches."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pipelines import verify
from pipelines.verify import (
    HARD_KILL_GRACE_S,
    Extraction,
    Verdict,
    answers_equivalent,
    check_steps,
    extract_answer,
    first_error,
    grade,
    math_equal,
    numeric_equal,
    verify_batch,
    verify_row,
)

DATA = Path(os.environ.get("STEPRAY_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def _data(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"{relative} not found under {DATA} (set STEPRAY_DATA to the shared data folder)")
    return path


# ---------------------------------------------------------------------------------------------- extraction

@pytest.mark.parametrize(
    "text, answer, method",
    [
        ("So the result is \\boxed{42}.", "42", "boxed"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}", "boxed"),  # nested braces
        ("First \\boxed{1}, then finally \\boxed{2}", "2", "boxed"),  # the last one
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}", "boxed"),  # escaped braces pair up
        ("\\fbox{7}", "7", "boxed"),
        ("The answer is \\boxed{5}.", "5", "boxed"),  # boxed wins over the phrase around it
        ("\\boxed{x\nThe answer is 5", "5", "answer_is"),  # an unbalanced box is ignored
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72", "gsm8k"),
        ("#### 1,080", "1,080", "gsm8k"),
        ("The answer is 18.", "18", "answer_is"),
        ("The final answer is 3.5.", "3.5", "answer_is"),  # the sentence's period goes, the decimal stays
        ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}", "answer_is"),
        ("Therefore, the answer is: 3.5.", "3.5", "answer_is"),
        ("The final answer is $\\$36$. Yes", "\\$36", "answer_is"),  # an escaped dollar does not close $...$
        ("Answer: 7", "7", "answer_line"),
        ("**Final Answer:** 12 apples", "12 apples", "answer_line"),
        ("I think the answer is 4 but\nAnswer: 5", "5", "answer_line"),  # whichever marker comes last
        ("Answer: 5\nNo wait, the answer is 6.", "6", "answer_is"),
        ("We get 3 apples, then 4.5 more, total -2.25", "-2.25", "last_number"),
        ("It costs $1,234.50 in total", "1,234.50", "last_number"),
        ("3 + 4, so the answer is", "4", "last_number"),  # an empty marker falls through
        ("No numbers here.", None, "none"),
        ("", None, "none"),
    ],
)
def test_extract_answer(text, answer, method):
    assert extract_answer(text) == Extraction(answer, method)


def test_extract_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="extract_answer needs a str, got int"):
        extract_answer(5)


# ------------------------------------------------------------------------------------------------- numeric

@pytest.mark.parametrize(
    "pred, gold, equal",
    [
        ("72", "72", True),
        ("72.0", "72", True),
        ("72.00", "72", True),
        ("18.", "18", True),
        (".5", "0.5", True),
        ("1,080", "1080", True),
        ("$1,080", "1080", True),
        ("\\$18.00", "18", True),
        ("1080 dollars", "1,080", True),
        ("18 apples", "18", True),
        ("\\text{18 cm}", "18", True),
        ("14{,}916", "14916", True),
        ("-5", "-5", True),
        ("−5", "-5", True),  # unicode minus
        ("5", "-5", False),
        ("0.5", "1/2", True),
        ("\\frac{1}{2}", "0.5", True),
        ("-\\dfrac{3}{4}", "-0.75", True),
        ("50%", "50", True),  # GSM8K reads % as a unit
        ("1e3", "1000", True),
        ("0.333333", "1/3", True),  # |diff| = 1/3e-6 <= 1e-6 * 1/3
        ("0.33", "1/3", False),
        ("1000001", "1000000", False),  # integers compare exactly, never within rel_tol
        ("1000000.5", "1000000", False),
        ("2,5", "2.5", False),  # a comma is a thousands separator only before three digits
        ("3 apples and 4 pears", "7", False),
        ("seven", "7", False),
        ("\\sqrt{4}", "2", False),  # an expression, not a number: numeric grading does not evaluate it
        ("", "7", False),
    ],
)
def test_numeric_equal(pred, gold, equal):
    assert numeric_equal(pred, gold) is equal


# --------------------------------------------------------------------------------------------------- grade

GSM8K_GOLD = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
              "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18")


@pytest.mark.parametrize(
    "completion, gold, reason, answer, method",
    [
        ("She sells 9 eggs at $2.\n#### 18", "18", "correct", "18", "gsm8k"),
        ("She makes 9 * 2 = 18 dollars. The answer is 18.", GSM8K_GOLD, "correct", "18", "answer_is"),
        ("The answer is $18.00.", GSM8K_GOLD, "correct", "$18.00", "answer_is"),
        ("The answer is 17.", GSM8K_GOLD, "wrong", "17", "answer_is"),
        ("so 5 + 13 = 18", "18", "correct", "18", "last_number"),
        ("\\boxed{1,000}", "1000", "correct", "1,000", "boxed"),
        ("I don't know.", "18", "no_answer", None, "none"),
        ("The answer is 18.", "eighteen", "error", "18", "answer_is"),  # the gold is not a number
    ],
)
def test_grade_numeric(completion, gold, reason, answer, method):
    v = grade(completion, gold, kind="numeric")
    assert (v.reason, v.answer, v.method, v.correct) == (reason, answer, method, reason == "correct")


@pytest.mark.parametrize(
    "completion, gold, reason",
    [
        ("\\boxed{\\frac{1}{2}}", "0.5", "correct"),  # fractions
        ("The answer is 1/2", "\\frac12", "correct"),
        ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", "correct"),  # radicals
        ("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", "correct"),
        ("\\boxed{0.70710678}", "\\frac{\\sqrt{2}}{2}", "correct"),  # decimals, rounded to 6 places
        ("\\boxed{0.7071}", "\\frac{\\sqrt{2}}{2}", "wrong"),
        ("\\boxed{[0,1)}", "[0,1)", "correct"),  # intervals
        ("\\boxed{(0,1)}", "[0,1)", "wrong"),
        ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", "correct"),  # sets
        ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "correct"),
        ("The answer is $5\\text{ cm}$.", "5", "correct"),  # units and text wrappers
        ("\\boxed{\\text{Evelyn}}", "Evelyn", "correct"),
        ("\\boxed{28\\%}", "28", "correct"),  # percent
        ("\\boxed{\\$36}", "36", "correct"),  # currency
        ("The answer is $\\$18.90$.", "\\boxed{\\$18.90}", "correct"),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", "correct"),  # symbolic
        ("\\boxed{x=3}", "3", "correct"),
        ("\\boxed{10^{10}}", "10000000000", "correct"),
        ("\\boxed{3}", "4", "wrong"),
        ("no answer here", "4", "no_answer"),
        ("\\boxed{3}", "", "error"),
    ],
)
def test_grade_math(completion, gold, reason):
    v = grade(completion, gold, kind="math")
    assert v.reason == reason, v
    assert v.correct == (reason == "correct")


def test_grade_rejects_unknown_kind():
    with pytest.raises(ValueError, match="got 'code'; code goes through grade_code"):
        grade("x", "y", kind="code")


@pytest.mark.parametrize(
    "a, b, kind, equivalent",
    [
        ("1/2", "0.5", "math", True),
        ("\\frac{1}{2}", "0.5", "math", True),
        ("1/2", "\\frac{1}{2}", "math", True),
        ("1/2", "\\frac{1}{2}", "numeric", True),
        ("0.5", "\\frac{1}{2}", "numeric", True),
        ("x+1", "1+x", "math", True),
        ("\\sqrt{4}", "2", "math", True),
        ("2", "3", "math", False),
        ("1,000", "1000", "numeric", True),
        ("50\\%", "0.5", "math", True),  # math-verify reads % as /100
        ("50\\%", "0.5", "numeric", False),  # GSM8K reads it as a unit
    ],
)
def test_answers_equivalent(a, b, kind, equivalent):
    assert answers_equivalent(a, b, kind) is equivalent


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 20000 + "x",  # thousands of unclosed boxes
        "the answer is " * 20000,
        "1" * 200_000,  # a number longer than int() converts by default
        "1 + " * 30_000 + "1 = 30001",  # a sum too deep for Python's parser
        "(" * 500 + "1" + ")" * 500 + " = 1 + 0",
    ],
)
def test_adversarial_text_is_handled_quickly(text):
    start = time.monotonic()
    extract_answer(text)
    check_steps([text], [1])
    assert grade(text, "1").reason in {"wrong", "no_answer"}
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "pred, gold, equal",
    [("1e5000", "1e5000", True), ("1e5000", "2e5000", False), ("1e5000", "7", False), ("1e-5000", "0", False)],
)
def test_numeric_equal_beyond_float_range(pred, gold, equal):
    assert numeric_equal(pred, gold) is equal


# ------------------------------------------------------------------------------------------- bare answers

# MATH's own answer-equivalence cases (hendrycks/math, modeling/math_equivalence_test.py: all 16), passed as
# bare predictions the way MATH-style data gives them; each is also checked with the sides swapped.
MATH_EQUIVALENCE_CASES = [
    ("\\tfrac{1}{2} + \\frac1{72}", "\\\\frac{1}{2} + 2/3", False),
    ("10, 4, -2", "4, 10, -2", False),  # a bare list compares in order, as MATH's grader does
    ("10, 4, 2", "4, 12, 2", False),
    ("\\tfrac{1}{2} +\\! \\frac1{72}", "\\\\dfrac{1}{2} +\\frac{1}{72}", True),
    ("10\\text{ units}", "10 ", True),
    ("10\\text{ units}", "100 ", False),
    ("10", "\\$10", True),
    ("\\left(x-2\\right)\\left(x+2\\right)", "(x-2)(x+2)", True),
    ("0.1, 4, 2", "4, .1, 2", False),
    ("0.1", ".1", True),
    ("10\\%", "10", True),
    ("10\\sqrt{3} + \\sqrt4", "10\\sqrt3 + \\sqrt{4}", True),
    ("\\frac34i", "\\frac{3}{4}i", True),
    ("\\tfrac83", "\\frac{8}{3}", True),
    ("5x - 7y + 11z + 4 = 0", "x + y - z + 2 = 0", False),
    ("1/2", "\\frac{1}{2}", True),
]


@pytest.mark.parametrize("pred, gold, equal", MATH_EQUIVALENCE_CASES + [(g, p, e) for p, g, e in MATH_EQUIVALENCE_CASES])
def test_math_repository_equivalence_cases_as_bare_answers(pred, gold, equal):
    v = grade(pred, gold, kind="math")
    assert v.correct is equal, v
    assert v.method == "whole", v  # never the last number of a bare answer


@pytest.mark.parametrize("text, answer", [
    ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("$\\frac{1}{2}$", "\\frac{1}{2}"),
    ("\\(3\\sqrt{13}\\)", "3\\sqrt{13}"),
    ("(x-2)(x+2).", "(x-2)(x+2)"),
    ("10, 4, -2", "10, 4, -2"),
    ("x = 5", "x = 5"),
    ("1/2", "1/2"),
    ("12 apples", "12 apples"),
    ("Evelyn", "Evelyn"),
    ("\\text{The midpoints form a regular hexagon}", "\\text{The midpoints form a regular hexagon}"),
])
def test_a_bare_answer_is_the_whole_prediction(text, answer):
    assert extract_answer(text) == Extraction(answer, "whole")


@pytest.mark.parametrize("text", [
    "so 5 + 13 = 18",  # prose
    "3 + 4 = 7",  # an arithmetic chain: its result is the answer, not the chain
    "It costs $1,234.50 in total",
    "We get 3 apples, then 4.5 more, total -2.25",
    "x = 1\ny = 2",  # more than one line
])
def test_prose_and_computations_are_not_bare_answers(text):
    assert extract_answer(text).method == "last_number"


@pytest.mark.parametrize("completion, gold, kind, correct, method", [
    # bare answers that the last-number fallback misread
    ("\\frac{1}{2}", "1/2", "math", True, "whole"),
    ("\\tfrac83", "\\frac{8}{3}", "math", True, "whole"),
    ("1/2", "0.5", "numeric", True, "whole"),
    ("\\frac{1}{2}", "0.5", "numeric", True, "whole"),
    ("3\\sqrt{13}", "\\sqrt{117}", "math", True, "whole"),
    ("\\pi/2", "\\frac{\\pi}{2}", "math", True, "whole"),
    ("1 000", "1000", "math", True, "whole"),
    # no marker, but math-verify reads the answer in the text
    ("Therefore $x \\geq 5$ is the solution.", "$x >= 5$", "math", True, "math_verify"),
    ("The identity matrix is $ \\begin{pmatrix}1 & 0 \\\\ 0 & 1\\end{pmatrix} $.",
     "\\begin{pmatrix}1 & 0 \\\\ 0 & 1\\end{pmatrix}", "math", True, "math_verify"),
    # hedges: several answers against a single-valued gold are wrong even when one of them matches
    ("5, 6, 7", "7", "math", False, "whole"),
    ("\\boxed{5, 6, 7}", "7", "math", False, "boxed"),
    ("\\boxed{5} \\boxed{6} \\boxed{7}", "7", "math", False, "math_verify"),
    ("\\boxed{7}\\boxed{8}", "8", "math", False, "math_verify"),
    ("\\boxed{7} or \\boxed{8}", "7", "math", False, "math_verify"),
    # ... while a list against a list, and a repeated answer, are fine
    ("\\boxed{1, 2, 3}", "\\{3, 2, 1\\}", "math", True, "boxed"),
    ("\\boxed{(1, 2)}, \\boxed{(2, 1)}", "(2, 1), (1, 2)", "math", True, "math_verify"),
    ("\\boxed{7} and so \\boxed{7}", "7", "math", True, "boxed"),
    ("14,916", "14916", "math", True, "whole"),  # thousands, not a list
])
def test_extraction_holes(completion, gold, kind, correct, method):
    v = grade(completion, gold, kind=kind)
    assert (v.correct, v.method) == (correct, method), v


# ------------------------------------------------------------------------------------- math-verify's cases

# Rows of math_verify_test_cases.jsonl (by source line) where our math_equal differs from the expected value,
# with the reason. With math-verify 0.9.0 there are none: math_equal runs the library itself, with the options
# its test helper used, so the table is empty; a new entry must come with its reason.
KNOWN_DISAGREEMENTS: dict[tuple[str, int], str] = {}


def _math_verify_options(options: dict) -> dict:
    """The library's compare_strings helper: LatexExtractionConfig(boxed_match_priority=0) / ExprExtractionConfig
    for match_types, precision -> float_rounding, strict, allow_set_relation_comp; {} = verify(parse, parse)."""
    if not options:
        return {}
    return {"match_types": options["match_types"], "boxed_match_priority": 0,
            "float_rounding": options["precision"], "strict": options["strict"],
            "allow_set_relation_comp": options["allow_set_relation_comp"]}


@pytest.mark.data
def test_agreement_with_math_verify_cases():
    rows = [json.loads(line) for line in _data("math_verify/math_verify_test_cases.jsonl").read_text().splitlines()]
    assert len(rows) == 270
    with ThreadPoolExecutor(2) as pool:  # two worker processes, one per core
        got = list(pool.map(lambda r: math_equal(r["pred"], r["gold"], timeout_s=10,
                                                 **_math_verify_options(r["options"])), rows))
    disagreements = {(row["source_file"], row["line"]): f"got {g}, expected {row['expected_equal']}"
                     for row, g in zip(rows, got) if g is not row["expected_equal"]}
    agreement = 1 - len(disagreements) / len(rows)
    assert agreement >= 0.97, disagreements
    assert set(disagreements) == set(KNOWN_DISAGREEMENTS), disagreements


# What grade() (our extraction, then math-verify) gets wrong on the same cases with its default options: each
# case's expected value depends on an option the library's own test set (precision 2 or 4, strict=False,
# match_types=["latex"] only, allow_set_relation_comp=True, the expression reader's decimal comma).
GRADE_DEFAULT_DISAGREEMENTS = {("tests/test_all.py", line) for line in (87, 132, 133, 553, 586, 605, 901)} | {
    ("tests/test_strict.py", 8)}


@pytest.mark.data
def test_grade_agrees_with_math_verify_cases_on_whole_predictions():
    # The cases as `stepray verify --kind math` rows: pred is the whole prediction, gold the answer.
    rows = [json.loads(line) for line in _data("math_verify/math_verify_test_cases.jsonl").read_text().splitlines()]
    with ThreadPoolExecutor(2) as pool:
        with_options = list(pool.map(lambda r: grade(r["pred"], r["gold"], kind="math", timeout_s=10,
                                                     **_math_verify_options(r["options"])).correct, rows))
        defaults = list(pool.map(lambda r: grade(r["pred"], r["gold"], kind="math", timeout_s=10).correct, rows))
    missed = [(r["source_file"], r["line"]) for r, g in zip(rows, with_options) if g is not r["expected_equal"]]
    assert missed == []  # with each case's own options: every case
    missed = {(r["source_file"], r["line"]) for r, g in zip(rows, defaults) if g is not r["expected_equal"]}
    assert 1 - len(missed) / len(rows) >= 0.97, missed
    assert missed <= GRADE_DEFAULT_DISAGREEMENTS, missed - GRADE_DEFAULT_DISAGREEMENTS


# ------------------------------------------------------------------------------------------------ time limit

ADVERSARIAL = "\\boxed{9^{9^{9^{9}}}}"  # sympy tries to evaluate a number with ~10^369693099 digits


def test_math_timeout_is_a_verdict_not_a_hang():
    start = time.monotonic()
    assert math_equal(ADVERSARIAL, "\\boxed{1}", timeout_s=1.0) is None
    assert time.monotonic() - start < 1.0 + HARD_KILL_GRACE_S + 1.0
    v = grade(ADVERSARIAL, "1", kind="math", timeout_s=1.0)
    assert (v.correct, v.reason) == (False, "timeout")
    assert math_equal("$\\frac{1}{2}$", "0.5") is True  # the worker is still usable


def test_stuck_worker_is_killed_and_replaced():
    # A worker that cannot run its own alarm (stopped here; in practice stuck in C code) is killed by the parent.
    assert math_equal("$1$", "1") is True
    worker = verify._worker()
    stuck_pid = worker._proc.pid
    os.kill(stuck_pid, signal.SIGSTOP)
    start = time.monotonic()
    assert math_equal("$2$", "2", timeout_s=0.5) is None
    assert time.monotonic() - start < 0.5 + HARD_KILL_GRACE_S + 1.0
    assert worker._proc.pid != stuck_pid
    assert math_equal("$\\frac{1}{2}$", "0.5") is True


def test_math_equal_works_outside_the_main_thread():
    results = []
    threads = [threading.Thread(target=lambda: results.append(grade("\\boxed{x^2+2x+1}", "(x+1)^2", "math")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [v.reason for v in results] == ["correct", "correct"]


def test_math_equal_rejects_unknown_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['precision'\]"):
        math_equal("1", "1", precision=3)


# --------------------------------------------------------------------------------------------- step checks

@pytest.mark.parametrize(
    "step, quantities, correct",
    [
        ("Tom has 3 + 4 = 7 apples.", [3, 4], True),
        ("3 + 4 + 5 = 12", [3, 4, 5], True),  # a chain of operations is one claim
        ("3 + 4 + 5 = 13", [3, 4, 5], False),
        ("12 * 3 = 36 apples", [12, 3], True),
        ("12 x 3 = 36", [12, 3], True),
        ("12 × 3 = 36", [12, 3], True),
        ("12 ÷ 3 = 4", [12, 3], True),
        ("5 times 3 is 15", [5, 3], True),
        ("5 times 3 is 16", [5, 3], False),
        ("20 divided by 4 equals 5", [20, 4], True),
        ("7 multiplied by 6 makes 42", [7, 6], True),
        ("10 minus 3 gives 7", [10, 3], True),
        ("10 plus 3 is equal to 13", [10, 3], True),
        ("three times 4 is 12", [3, 4], True),
        ("He pays $1,200 for 4 chairs, so each costs 1,200 / 4 = $300.", [1200, 4], True),
        ("He pays $1,200 for 4 chairs, so each costs 1,200 / 4 = $301.", [1200, 4], False),
        ("1,000 * 3 = 3,000", [1000, 3], True),
        ("5 apples + 3 apples = 8 apples", [5, 3], True),  # unit words inside a claim
        ("It takes 2 hours * 60 minutes per hour = 120 minutes", [2, 60], True),
        ("2 * (3 + 4) = 2 * 7 = 14", [2, 3, 4], True),  # 7 is a sub-result of the same chain
        ("2 * (3 + 4) = 2 * 8 = 16", [2, 3, 4], False),
        ("10 / 3 = 3.33", [10, 3], True),  # a stated decimal may be rounded ...
        ("10 / 3 = 3.3", [10, 3], True),
        ("10 / 3 = 3.34", [10, 3], False),  # ... correctly
        ("10 / 3 = 3", [10, 3], False),  # an integer result must be exact
        ("2.5 * 4 = 10.0", [2.5, 4], True),
        ("0.1 + 0.2 = 0.3", [0.1, 0.2], True),  # float quantities vs decimal literals
        ("20% * 50 = 10", [20, 50], True),
        ("3 - 5 = -2", [3, 5], True),
        ("-3 + 5 = 2", [3, 5], True),
        ("5 / 0 = 0", [5, 0], False),
        ("3 * 4 = <<3*4=12>>12 eggs", [3, 4], True),  # GSM8K calculator annotations are ignored
        ("3 + 9 = 12", [3, 4], False),  # 9 is neither a quantity nor an earlier result
        ("So 3 * 4 = 12 and 12 + 2 = 14", [3, 4, 2], True),  # 12 established earlier in the step
        ("So 3 * 4 = 12 and 12 + 5 = 17", [3, 4], False),
        ("He is 5 years old and has 3 cats.", [], True),  # no claim
        ("Let's add the apples.", [3, 4], True),
    ],
)
def test_check_single_step(step, quantities, correct):
    assert check_steps([step], quantities) == [correct]


@pytest.mark.parametrize(
    "steps, quantities, final_answer, labels, first",
    [
        (["Tom has 3 + 4 = 7 apples.", "He buys 2 bags of 7: 2 * 7 = 14.", "The answer is 14."],
         [3, 4, 2], 14, [True, True, True], -1),
        (["3 + 4 = 7", "2 * 7 = 15", "The answer is 15."], [3, 4, 2], 14, [True, False, False], 1),
        (["3 + 5 = 8", "2 * 8 = 16"], [3, 4, 2], None, [False, True], 0),  # later labels are local
        (["3 * 4 = 12", "12 + 2 = 14"], [3, 4, 2], None, [True, True], -1),  # results carry across steps
        (["3 + 4 = 7", "The answer is 8."], [3, 4], 7, [True, False], 1),  # wrong stated answer
        (["3 + 4 = 7", "#### 7"], [3, 4], 7.0, [True, True], -1),
        (["Let's think.", "The answer is 7."], [3, 4], None, [True, True], -1),  # no final_answer: not judged
        (["The answer is fourteen."], [], 14, [True], -1),  # a non-number answer is not judged
        ([], [1], None, [], -1),
    ],
)
def test_check_steps_and_first_error(steps, quantities, final_answer, labels, first):
    assert check_steps(steps, quantities, final_answer) == labels
    assert first_error(steps, quantities, final_answer) == first


def test_constants_extend_the_known_numbers():
    steps = ["2 hours is 2 * 60 = 120 minutes"]
    assert check_steps(steps, [2]) == [False]
    assert check_steps(steps, [2], constants=[60]) == [True]


def test_question_numbers_read_stated_and_implied_numbers():
    from pipelines.verify import question_numbers

    q = "Ann has 3 apples and 1,200 seeds, buys four more at 50% off, then doubles them. A dozen weekly?"
    assert question_numbers(q) == [3.0, 1200.0, 4.0, 50.0, 0.5, 2.0, 12.0, 100.0, 7.0]
    assert question_numbers("How many are left?") == []
    assert question_numbers("She eats 3/4 of the 20 pies and half of the rest.") == [3.0, 0.75, 4.0, 20.0, 2.0, 0.5,
                                                                                    1.0]  # 3/4 as 0.75; half: 1/2


def test_coverage_is_the_share_of_digit_numbers_the_solution_computes_with():
    from pipelines.verify import coverage

    q = "Luis has 23 toy cars. He gets 5 times as many. He keeps one of 2 equal parts. How many?"
    assert coverage(["23 * 5 = 115", "115 / 2 = 57.5", "The answer is 57.5."], q) == 1.0  # "one" is not counted
    assert coverage(["23 * 5 = 115", "The answer is 115."], q) == pytest.approx(2 / 3)  # skipped the last step
    assert coverage(["The answer is 23."], q) == 0.0  # a stated number is not a computation's operand
    assert coverage(["I guess."], "How many are left?") == 1.0  # the question writes no number
    q = "A coat costs 40 dollars at 25% off. What is the discount?"
    assert coverage(["40 * 0.25 = 10"], q) == coverage(["40 * 25 / 100 = 10"], q) == 1.0  # 25% read either way


def test_check_steps_without_gold_asks_for_a_computed_answer():
    """answer_computed (a verifier at test time, no gold): the stated answer must be a value the solution
    computed or the problem gave; with a gold answer given, that comparison decides as before."""
    q = [23, 5]
    assert check_steps(["23 * 5 = 115", "The answer is 115."], q, answer_computed=True) == [True, True]
    assert check_steps(["23 * 5 = 115", "The answer is 116."], q, answer_computed=True) == [True, False]
    assert check_steps(["He counts them.", "The answer is 30."], q, answer_computed=True) == [True, False]
    assert check_steps(["The answer is 23."], q, answer_computed=True) == [True]  # a given number
    assert check_steps(["23 * 5 = 115", "The answer is 116."], q) == [True, True]  # no gold, no requirement
    assert check_steps(["23 * 5 = 115", "The answer is 115."], q, 116, answer_computed=True) == [True, False]
    assert check_steps(["3 / 4 = 0.75", "The answer is 75%."], [3, 4], answer_computed=True) == [True, True]
    assert check_steps(["The answer is 23 * 5 = 116 cars."], q, answer_computed=True) == [False]  # not one number
    assert check_steps(["The answer is \\sqrt{2}."], q, answer_computed=True) == [True]  # LaTeX: left to the claims
    # a number past 10^1000 is not a value computed here (compared as a Fraction it took 28 s to build)
    assert check_steps(["The answer is 1e10000000."], q, answer_computed=True) == [False]


def test_check_steps_rejects_a_single_string():
    with pytest.raises(TypeError, match="got one str"):
        check_steps("3 + 4 = 7", [3, 4])


@pytest.mark.parametrize(
    "step, claims",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.", [("48 / 2 = 24", True)]),
        ("So 2 * (3 + 4) = 2 * 7 = 15", [("2 * ( 3 + 4 ) = 2 * 7 = 15", False)]),
        ("1 glass is 60/100 * 5 = $3.", [("60 / 100 * 5 = 3", True)]),  # "1 glass" is a subject
        ("He goes 3 times because 42 / 14 = 3", [("42 / 14 = 3", True)]),  # "3 times" is prose here
        ("the 40-yard line, so 40 x 2 = 80", [("40 * 2 = 80", True)]),  # "40-yard" is a word
        ("Solve 3x + 4 = 28.", []),  # algebra is not arithmetic
        ("Randy has 20 - 12 = 8 years until he is 20.", [("20 - 12 = 8", True)]),
    ],
)
def test_find_claims(step, claims):
    assert verify.find_claims(step) == claims


@pytest.mark.data
def test_gsm8k_reference_arithmetic_holds_and_perturbations_are_caught():
    # GSM8K's 1319 reference solutions: their arithmetic is (nearly) all right, so few claims may read as false
    # (measured: 7 of 3976, mostly real slips such as "$32 - $20 = $300" in train and unit changes); and
    # changing the number after a calculator annotation (<<a=b>>b -> b+1) must make a claim false.
    rows = [json.loads(line) for line in _data("gsm8k/test.jsonl").read_text().splitlines()]
    claims = false = perturbed = caught = 0
    for row in rows:
        for step in row["answer"].split("\n")[:-1]:
            found = verify.find_claims(step)
            claims += len(found)
            false += sum(not holds for _, holds in found)
            m = re.search(r">>(\d+)(?![\d.,])", step)
            if m and any(holds for _, holds in found):
                bad = step[: m.start(1)] + str(int(m.group(1)) + 1) + step[m.end(1):]
                perturbed += 1
                caught += any(not holds for _, holds in verify.find_claims(bad))
    assert claims > 3500
    assert false / claims <= 0.005, (false, claims)
    assert caught / perturbed >= 0.99, (caught, perturbed)


def test_synthetic_reference_steps_are_correct_and_wrong_results_are_located():
    # The ground-truth use: pipelines.problems' synthetic solutions ("8 - 6 = 2", ...) check as all correct, and
    # a result changed by +-1 or +-2 in step k is found as the first error at k.
    import random

    from pipelines.problems import SyntheticConfig, synthetic_problems

    rng = random.Random(0)
    for p in synthetic_problems(SyntheticConfig(n=300, min_steps=1, max_steps=5)):
        assert first_error(p["ref_steps"], p["quantities"], p["answer"]) == -1, p["ref_steps"]
        k = rng.randrange(len(p["ref_steps"]))
        steps = list(p["ref_steps"])
        claim, result = steps[k].split(" = ")
        steps[k] = f"{claim} = {int(result) + rng.choice([-2, -1, 1, 2])}"
        assert first_error(steps, p["quantities"]) == k, steps


# ------------------------------------------------------------------------------------------------- batches

def _batch() -> dict:
    return {
        "id": np.array(["a", "b", "c", "d", "e", "f", "g"], dtype=object),
        "completion": np.array(["#### 18", "\\boxed{\\frac{1}{2}}", "The answer is 3.", "no idea",
                                "```python\ndef f(x):\n    return x + 1\n```", "x", None], dtype=object),
        "gold": np.array(["18", "0.5", "4", "1", "", "1", "1"], dtype=object),
        "kind": np.array(["numeric", "math", "numeric", "numeric", "code", "poetry", "numeric"], dtype=object),
        "tests": np.array([None, None, None, None, "assert f(1) == 2", None, None], dtype=object),
    }


def test_verify_batch_grades_every_row_and_keeps_columns():
    out = verify_batch(_batch())
    assert list(out["id"]) == ["a", "b", "c", "d", "e", "f", "g"]
    assert list(out["completion"]) == list(_batch()["completion"])
    assert list(out["reason"]) == ["correct", "correct", "wrong", "no_answer", "passed", "error", "error"]
    assert list(out["correct"]) == [True, True, False, False, True, False, False]
    assert list(out["answer"]) == ["18", "\\frac{1}{2}", "3", None, None, None, None]
    assert list(out["answer_method"]) == ["gsm8k", "boxed", "answer_is", "none", "fenced", "", ""]
    assert "poetry" in out["detail"][5]
    assert out["correct"].dtype == bool


def test_verify_batch_on_ray_data(ray_session):
    # The real plumbing: the session's local Ray (tests/conftest.py), Ray Data numpy batches, per-row verdicts.
    rows = [{"id": i, "completion": f"The answer is {i}.", "gold": "3", "kind": "numeric"} for i in range(6)]
    ds = ray_session.data.from_items(rows).map_batches(verify_batch, batch_format="numpy", batch_size=4)
    out = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["correct"] for r in out] == [False, False, False, True, False, False]
    assert {r["reason"] for r in out} == {"correct", "wrong"}
    assert [r["answer"] for r in out] == ["0", "1", "2", "3", "4", "5"]


def test_importing_pipelines_stays_light():
    code = ("import sys, pipelines.verify, pipelines.sandbox\n"
            "heavy = [m for m in ('ray', 'vllm', 'torch', 'math_verify', 'sympy', 'numpy') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_verdict_reasons_are_documented():
    doc = verify.__doc__
    for reason in (*verify.MATH_REASONS, *verify.CODE_REASONS):
        assert reason.split(":")[0] in doc, reason
    assert Counter(verify.EXTRACTION_METHODS) == Counter(
        ["boxed", "answer_is", "gsm8k", "answer_line", "whole", "math_verify", "last_number", "none"])
    assert Verdict(True, "correct").detail == ""


def test_verify_samples_cli(tmp_path):
    # The `stepray verify` job end to end (jobs/verify_samples.py), run as its module; lives here with its
    # pipeline until tests/jobs has a home for it.
    rows = [
        '{"id": 1, "pred": "So 9 * 2 = 18.\\n#### 18", "gold": "18"}',
        '{"id": 2, "pred": "The answer is \\\\boxed{\\\\frac{1}{2}}", "gold": "0.5", "kind": "math"}',
        "not json",
        '{"id": 4, "pred": "```python\\ndef f(x):\\n    return x + 1\\n```", "tests": "assert f(1) == 2", '
        '"kind": "code"}',
        '{"id": 5, "program": "import os\\nos._exit(0)", "tests": "assert f(1) == 2", "kind": "code"}',
        '{"id": 6, "pred": "no idea", "gold": 3}',
    ]
    src, out = tmp_path / "samples.jsonl", tmp_path / "graded.jsonl"
    src.write_text("\n".join(rows) + "\n")
    proc = subprocess.run([sys.executable, "-m", "jobs.verify_samples", str(src), "--kind", "numeric",
                           "--out", str(out), "--workers", "2"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert proc.returncode == 0, proc.stderr
    graded = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g.get("id") for g in graded] == [1, 2, None, 4, 5, 6]
    assert [g["reason"] for g in graded] == ["correct", "correct", "unreadable", "passed", "early_exit", "no_answer"]
    assert [g["correct"] for g in graded] == [True, True, False, True, False, False]
    assert graded[2]["line"] == 3 and graded[0]["gold"] == "18" and graded[5]["gold"] == 3
    assert "samples.jsonl:3: unreadable row" in proc.stderr
    assert "6 rows, 3 correct" in proc.stderr
    missing = subprocess.run([sys.executable, "-m", "jobs.verify_samples", str(tmp_path / "nope.jsonl"),
                              "--kind", "math"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert missing.returncode == 2 and "nope.jsonl does not exist" in missing.stderr


@pytest.mark.parametrize("row, reason", [
    ({"kind": "code", "program": 'x = "\ud800"\ndef f(v):\n    return v + 1', "tests": "assert f(1) == 2"},
     "error:UnicodeEncodeError"),  # a lone surrogate: not encodable as UTF-8, so not a program
    ({"kind": "code", "completion": "```python\ndef f(v):\n    return v + 1  # \udcff\n```", "tests": "assert f(1) == 2"},
     "error:UnicodeEncodeError"),
    ({"kind": "code", "program": "def f(v):\n    return v + 1", "tests": "assert f(1) == 2  # \ud800"},
     "error:UnicodeEncodeError"),
    ({"kind": "math", "completion": "\\boxed{\ud800}", "gold": "1"}, "wrong"),
    ({"kind": "numeric", "completion": "The answer is 5. \ud800", "gold": "5"}, "correct"),
])
def test_unencodable_rows_get_a_verdict(row, reason):
    assert verify_row(row).reason == reason

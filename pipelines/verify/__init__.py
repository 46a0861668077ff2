"""Pure graders: the automatic verifier Ver_x(y) -> {0, 1} that rejection sampling, Monte-Carlo step labels and
every evaluation rely on. Answer extraction, numeric and LaTeX (math-verify) equivalence with a hard time limit,
arithmetic step checks for synthetic problems, and `verify_batch` for Ray Data. Code runs in `pipelines.sandbox`.

Modules: `extract` (answer extraction), `numeric` (GSM8K / synthetic numbers), `mathverify` (math-verify in a
killable worker process), `step_check` (arithmetic step checks), `latex` (shared text helpers); this module grades
rows with them (`grade`, `grade_code`, `verify_row`, `verify_batch`, `answers_equivalent`) and re-exports their
public names.

Verdict reasons. Math and numeric (`grade`): correct, wrong, no_answer, timeout (the equivalence check ran past
its time limit), error (bad gold, verifier failure; `detail` says which). Code (`grade_code` /
`pipelines.sandbox.run_code`): passed, failed_test, error:<ExceptionType>, timeout, memory, process_limit,
early_exit, no_tests_ran, killed, sandbox_error (see pipelines/sandbox.py). `Verdict.correct` is True only for
"correct" and "passed".

Bare comma lists of single values ("10, 4, -2") compare item by item in order, as MATH's and PRM800K's graders do
(math-verify alone reads them as sets); solution sets of tuples or equations, and enclosed sets, keep
math-verify's rules. A bare number with thousands spaces or a decimal comma ("1 000", "1,22") goes to math-verify
as written (its own reading of those); other bare answers are boxed. A set of several answers ("5, 6, 7",
several boxes) is wrong against a single-valued gold even when one member matches: hedging is not rewarded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipelines.verify.extract import EXTRACTION_METHODS, Extraction, extract_answer, extract_code
from pipelines.verify.latex import _THOUSANDS_RE, _boxed, _boxed_contents, _strip_outer
from pipelines.verify.mathverify import (HARD_KILL_GRACE_S, MATH_OPTIONS, WORKER_START_TIMEOUT_S, _as_latex,
                                         _math_check, _math_worker_main, _worker, math_equal)
from pipelines.verify.numeric import numeric_equal, parse_number
from pipelines.verify.step_check import (check_steps, computes_answer, coverage, find_claims, first_error,
                                         question_numbers)

__all__ = ["KINDS", "MATH_REASONS", "CODE_REASONS", "EXTRACTION_METHODS", "MATH_OPTIONS", "HARD_KILL_GRACE_S",
           "WORKER_START_TIMEOUT_S", "Extraction", "Verdict", "extract_answer", "extract_code", "parse_number",
           "numeric_equal", "math_equal", "grade", "grade_code", "answers_equivalent", "check_steps", "first_error",
           "question_numbers", "coverage", "find_claims", "computes_answer", "verify_row", "verify_batch",
           "_math_worker_main", "_worker"]

KINDS = ("numeric", "math", "code")
MATH_REASONS = ("correct", "wrong", "no_answer", "timeout", "error")
CODE_REASONS = ("passed", "failed_test", "error:<ExceptionType>", "timeout", "memory", "process_limit",
                "early_exit", "no_tests_ran", "killed", "sandbox_error")


@dataclass(frozen=True)
class Verdict:
    correct: bool  # True only for reason "correct" (math/numeric) or "passed" (code)
    reason: str  # one of MATH_REASONS or CODE_REASONS (error:<Type> carries the exception type)
    answer: str | None = None  # the extracted answer (math/numeric)
    method: str = ""  # the extraction method (math/numeric), "program" or "fenced" (code)
    detail: str = ""  # human-readable context: failing test line, error message, why the gold is unusable


_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+")
_PLAIN_OR_FRACTION_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+(?:\.\d+)?)?")


def _gold_answer(gold: str) -> str:
    return gold.rsplit("####", 1)[1].strip() if "####" in gold else gold.strip()


def grade(completion: str, gold: str, kind: str = "numeric", timeout_s: float = 5.0,
          **math_options: Any) -> Verdict:
    """Extract the completion's answer and compare it with `gold` (an answer, or a GSM8K solution with ####).

    math_options (kind "math" only) go to math-verify as in `math_equal`."""
    if kind not in ("numeric", "math"):
        raise ValueError(f"grade handles kind 'numeric' or 'math', got {kind!r}; code goes through grade_code")
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str, got {type(gold).__name__}: {gold!r:.80}")
    if math_options and kind != "math":
        raise ValueError(f"math_options {sorted(math_options)} apply to kind 'math' only, got {kind!r}")
    ext = extract_answer(completion)
    if ext.answer is None:
        return Verdict(False, "no_answer", None, ext.method, "no answer found in the completion")
    gold_answer = _gold_answer(gold)
    if kind == "numeric":
        if parse_number(gold_answer) is None:
            return Verdict(False, "error", ext.answer, ext.method, f"gold {gold_answer!r:.80} is not one number")
        ok = numeric_equal(ext.answer, gold_answer)
        return Verdict(ok, "correct" if ok else "wrong", ext.answer, ext.method)
    if not gold_answer:
        return Verdict(False, "error", ext.answer, ext.method, "gold is empty")
    # Several different boxed answers go to math-verify, which reads them as a set (a hedge, see below).
    several = ext.method == "boxed" and len(_boxed_contents(completion)) > 1
    if ext.answer.strip() == gold_answer and not several:
        return Verdict(True, "correct", ext.answer, ext.method, "identical text")
    if (not math_options and ext.method != "last_number" and not several
            and _PLAIN_NUMBER_RE.fullmatch(ext.answer.strip()) and _PLAIN_NUMBER_RE.fullmatch(gold_answer)):
        ok = numeric_equal(ext.answer, gold_answer)  # no sympy needed for two plain numbers
        return Verdict(ok, "correct" if ok else "wrong", ext.answer, ext.method)
    answer, method = ext.answer, ext.method
    box = "latex" in (math_options.get("match_types") or ("latex",))
    as_gold = _as_latex(gold_answer) if box and not _DIGITS_ONLY_RE.fullmatch(gold_answer) else gold_answer
    try:
        if method != "whole":
            # Not a bare answer: math-verify's own LaTeX / expression extraction reads the whole completion
            # ("Therefore $x \\geq 5$ is the solution.", several boxed answers). Ours is the answer only when
            # math-verify finds nothing there and ours came from a marker: a last number it did not read is none.
            checked = _math_check(completion, as_gold, timeout_s, **math_options)
            read = checked.get("extracted")
            if read and (method == "last_number" or "".join(read.split()) != "".join(answer.split())):
                answer, method = read, "math_verify"  # it read something else than our extraction did
            elif not read and method == "last_number" and checked["result"] is not None:
                return Verdict(False, "no_answer", None, method,
                               f"math-verify reads no answer; the last number {answer!r:.40} is not taken as one")
            elif not read:
                checked = _math_check(_as_latex(answer), as_gold, timeout_s, **math_options)
        else:  # a bare answer: as written when it came in math delimiters, else boxed (see _as_latex)
            delimited = _strip_outer(completion) != completion.strip().rstrip(".").strip()
            pred = completion if delimited or not box or _DIGITS_ONLY_RE.fullmatch(answer) else _as_latex(answer)
            checked = _math_check(pred, as_gold, timeout_s, **math_options)
        result = checked["result"]
        if result and checked.get("pred_set") and checked.get("gold_single"):
            # math-verify counts a set of answers ("5, 6, 7", several boxes) as right when one member matches a
            # single-valued gold; a generator learns to hedge that way, so a set is right only against a set.
            return Verdict(False, "wrong", answer, method, "several different answers to a single-valued gold")
        if result and not _same_order(answer, gold_answer, timeout_s):
            return Verdict(False, "wrong", answer, method, "the same items in another order")
    except RuntimeError as e:
        return Verdict(False, "error", answer, method, str(e))
    if result is None:
        return Verdict(False, "timeout", answer, method, f"math-verify over {timeout_s:g}s")
    return Verdict(result, "correct" if result else "wrong", answer, method)


# One number written with thousands spaces or a decimal comma ("1 000", "1,22", "1000,99"): math-verify's own
# number reading applies to it as written; anything else is boxed (see _as_latex), lists ("10, 4, -2") included.
_DIGITS_ONLY_RE = re.compile(r"[-+]?(?:\d{1,3}(?: \d{3})+|\d+)(?:[.,]\d+)?")
_OPENERS, _CLOSERS = "([{", ")]}"
_LIST_JOINER_RE = re.compile(r"^(?:\\text\s*\{\s*and\s*\}|and\b)\s*")


def _list_items(answer: str) -> list[str] | None:
    """The items of a bare comma-separated list ("10, 4, -2"), or None for anything else: a single item, or a
    list enclosed in brackets or braces (a tuple, interval or set, which math-verify compares by its own rules).
    "and" before the last item is dropped ("19, 46, and 82")."""
    s = _strip_outer(answer)
    boxed = _boxed(s)
    if boxed is not None and boxed[0] == 0 and s.endswith("}"):
        s = boxed[1].strip()
    s = s.replace("\\left", "").replace("\\right", "").replace("\\{", "{").replace("\\}", "}")
    s = _THOUSANDS_RE.sub("", s.replace(",\\!", ",").replace("{,}", ""))  # "14,916" is one number, not two
    items, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in _OPENERS:
            depth += 1
        elif c in _CLOSERS:
            depth -= 1
        elif c == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    items.append(s[start:])
    items = [_LIST_JOINER_RE.sub("", item.strip()) for item in items]
    if len(items) < 2 or not all(items):
        return None
    return items


def _is_scalar(item: str) -> bool:
    """A list item that is one value: no tuple, interval or set inside it and no equation ("a_3 = 2")."""
    return not any(c in item for c in "()[]{}=;") or bool(re.fullmatch(r"[^=;]*\\[a-z]+\{[^=;]*", item))


def _same_order(pred: str, gold: str, timeout_s: float) -> bool:
    """False when both answers are bare lists of as many single values and one differs from the one at its place.

    math-verify reads "10, 4, -2" as a set, so "4, 10, -2" matches it; MATH's own grader (and PRM800K's)
    compares such answers item by item in order, and so do we. Lists of different lengths, enclosed tuples and
    sets, and lists of tuples or equations (solution sets: "(1, 2), (2, 1)", "a = 1, b = 2") are left to
    math-verify."""
    a, b = _list_items(pred), _list_items(gold)
    if a is None or b is None or len(a) != len(b) or not all(_is_scalar(x) for x in (*a, *b)):
        return True
    for x, y in zip(a, b):
        if x == y:
            continue
        if _PLAIN_OR_FRACTION_RE.fullmatch(x) and _PLAIN_OR_FRACTION_RE.fullmatch(y):
            if not numeric_equal(x, y):
                return False
        elif _math_check(_as_latex(x), _as_latex(y), timeout_s=timeout_s)["result"] is not True:
            return False
    return True


def grade_code(completion: str, tests: str, entry_point: str | None = None, timeout_s: float = 10.0,
               memory_mb: int = 512) -> Verdict:
    """Run the completion's program (its last ```python block, or all of it) against `tests` in the sandbox."""
    from pipelines.sandbox import run_code  # lazy: sandbox imports Verdict from here

    program, method = extract_code(completion)
    v = run_code(program, tests, entry_point=entry_point, timeout_s=timeout_s, memory_mb=memory_mb)
    return Verdict(v.correct, v.reason, None, method, v.detail)


def answers_equivalent(a: str, b: str, kind: str) -> bool:
    """Whether two extracted answers are the same answer (majority-vote grouping): 1/2 = 0.5 = \\frac{1}{2}."""
    if kind == "numeric":
        return numeric_equal(a, b)
    if kind != "math":
        raise ValueError(f"answers_equivalent handles kind 'numeric' or 'math', got {kind!r}")
    if a.strip() == b.strip():
        return True
    if _PLAIN_OR_FRACTION_RE.fullmatch(a.strip()) and _PLAIN_OR_FRACTION_RE.fullmatch(b.strip()):
        return numeric_equal(a, b)  # "1/2" vs "0.5": no sympy needed
    try:
        return math_equal(_as_latex(a), _as_latex(b)) is True and _same_order(a, b, 5.0)
    except RuntimeError:
        return False


def _cell(value: Any) -> Any:
    """A numpy scalar / bytes cell as a plain Python value; NaN and empty strings read as missing."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, float) and value != value:
        return None
    return value


def verify_row(row: Mapping[str, Any], *, math_timeout_s: float = 5.0, code_timeout_s: float = 10.0) -> Verdict:
    """Grade one row (columns as in verify_batch); never raises: a bad row gets reason "error" with detail."""
    try:
        kind = _cell(row.get("kind"))
        if kind not in KINDS:
            return Verdict(False, "error", detail=f"kind {kind!r} is not one of {KINDS}")
        if kind == "code":
            tests = _cell(row.get("tests"))
            if not isinstance(tests, str):
                return Verdict(False, "error", detail="a code row needs a `tests` string")
            program = _cell(row.get("program"))
            entry_point = _cell(row.get("entry_point")) or None
            source = program if isinstance(program, str) and program.strip() else _cell(row.get("completion"))
            if not isinstance(source, str):
                return Verdict(False, "error", detail="a code row needs a `program` or `completion` string")
            if isinstance(program, str) and program.strip():
                from pipelines.sandbox import run_code

                v = run_code(program, tests, entry_point=entry_point, timeout_s=code_timeout_s)
                return Verdict(v.correct, v.reason, None, "program", v.detail)
            return grade_code(source, tests, entry_point=entry_point, timeout_s=code_timeout_s)
        completion, gold = _cell(row.get("completion")), _cell(row.get("gold"))
        if not isinstance(completion, str) or gold is None:
            return Verdict(False, "error", detail="a math/numeric row needs `completion` (str) and `gold`")
        return grade(completion, str(gold), kind=kind, timeout_s=math_timeout_s)
    except Exception as e:  # noqa: BLE001 - one bad row never fails the batch
        return Verdict(False, "error", detail=f"{type(e).__name__}: {e}"[:500])


def verify_batch(batch: Mapping[str, Any], *, math_timeout_s: float = 5.0, code_timeout_s: float = 10.0) -> dict:
    """Ray Data `map_batches(verify_batch, batch_format="numpy")`: grade every row of a column batch.

    Input columns: completion (str), gold (str), kind (numeric | math | code); for code, tests (str) and
    optionally program (the full program; else the completion's code is used) and entry_point.
    Output: the input columns plus answer (str | None), answer_method, correct (bool), reason and detail (str).
    Rows run one after another with per-row time limits; Ray supplies parallelism across batches.
    """
    import numpy as np

    columns = {k: v for k, v in batch.items()}
    n = len(next(iter(columns.values()))) if columns else 0
    verdicts = [verify_row({k: columns[k][i] for k in columns}, math_timeout_s=math_timeout_s,
                           code_timeout_s=code_timeout_s) for i in range(n)]
    out = dict(columns)
    out["answer"] = np.array([v.answer for v in verdicts], dtype=object)
    out["answer_method"] = np.array([v.method for v in verdicts], dtype=object)
    out["correct"] = np.array([v.correct for v in verdicts], dtype=bool)
    out["reason"] = np.array([v.reason for v in verdicts], dtype=object)
    out["detail"] = np.array([v.detail for v in verdicts], dtype=object)
    return out

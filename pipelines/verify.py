"""Pure graders: the automatic verifier Ver_x(y) -> {0, 1} that rejection sampling, Monte-Carlo step labels and
every evaluation rely on. Answer extraction, numeric and LaTeX (math-verify) equivalence with a hard time limit,
arithmetic step checks for synthetic problems, and `verify_batch` for Ray Data. Code runs in `pipelines.sandbox`.

Extraction (`extract_answer`) tries, in order, and reports which one it used (`Extraction.method`):
  boxed        the last balanced \\boxed{...} / \\fbox{...} (nested braces)
  gsm8k        the last "#### N"
  answer_is / answer_line
               "The (final) answer is ..." or a line "(Final) Answer: ...", whichever comes last in the text;
               the answer ends at its $...$ / \\(...\\) delimiters, the end of the sentence or the end of the line
  whole        the whole prediction is the answer: one line, optionally in one pair of math delimiters, that is
               one number (up to two unit words), one word, or has no English word outside LaTeX commands and
               \\text{} groups (`\\frac{1}{2}`, `(x-2)(x+2)`, `10, 4, -2`); an arithmetic chain "3 + 4 = 7" is not
  last_number  fallback: the last number in the text (reported as such, so callers can discount it)
  none         nothing found: a verdict of its own ("no_answer"), not an exception
Kind "math" grading (`grade`) hands every completion that is not a bare answer to math-verify's own LaTeX and
expression extraction first (method "math_verify" when it read something else than the markers above: several
boxed answers, "$x \\geq 5$ is the solution"); a last number that math-verify does not read is no answer.

Verdict reasons. Math and numeric (`grade`): correct, wrong, no_answer, timeout (the equivalence check ran past
its time limit), error (bad gold, verifier failure; `detail` says which). Code (`grade_code` /
`pipelines.sandbox.run_code`): passed, failed_test, error:<ExceptionType>, timeout, memory, process_limit,
early_exit, no_tests_ran, killed, sandbox_error (see pipelines/sandbox.py). `Verdict.correct` is True only for
"correct" and "passed".

Numeric equivalence (`numeric_equal`, GSM8K and synthetic answers): one number per answer after dropping $,
thousands commas (1,080), LaTeX wrappers (\\text{}, \\$, {,}), unit words (12 apples) and a % sign (50% reads as
50, GSM8K's convention); simple fractions a/b and \\frac{a}{b} are numbers. Two numbers are equal exactly when
either is an integer (1,000,000 vs 1,000,001 differ; 18 == 18.0), otherwise within rel_tol (0.333333 == 1/3).
A string with zero or several numbers is compared as normalised text.

Bare comma lists of single values ("10, 4, -2") compare item by item in order, as MATH's and PRM800K's graders do
(math-verify alone reads them as sets); solution sets of tuples or equations, and enclosed sets, keep
math-verify's rules. A bare number with thousands spaces or a decimal comma ("1 000", "1,22") goes to math-verify
as written (its own reading of those); other bare answers are boxed. A set of several answers ("5, 6, 7",
several boxes) is wrong against a single-valued gold even when one member matches: hedging is not rewarded.

Math equivalence (`math_equal`) is math-verify (fractions, radicals, intervals, sets, matrices, units, \\text
wrappers, percent, numeric rounding), run in a persistent worker process (`_MathWorker`) under a hard time limit:
a SIGALRM inside the worker interrupts slow Python code and the worker answers "timeout"; C code that ignores
signals (a huge integer power inside sympy) is killed by the parent after a grace period and the worker restarted.
Why a process and not math-verify's own timeout: its signal.alarm works only in the main thread (Ray runs tasks
in worker threads too) and cannot interrupt C code, so it is neither safe nor hard. The cost is one pipe round
trip per check (~0.1 ms) next to the check itself (~1-10 ms), and one worker (~150 MB, sympy) per calling thread.

Step checks (`check_steps`, `first_error`; `find_claims` shows what was read), the ground truth for synthetic
problems:
  - a claim is a chain `e0 = e1 = ... = ek` of arithmetic expressions in a step, at least one a computation;
    operators + - * / x × · ÷ and the words plus, minus, times, multiplied by, divided by; "=" and the words
    is, is equal to, equals, gives, makes; numbers may carry thousands commas, decimals, $ and %; number words
    up to twenty and ½-style fractions count; up to three words after a number, or after a symbol operator, are
    skipped ("12 apples * 3 = 36 apples", "25 classmates + his 1 teacher"); GSM8K's <<...>> annotations are
    ignored; "3 + 4 + 5 = 12" is one claim;
  - not claims: a number followed by words or "is" is a subject ("1 glass is 60/100 * 5 = 3" claims only
    60/100 * 5 = 3); a word operator not followed by a number is prose ("3 times because 42 / 14 = 3");
    "40-yard" is a word; terms glued to letters ("3x + 4 = 28", "(1/2)x") are algebra and are not checked;
  - a claim holds when all its expressions have the same value (exact, with fractions); a stated result with d
    decimals may be rounded (|exact - stated| <= 0.5 * 10^-d); with a % sign, 50% may read as 50 or 0.5;
  - every number inside a computation (an operand) must be a problem quantity, a `constants` value, or a result
    established earlier: a value of any expression in an earlier claim (earlier step or earlier in this step,
    right or wrong), including its sub-expressions ("2 * (3 + 4) = 2 * 7 = 14" is fine); sign-insensitive;
  - a step is correct when all its claims hold and use only known operands, and any final answer it states
    ("The answer is N", "#### N", \\boxed{N}, "Answer: N") equals final_answer (when given and N is a number);
    a step with no claim and no stated answer is correct;
  - after the first wrong step, later labels are local (a step that correctly continues from a wrong number is
    marked correct); `first_error` is the well-defined quantity.
  Measured on GSM8K's 1319 reference test solutions: 7 of 3976 claims read as false (slips and unit changes in
  the references), and changing the result after a calculator annotation is caught in 3156 of 3156 steps.
"""

from __future__ import annotations

import ast
import atexit
import json
import operator
import os
import re
import selectors
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, InvalidOperation, localcontext
from fractions import Fraction
from pathlib import Path
from typing import Any

KINDS = ("numeric", "math", "code")
MATH_REASONS = ("correct", "wrong", "no_answer", "timeout", "error")
CODE_REASONS = ("passed", "failed_test", "error:<ExceptionType>", "timeout", "memory", "process_limit",
                "early_exit", "no_tests_ran", "killed", "sandbox_error")
EXTRACTION_METHODS = ("boxed", "answer_is", "gsm8k", "answer_line", "whole", "math_verify", "last_number",
                      "none")


@dataclass(frozen=True)
class Extraction:
    answer: str | None  # the answer text, trimmed of delimiters and sentence punctuation; None when none found
    method: str  # how it was found: one of EXTRACTION_METHODS


@dataclass(frozen=True)
class Verdict:
    correct: bool  # True only for reason "correct" (math/numeric) or "passed" (code)
    reason: str  # one of MATH_REASONS or CODE_REASONS (error:<Type> carries the exception type)
    answer: str | None = None  # the extracted answer (math/numeric)
    method: str = ""  # the extraction method (math/numeric), "program" or "fenced" (code)
    detail: str = ""  # human-readable context: failing test line, error message, why the gold is unusable


# ---------------------------------------------------------------------------------------------- extraction

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE_RE = re.compile(r"\\boxed +([^\s${}]+)")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"(?i)\b(?:final\s+)?answer\s+(?:is|was|would\s+be|will\s+be)\b\s*:?")
_ANSWER_LINE_RE = re.compile(r"(?im)^[ \t>#*_-]*(?:final\s+)?answer[*_]*\s*[:：]")
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")
# Bounds that keep extraction linear on adversarial text (thousands of unclosed \boxed{ or "answer is").
_MAX_MARKERS, _MAX_ANSWER_CHARS = 20, 2000


def _boxed(text: str) -> tuple[int, str] | None:
    """(start, content) of the last \\boxed{...} whose braces balance, or of a bare `\\boxed 5`."""
    for m in reversed(list(_BOXED_RE.finditer(text))[-_MAX_MARKERS:]):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return m.start(), text[m.end(): i - 1]
    bare = list(_BOXED_BARE_RE.finditer(text))
    return (bare[-1].start(), bare[-1].group(1)) if bare else None


def _boxed_contents(text: str) -> set[str]:
    """The distinct contents (white space dropped) of the balanced \\boxed{...} in `text` (the last 20)."""
    found = set()
    for m in list(_BOXED_RE.finditer(text))[-_MAX_MARKERS:]:
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.add("".join(text[m.end(): i - 1].split()))
    return found


def _trim(answer: str) -> str:
    """Cut an answer that runs on: keep a leading $...$ / \\(...\\) group, else stop at the sentence end."""
    s = answer.strip().strip("*").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left):
            end = s.find(right, len(left))
            while end > 0 and right.startswith("$") and s[end - 1] == "\\":  # "\\$" is a dollar sign
                end = s.find(right, end + 1)
            if end > len(left):
                return s[len(left): end].strip()
            break
    s = s.split("\n", 1)[0]
    m = _SENTENCE_END_RE.search(s)
    if m:
        s = s[: m.start()]
    return s.strip().rstrip(".,;:!").strip().strip("*").strip()


def extract_answer(text: str) -> Extraction:
    """The final answer of a completion and how it was found (see the module docstring for the order)."""
    if not isinstance(text, str):
        raise TypeError(f"extract_answer needs a str, got {type(text).__name__}: {text!r:.80}")
    boxed = _boxed(text)
    if boxed is not None and boxed[1].strip():
        return Extraction(boxed[1].strip(), "boxed")
    gsm = [m for m in _GSM8K_RE.finditer(text) if _trim(m.group(1))]
    if gsm:
        return Extraction(_trim(gsm[-1].group(1)), "gsm8k")
    marked = [(m.start(), "answer_is", m.end()) for m in _ANSWER_IS_RE.finditer(text)]
    marked += [(m.start(), "answer_line", m.end()) for m in _ANSWER_LINE_RE.finditer(text)]
    for _, method, end in sorted(marked, reverse=True)[:_MAX_MARKERS]:
        answer = _trim(text[end: end + _MAX_ANSWER_CHARS])
        if answer:
            return Extraction(answer, method)
    whole = _whole_answer(text)
    if whole is not None:
        return Extraction(whole, "whole")
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return Extraction(numbers[-1], "last_number")
    return Extraction(None, "none")


_OUTER_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_TEXT_GROUP_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{[^{}]*\}")
_WORD_RE = re.compile(r"[A-Za-z]{2,}")
_ARITHMETIC_CHAIN_RE = re.compile(r"[\d\s.,+\-*/×·÷()]*\d[\d\s.,+\-*/×·÷()]*(?:=[\d\s.,+\-*/×·÷()]+)+")
_MAX_WHOLE_CHARS = 300
_MAX_UNIT_WORDS_WHOLE = 2  # "12 apples", "1080 dollars"


def _strip_outer(s: str) -> str:
    """`s` without one pair of math delimiters around all of it ($...$, $$...$$, \\(...\\), \\[...\\])."""
    s = s.strip()
    for left, right in _OUTER_DELIMITERS:
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
            inner = s[len(left): -len(right)]
            if left.startswith("$") and _UNESCAPED_DOLLAR_RE.search(inner):
                continue  # "$a$ or $b$" is two groups, not one
            return inner.strip()
    return s


def _whole_answer(text: str) -> str | None:
    """The whole prediction when it is a bare answer and not prose: MATH-style data passes answers such as
    `\\frac{1}{2}`, `(x-2)(x+2)` or `10, 4, -2` with no marker, and their last number is not the answer.

    Bare means one line of at most 300 characters, optionally in one pair of math delimiters, that is one number
    (up to two unit words: "12 apples"), or one word ("Evelyn"), or has no English word outside LaTeX commands and
    \\text{} groups. An arithmetic chain ("3 + 4 = 7") is a computation, not an answer: its last number is.
    """
    s = text.strip().rstrip(".").strip()
    if not s or "\n" in s or len(s) > _MAX_WHOLE_CHARS:
        return None
    inner = _strip_outer(s)
    if not inner:
        return None
    if re.fullmatch(r"[A-Za-z]+", inner):
        return inner
    if _ARITHMETIC_CHAIN_RE.fullmatch(inner):
        return None
    words = len(_WORD_RE.findall(_LATEX_COMMAND_RE.sub(" ", _TEXT_GROUP_RE.sub(" ", inner))))
    if words == 0 or (words <= _MAX_UNIT_WORDS_WHOLE and parse_number(inner) is not None):
        return inner
    return None


_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> tuple[str, str]:
    """(program, method): the last ```python fenced block ("fenced"), or the whole completion ("program")."""
    blocks = _FENCE_RE.findall(completion)
    return (blocks[-1], "fenced") if blocks else (completion, "program")


# ------------------------------------------------------------------------------------------------- numeric

_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?[\d.]+)\s*\}\s*\{\s*([-+]?[\d.]+)\s*\}")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# Commands that only space or wrap; any other command left (\sqrt, \pi, ^) means "not one plain number".
_LATEX_SPACING_RE = re.compile(r"\\(?:quad|qquad|displaystyle|boxed|textstyle|mathbf|[;:])(?![A-Za-z])")
_NUM_TOKEN_RE = re.compile(
    r"(?<![A-Za-z_\d.])([-+]?)(\d+(?:\.\d*)?|\.\d+)(?:[eE]([-+]?\d+))?(?:\s*/\s*(\d+(?:\.\d+)?))?"
)
_HUGE = Context(prec=50, Emax=MAX_EMAX, Emin=MIN_EMIN)
_MAX_EXPONENT = 1000  # beyond 10^±1000 values stay Decimals (50 significant digits), not huge Fractions


def _normalise_number_text(s: str) -> str:
    s = s.strip()
    if "####" in s:
        s = s.rsplit("####", 1)[1]
    boxed = _boxed(s)
    if boxed is not None:
        s = boxed[1]
    s = s.replace("−", "-").replace("{,}", "").replace("\\,", "").replace("\\!", "").replace("\\ ", " ")
    s = s.replace("\\%", "%").replace("\\$", " ").replace("$", " ").replace("\\left", "").replace("\\right", "")
    s = _LATEX_TEXT_RE.sub(r" \1 ", s)
    s = _LATEX_FRAC_RE.sub(r"\1/\2", s)
    s = _LATEX_SPACING_RE.sub(" ", s).replace("{", " ").replace("}", " ")
    return _THOUSANDS_RE.sub("", s)


def parse_number(s: str) -> Fraction | Decimal | None:
    """The single number in `s` (see numeric_equal), as an exact Fraction; a Decimal beyond 10^±1000; else None."""
    text = _normalise_number_text(s)
    if "\\" in text or "^" in text:  # \sqrt{4}, 10^{3}, \pi: an expression, not a number
        return None
    tokens = _NUM_TOKEN_RE.findall(text)
    if len(tokens) != 1:
        return None
    sign, mantissa, exponent, denominator = tokens[0]
    try:
        value = Decimal(sign + mantissa + (f"e{exponent}" if exponent else ""))
        den = Decimal(denominator) if denominator else Decimal(1)
    except InvalidOperation:
        return None
    if den == 0:
        return None
    if abs(value.adjusted()) > _MAX_EXPONENT or abs(den.adjusted()) > _MAX_EXPONENT:
        with localcontext(_HUGE) as ctx:
            return ctx.divide(value, den)
    return Fraction(value) / Fraction(den)


def _norm_text(s: str) -> str:
    return re.sub(r"\s+", " ", _normalise_number_text(s)).strip().lower()


def numeric_equal(pred: str, gold: str, rel_tol: float = 1e-6) -> bool:
    """Numeric equivalence for GSM8K / synthetic answers (rules in the module docstring)."""
    a, b = parse_number(pred), parse_number(gold)
    if a is None or b is None:
        if a is None and b is None:
            text = _norm_text(pred)
            return bool(text) and text == _norm_text(gold)
        return False
    if isinstance(a, Decimal) or isinstance(b, Decimal):  # beyond 10^±1000: 50 significant digits
        with localcontext(_HUGE) as ctx:
            da, db = (x if isinstance(x, Decimal) else ctx.divide(Decimal(x.numerator), Decimal(x.denominator))
                      for x in (a, b))
            return da == db or abs(da - db) <= Decimal(str(rel_tol)) * max(abs(da), abs(db))
    if a == b:
        return True
    if a.denominator == 1 or b.denominator == 1:
        return False
    return abs(a - b) <= Fraction(str(rel_tol)) * max(abs(a), abs(b))


# ---------------------------------------------------------------------------------------------------- math

MATH_OPTIONS = ("match_types", "boxed_match_priority", "float_rounding", "numeric_precision", "strict",
                "allow_set_relation_comp")
# Past timeout_s the worker's own alarm should have answered; the parent kills it only after this grace.
HARD_KILL_GRACE_S = 1.0
WORKER_START_TIMEOUT_S = 120.0


def math_equal(pred: str, gold: str, timeout_s: float = 5.0, **math_verify_options: Any) -> bool | None:
    """math-verify's verify(parse(gold), parse(pred)) under a hard time limit; None when it timed out.

    Options: match_types (("latex", "expr") by default; a list selects LatexExtractionConfig /
    ExprExtractionConfig), boxed_match_priority (50 = the library default; the library's tests use 0),
    float_rounding, numeric_precision, strict, allow_set_relation_comp (as in math_verify.verify).
    Raises RuntimeError when the worker fails for another reason (it is restarted for the next call).
    """
    return _math_check(pred, gold, timeout_s, **math_verify_options)["result"]


def _math_check(pred: str, gold: str, timeout_s: float = 5.0, **math_verify_options: Any) -> dict:
    unknown = set(math_verify_options) - set(MATH_OPTIONS)
    if unknown:
        raise TypeError(f"math_equal got unknown option(s) {sorted(unknown)}; known: {MATH_OPTIONS}")
    if not isinstance(pred, str) or not isinstance(gold, str):
        raise TypeError(f"math_equal needs str answers, got {type(pred).__name__} and {type(gold).__name__}")
    return _worker().check(pred, gold, dict(math_verify_options), timeout_s)


_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _as_latex(answer: str) -> str:
    # Bare LaTeX is misread by math-verify ("2\sqrt{3}" -> 2), so an answer without delimiters is boxed.
    if _UNESCAPED_DOLLAR_RE.search(answer) or any(mark in answer for mark in ("\\boxed", "\\(", "\\[")):
        return answer  # already delimited ("\\$36" is a dollar sign, not a delimiter)
    return "\\boxed{" + answer + "}"


class _Deadline(BaseException):
    """Raised by the worker's SIGALRM handler; a BaseException so math-verify's `except Exception` lets it pass."""


def _math_worker_main() -> None:  # pragma: no cover - runs in the worker process
    """Worker loop: one JSON request per stdin line -> one JSON answer per line on the original stdout."""
    import functools
    import logging
    import signal

    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # stray prints from sympy must not corrupt the protocol
    logging.disable(logging.WARNING)  # math-verify logs every timeout / unparsable answer
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    @functools.lru_cache(maxsize=4096)  # the same gold is parsed once per problem, not once per sample
    def parsed(text: str, match_types: tuple[str, ...] | None, boxed_priority: int):
        if match_types is None:
            configs = [LatexExtractionConfig(boxed_match_priority=boxed_priority), ExprExtractionConfig()]
        else:
            configs = [LatexExtractionConfig(boxed_match_priority=boxed_priority) if m == "latex"
                       else ExprExtractionConfig() for m in match_types]
        return parse(text, configs, parsing_timeout=None)

    from sympy import Eq, Expr, FiniteSet

    def is_set(parsed_answer) -> bool:  # several different values, as math-verify read them
        return bool(parsed_answer) and isinstance(parsed_answer[0], FiniteSet) and len(parsed_answer[0]) > 1

    def is_single(parsed_answer) -> bool:  # one value ("7", "x + 1", "x = 7"): not a set, interval, tuple, matrix
        if not parsed_answer:
            return False
        value = parsed_answer[0].rhs if isinstance(parsed_answer[0], Eq) else parsed_answer[0]
        return isinstance(value, Expr) and not getattr(value, "is_Matrix", False)

    armed = [False]

    def on_alarm(signum, frame):
        if armed[0]:
            raise _Deadline()

    signal.signal(signal.SIGALRM, on_alarm)
    channel.write('{"ready": true}\n')
    for line in sys.stdin:
        req = json.loads(line)
        opts = req["options"]
        types = opts.get("match_types")
        types = tuple(types) if types is not None else None
        priority = int(opts.get("boxed_match_priority", 50))
        try:
            armed[0] = True
            signal.setitimer(signal.ITIMER_REAL, max(float(req["timeout_s"]), 0.001))
            pred = parsed(req["pred"], types, priority)
            result = verify(
                parsed(req["gold"], types, priority), pred,
                float_rounding=int(opts.get("float_rounding", 6)),
                numeric_precision=int(opts.get("numeric_precision", 15)),
                strict=bool(opts.get("strict", True)),
                allow_set_relation_comp=bool(opts.get("allow_set_relation_comp", False)),
                timeout_seconds=None,
            )
            answer = {"result": bool(result), "extracted": str(pred[-1]) if len(pred) > 1 else None,
                      "pred_set": is_set(pred), "gold_single": is_single(parsed(req["gold"], types, priority))}
        except _Deadline:
            answer = {"result": None, "extracted": None}
        except Exception as e:  # noqa: BLE001 - reported to the caller with its type
            answer = {"error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        channel.write(json.dumps(answer) + "\n")


class _MathWorker:
    """A persistent math-verify process owned by one thread; killed and restarted when a check overruns."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._pid = os.getpid()
        self._buf = b""
        self._ready = False

    def _start(self) -> None:
        repo = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from pipelines.verify import _math_worker_main; _math_worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0,
            start_new_session=True,  # a Ctrl-C for the caller is not the worker's; it exits when stdin closes
        )
        os.set_blocking(self._proc.stdout.fileno(), False)
        os.set_blocking(self._proc.stdin.fileno(), False)
        self._buf, self._ready = b"", False
        self._pid = os.getpid()

    def close(self) -> None:
        if self._proc is not None and self._pid == os.getpid():
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                f.close()
        self._proc = None

    def __del__(self) -> None:  # the owning thread ended: its worker process goes with it
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _write(self, data: bytes, deadline: float) -> bool:
        """Send a request; False at the deadline (a stuck worker with a full pipe must not block us)."""
        fd = self._proc.stdin.fileno()
        view = memoryview(data)
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_WRITE)
            while view:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if sel.select(remaining):
                    try:
                        view = view[os.write(fd, view):]
                    except BlockingIOError:
                        continue
        return True

    def _readline(self, deadline: float) -> bytes | None:
        """One line from the worker, or None at the deadline; raises EOFError when the worker died."""
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if sel.select(remaining):
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        raise EOFError("the math-verify worker exited")
                    self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def check(self, pred: str, gold: str, options: dict, timeout_s: float) -> dict:
        """The worker's answer: {"result": bool | None (None: timed out), "extracted": what it read in pred,
        "pred_set": whether it read several different values in pred, "gold_single": one value in gold}."""
        if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
            self._start()  # after a fork the parent's worker belongs to the parent: start our own
        try:
            if not self._ready:  # start-up (imports, ~0.3 s) does not count against the check
                if self._readline(time.monotonic() + WORKER_START_TIMEOUT_S) is None:
                    raise RuntimeError("the math-verify worker did not start")
                self._ready = True
            req = {"pred": pred, "gold": gold, "options": options, "timeout_s": timeout_s}
            deadline = time.monotonic() + timeout_s + HARD_KILL_GRACE_S
            sent = self._write((json.dumps(req) + "\n").encode(), deadline)
            line = self._readline(deadline) if sent else None
        except (EOFError, BrokenPipeError, OSError) as e:
            self.close()
            raise RuntimeError(f"math-verify worker failed: {e}") from e
        if line is None:  # stuck in C code: kill, and start the replacement now so its imports overlap
            self.close()
            self._start()
            return {"result": None, "extracted": None}
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"math-verify raised {answer['error']}")
        return answer


_local = threading.local()  # one worker per thread; dropped (and its process killed) when the thread ends
_workers: weakref.WeakSet[_MathWorker] = weakref.WeakSet()
_workers_lock = threading.Lock()


def _worker() -> _MathWorker:
    worker = getattr(_local, "worker", None)
    if worker is None:
        worker = _local.worker = _MathWorker()
        with _workers_lock:
            _workers.add(worker)
    return worker


@atexit.register
def _close_workers() -> None:
    with _workers_lock:
        for worker in list(_workers):
            worker.close()


# --------------------------------------------------------------------------------------------------- grade

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
    if (not math_options and ext.method != "last_number" and not several and _PLAIN_NUMBER_RE.fullmatch(ext.answer.strip())
            and _PLAIN_NUMBER_RE.fullmatch(gold_answer)):
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


# --------------------------------------------------------------------------------------------- step checks

_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                      "ninety": 90, "hundred": 100})
_VULGAR = {"¼": "(1/4)", "½": "(1/2)", "¾": "(3/4)", "⅓": "(1/3)", "⅔": "(2/3)", "⅕": "(1/5)", "⅛": "(1/8)"}
# "is" becomes its own equals token: "<number> is ..." often names a subject ("packages of 3 is ...").
_IS = "≡"
# Word operators get their own tokens: "3 times because 42 / 14" must not read as 3 * 42 / 14.
_WORD_OPS = {"⊕": "+", "⊖": "-", "⊗": "*", "⊘": "/"}
_STEP_REWRITES = [
    (re.compile(r"<<[^<>]*>>"), " "),  # GSM8K calculator annotations repeat the claim beside them
    (_THOUSANDS_RE, ""),
    (re.compile("[¼½¾⅓⅔⅕⅛]"), lambda m: " " + _VULGAR[m.group()] + " "),
    (re.compile(r"\\times|\\cdot|[×·∗]|(?<=\d)\s*[xX]\s*(?=\d)"), " * "),
    (re.compile(r"\\div|÷"), " / "),
    (re.compile(r"[−–]"), "-"),
    (re.compile(r"\\\$|\$|\\[()\[\]]"), " "),
    (re.compile(r"(?<=[\w%])[-/](?=[A-Za-z])"), " _ "),  # "40-yard", "free-throws", "Fri/Sat" are words
    (re.compile(r"(?i)\bmultiplied\s+by\b|\btimes\b"), " ⊗ "),
    (re.compile(r"(?i)\bdivided\s+by\b"), " ⊘ "),
    (re.compile(r"(?i)\bplus\b"), " ⊕ "),
    (re.compile(r"(?i)\bminus\b"), " ⊖ "),
    (re.compile(r"(?i)\bis\s+equal\s+to\b|\bis\b"), f" {_IS} "),
    (re.compile(r"(?i)\bequals?(?:\s+to)?\b|\bgives\b|\bmakes\b"), " = "),
]
_STEP_TOKEN_RE = re.compile(
    r"(?P<num>(?<![\w.])\d+(?:\.\d+)?%?)|(?P<op>[-+*/⊕⊖⊗⊘])|(?P<eq>[=" + _IS + r"])|(?P<lp>\()|(?P<rp>\))"
    r"|(?P<word>[A-Za-z]+(?:'[A-Za-z]+)?)|(?P<other>\S)"
)
_MAX_UNIT_WORDS = 3
_MAX_EXPRESSION_TOKENS = 200  # longer runs are not a step's arithmetic (and would nest too deep to parse)


@dataclass(frozen=True)
class _Tok:
    kind: str  # num | op | eq | lp | rp | word | other
    text: str
    value: Fraction | None = None  # num: the literal value (a % sign not applied)
    decimals: int = 0  # num: digits after the decimal point, for rounding tolerance
    percent: bool = False
    glued: bool = False  # a letter follows without a space: "3x", "2L", "(1/2)x" are algebra, not arithmetic


def _step_tokens(step: str) -> list[_Tok]:
    for pattern, repl in _STEP_REWRITES:
        step = pattern.sub(repl, step)
    toks: list[_Tok] = []
    for m in _STEP_TOKEN_RE.finditer(step):
        kind, text = m.lastgroup, m.group()
        glued = m.end() < len(step) and step[m.end()].isalpha()
        if kind == "num" and len(text) > 100:  # not a quantity anyone computes with (and int() caps digits)
            toks.append(_Tok("other", text))
        elif kind == "num":
            digits = text.rstrip("%")
            toks.append(_Tok("num", text, Fraction(digits), len(digits.split(".")[1]) if "." in digits else 0,
                             text.endswith("%"), glued and not text.endswith("%")))
        elif kind == "word" and text.lower() in _NUMBER_WORDS:
            toks.append(_Tok("num", text, Fraction(_NUMBER_WORDS[text.lower()])))
        else:
            toks.append(_Tok(kind, text, glued=glued and kind == "rp"))
    # "4 x 3", "15 pages x 1/3": a lone x before a number is a multiplication
    for i in range(1, len(toks) - 1):
        if toks[i].kind == "word" and toks[i].text.lower() == "x" and toks[i - 1].kind in ("num", "rp", "word") \
                and toks[i + 1].kind in ("num", "lp"):
            toks[i] = _Tok("op", "*")
    # a word operator not followed by a number is prose: "76 times + 225 times"
    for i, t in enumerate(toks):
        if t.text in _WORD_OPS and (i + 1 == len(toks) or toks[i + 1].kind not in ("num", "lp")):
            toks[i] = _Tok("word", "times")
    return toks


def _expression(toks: list[_Tok], i: int) -> tuple[list[_Tok], int, bool]:
    """The longest run of number/operator/parenthesis tokens from i, skipping up to three words after a
    number when an operator or '=' follows ("5 apples + 3"), or after an operator when a number follows
    ("25 classmates + his 1 teacher").

    Also says whether the run ended on skipped words ("1 glass" in "1 glass is 60/100 * 5 = 3")."""
    expr: list[_Tok] = []
    j, skipped = i, False
    while j < len(toks):
        t = toks[j]
        if t.kind in ("num", "op", "lp", "rp"):
            expr.append(t)
            j, skipped = j + 1, False
        elif t.kind == "word" and expr and (expr[-1].kind in ("num", "rp") or expr[-1].text in "+-*/"):
            k = j
            while k < len(toks) and k - j < _MAX_UNIT_WORDS and toks[k].kind == "word":
                k += 1
            after_operand = expr[-1].kind != "op"
            wanted = ("op", "eq", "rp") if after_operand else ("num", "lp")
            if k < len(toks) and toks[k].kind in wanted:
                j, skipped = k, after_operand
            else:
                break
        else:
            break
    while expr and expr[-1].kind in ("op", "lp"):  # "15 times for 5 days": a dangling operator is prose
        expr.pop()
    return expr, j, skipped


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(expr: list[_Tok]) -> tuple[Fraction | None, list[Fraction]] | None:
    """(value, values of all sub-expressions) of a token run, or None when it is not a valid expression.

    The value is None for a division by zero."""
    literals: list[Fraction] = []
    parts = []
    for t in expr:
        if t.kind == "num":
            literals.append(t.value / 100 if t.percent else t.value)
            parts.append(f"_{len(literals) - 1}")
        else:
            parts.append(_WORD_OPS.get(t.text, t.text))
    if len(expr) > _MAX_EXPRESSION_TOKENS:
        return None
    try:
        tree = ast.parse(" ".join(parts), mode="eval")
    except (SyntaxError, RecursionError, MemoryError):
        return None
    subvalues: list[Fraction] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            return literals[int(node.id[1:])]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = walk(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            v = _BINOPS[type(node.op)](walk(node.left), walk(node.right))
            subvalues.append(v)
            return v
        raise ValueError(f"unsupported expression node {type(node).__name__}")

    try:
        return walk(tree.body), subvalues
    except ZeroDivisionError:
        return None, []  # a well-formed expression without a value: any claim about it is false
    except (ValueError, IndexError):
        return None


def _literal(expr: list[_Tok]) -> _Tok | None:
    """The number token of an expression that is just a (signed) number: a stated result, not a computation."""
    while len(expr) >= 3 and expr[0].kind == "lp" and expr[-1].kind == "rp":
        expr = expr[1:-1]  # "(45)"
    if len(expr) == 1 and expr[0].kind == "num":
        return expr[0]
    if len(expr) == 2 and expr[0].kind == "op" and expr[0].text in "+-" and expr[1].kind == "num":
        t = expr[1]
        return _Tok("num", expr[0].text + t.text, -t.value if expr[0].text == "-" else t.value, t.decimals,
                    t.percent)
    return None


def _is_fraction(expr: list[_Tok]) -> bool:
    return [t.kind for t in expr] == ["num", "op", "num"] and expr[1].text == "/"


def _claims(step: str) -> list[list[list[_Tok]]]:
    """Every claim in a step: at least two expressions joined by '=', one of them a computation."""
    toks = _step_tokens(step)
    claims, i = [], 0
    while i < len(toks):
        prev = toks[i - 1].kind if i else "start"
        # A claim starts at a number or "(" not preceded by an operator (that would be a fragment: "books - 135"),
        # or at a unary minus at the start of a formula.
        starts = (toks[i].kind in ("num", "lp") and prev != "op") or (
            toks[i].kind == "op" and toks[i].text == "-" and prev in ("start", "eq", "lp", "other")
            and i + 1 < len(toks) and toks[i + 1].kind == "num")
        if not starts:
            i += 1
            continue
        expr, j, skipped = _expression(toks, i)
        chain = [expr]
        subject = skipped or (j < len(toks) and toks[j].text == _IS)
        while j < len(toks) and toks[j].kind == "eq":
            if skipped and toks[j].text == _IS and len(chain) > 1:
                break  # "20 - 12 = 8 years until he is 20": the "is" starts a new sentence part
            nxt, k, skipped = _expression(toks, j + 1)
            if not nxt:
                break
            chain.append(nxt)
            j = k
        if subject and (_literal(chain[0]) is not None or _is_fraction(chain[0])):
            chain = chain[1:]  # "1 glass is 60/100 * 5 = 3", "packages of 3 is ...", "1/4 pound makes ..."
        if len(chain) >= 2 and any(_literal(e) is None for e in chain) \
                and not any(t.glued for e in chain for t in e) \
                and all(_evaluate(e) is not None for e in chain):
            claims.append(chain)
            i = j
        else:
            i = max(j, i + 1) if len(chain) >= 2 else i + 1
    return claims


def _close(a: Fraction, b: Fraction) -> bool:
    return abs(a - b) <= Fraction(1, 10**9) * max(1, abs(a), abs(b))


def _readings(t: _Tok) -> list[Fraction]:
    return [t.value, t.value / 100] if t.percent else [t.value]


def _claim_holds(chain: list[list[_Tok]]) -> bool:
    """Whether all expressions of a claim have one value; a stated result with d decimals may be rounded."""
    values = [_evaluate(e)[0] for e in chain]
    if any(v is None for v in values):  # a division by zero
        return False
    reference = next(v for e, v in zip(chain, values) if _literal(e) is None)
    for expr, value in zip(chain, values):
        lit = _literal(expr)
        if lit is None:
            if not _close(value, reference):
                return False
            continue
        tol = Fraction(1, 2 * 10**lit.decimals) if lit.decimals else Fraction(0)
        if not any(abs(r - reference) <= tol or _close(r, reference) for r in _readings(lit)):
            return False  # with a % sign either reading (50% as 50 or 0.5) counts
    return True


def find_claims(step: str) -> list[tuple[str, bool]]:
    """The arithmetic claims check_steps reads in a step, as (normalised text, whether it holds)."""
    text = lambda expr: " ".join(_WORD_OPS.get(t.text, t.text) for t in expr)  # noqa: E731
    return [(" = ".join(text(e) for e in chain), _claim_holds(chain)) for chain in _claims(step)]


def _stated_answer(step: str) -> str | None:
    ext = extract_answer(step)
    return ext.answer if ext.method in ("boxed", "gsm8k", "answer_is", "answer_line") else None


def check_steps(steps: Sequence[str], quantities: Sequence[float], final_answer: float | str | None = None,
                *, constants: Sequence[float] = ()) -> list[bool]:
    """Whether each step is correct (rules in the module docstring): true claims over known operands only."""
    if isinstance(steps, str):
        raise TypeError("check_steps needs a list of steps, got one str; split the solution into steps first")
    known: list[Fraction] = [Fraction(q) for q in (*quantities, *constants)]
    labels = []
    for step in steps:
        ok = True
        for chain in _claims(step):
            ok = ok and _claim_holds(chain)
            local: list[Fraction] = []
            for expr in chain:
                lit = _literal(expr)
                if lit is not None:
                    local += _readings(lit)
                    continue
                for t in expr:  # operands must be known (sign-insensitive: "-3 + 5" uses the quantity 3)
                    if t.kind == "num" and not any(_close(abs(r), abs(k)) for r in _readings(t)
                                                   for k in (*known, *local)):
                        ok = False
                value, subvalues = _evaluate(expr)
                local += [v for v in (value, *subvalues) if v is not None]
            known += local
        stated = _stated_answer(step)
        if ok and stated is not None and final_answer is not None and parse_number(stated) is not None:
            ok = numeric_equal(stated, str(final_answer))
        labels.append(ok)
    return labels


def first_error(steps: Sequence[str], quantities: Sequence[float], final_answer: float | str | None = None,
                *, constants: Sequence[float] = ()) -> int:
    """Index of the first incorrect step, or -1 when every step is correct."""
    for i, ok in enumerate(check_steps(steps, quantities, final_answer, constants=constants)):
        if not ok:
            return i
    return -1


# -------------------------------------------------------------------------------------------------- batches

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

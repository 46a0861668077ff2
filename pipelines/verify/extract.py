"""Answer extraction: the final answer of a completion and how it was found.

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines.verify.latex import _MAX_ANSWER_CHARS, _MAX_MARKERS, _boxed, _strip_outer
from pipelines.verify.numeric import parse_number

EXTRACTION_METHODS = ("boxed", "answer_is", "gsm8k", "answer_line", "whole", "math_verify", "last_number",
                      "none")
# the methods of an answer the text states (\boxed{7}, "The answer is 7", #### 7, "Answer: 7"), not one read off it
STATED_ANSWER = ("boxed", "answer_is", "gsm8k", "answer_line")


@dataclass(frozen=True)
class Extraction:
    answer: str | None  # the answer text, trimmed of delimiters and sentence punctuation; None when none found
    method: str  # how it was found: one of EXTRACTION_METHODS


_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"(?i)\b(?:final\s+)?answer\s+(?:is|was|would\s+be|will\s+be)\b\s*:?")
_ANSWER_LINE_RE = re.compile(r"(?im)^[ \t>#*_-]*(?:final\s+)?answer[*_]*\s*[:：]")
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")


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


_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_TEXT_GROUP_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{[^{}]*\}")
_WORD_RE = re.compile(r"[A-Za-z]{2,}")
_ARITHMETIC_CHAIN_RE = re.compile(r"[\d\s.,+\-*/×·÷()]*\d[\d\s.,+\-*/×·÷()]*(?:=[\d\s.,+\-*/×·÷()]+)+")
_MAX_WHOLE_CHARS = 300
_MAX_UNIT_WORDS_WHOLE = 2  # "12 apples", "1080 dollars"


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

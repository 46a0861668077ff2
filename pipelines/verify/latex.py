"""Small LaTeX text helpers shared by the extraction, numeric and math graders: balanced \\boxed{} groups, outer
math delimiters, unescaped dollars, thousands commas."""

from __future__ import annotations

import re

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE_RE = re.compile(r"\\boxed +([^\s${}]+)")
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


_OUTER_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


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


_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")

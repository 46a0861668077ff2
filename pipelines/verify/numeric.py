"""Numeric equivalence (`numeric_equal`, GSM8K and synthetic answers): one number per answer after dropping $,
thousands commas (1,080), LaTeX wrappers (\\text{}, \\$, {,}), unit words (12 apples) and a % sign (50% reads as
50, GSM8K's convention); simple fractions a/b and \\frac{a}{b} are numbers. Two numbers are equal exactly when
either is an integer (1,000,000 vs 1,000,001 differ; 18 == 18.0), otherwise within rel_tol (0.333333 == 1/3).
A string with zero or several numbers is compared as normalised text.
"""

from __future__ import annotations

import re
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, InvalidOperation, localcontext
from fractions import Fraction

from pipelines.verify.latex import _THOUSANDS_RE, _boxed

_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?[\d.]+)\s*\}\s*\{\s*([-+]?[\d.]+)\s*\}")
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

"""Step checks (`check_steps`, `first_error`; `find_claims` shows what was read), the ground truth for synthetic
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
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from pipelines.verify.extract import STATED_ANSWER, extract_answer
from pipelines.verify.latex import _THOUSANDS_RE
from pipelines.verify.numeric import numeric_equal, parse_number

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


def computes_answer(steps: Sequence[str], answer: str | float | None) -> bool:
    """Whether some claim in the steps that holds computes `answer` (the value of its computation equals it): the
    solution shows the work that gives its answer, rather than only stating it ("... has now is 26. The answer is
    26." after a hint that the answer is 26). False when the answer is not a number."""
    target = parse_number(str(answer)) if answer is not None else None
    if target is None:
        return False
    target = Fraction(target).limit_denominator(10**9)
    for step in steps:
        for chain in _claims(step):
            if not _claim_holds(chain):
                continue
            value = next(_evaluate(e)[0] for e in chain if _literal(e) is None)
            if value is not None and _close(value, target):
                return True
    return False


def _stated_answer(step: str) -> str | None:
    ext = extract_answer(step)
    return ext.answer if ext.method in STATED_ANSWER else None


# Numbers a question implies by a word; a hand-made list (no library reads them), kept to words whose number a
# solution computes with as an operand: "doubles them" -> x 2, "half of" -> / 2 or x 0.5, "a dozen" -> 12.
_IMPLIED = [(re.compile(r"(?i)\b(twice|doubles?|doubled|pairs?)\b"), (2.0,)),
            (re.compile(r"(?i)\b(half|halve[sd]?)\b"), (2.0, 0.5, 1.0)),
            (re.compile(r"(?i)\b(triples?|tripled|thrice)\b"), (3.0,)),
            (re.compile(r"(?i)\b(quarters?|fourths?)\b"), (4.0, 0.25, 1.0)),
            (re.compile(r"(?i)\b(thirds?)\b"), (3.0, 1.0)),
            (re.compile(r"(?i)\b(fifths?)\b"), (5.0, 0.2, 1.0)),
            (re.compile(r"(?i)\bevery (second|other)\b"), (2.0,)),
            (re.compile(r"(?i)\b(dozens?)\b"), (12.0,)),
            (re.compile(r"(?i)%|\bpercent"), (100.0,)),
            (re.compile(r"(?i)\b(weeks?|weekly)\b"), (7.0,)),
            (re.compile(r"(?i)\b(hours?|hourly|minutes?)\b"), (60.0,)),
            (re.compile(r"(?i)\b(days?|daily)\b"), (24.0,))]


def question_numbers(question: str) -> list[float]:
    """The numbers a question gives, read as the steps' numbers are (digits with thousands commas, decimals and %,
    number words, ½-style fractions; both readings of a percentage), and those a word implies (twice, half, dozen,
    percent, week -> 7, hour -> 60, ...): the known operands of a solution when the problem's own `quantities` are
    not at hand (a served request, a file of questions)."""
    values: list[float] = []
    toks = _step_tokens(question)
    for i, t in enumerate(toks):
        if t.kind == "num":
            values += [float(r) for r in _readings(t) if float(r) not in values]
        # "3/4 of them": the fraction's value too (a solution may compute with 0.75)
        if t.kind == "op" and t.text == "/" and 0 < i < len(toks) - 1 and toks[i - 1].kind == toks[i + 1].kind == "num" \
                and toks[i + 1].value:
            v = float(toks[i - 1].value / toks[i + 1].value)
            values += [v] if v not in values else []
    for pattern, implied in _IMPLIED:
        if pattern.search(question):
            values += [v for v in implied if v not in values]
    return values


def coverage(steps: Sequence[str], question: str) -> float:
    """The share of the numbers the question writes in digits that some computation of the solution uses as an
    operand (1.0 when it writes none). Number words and implied numbers are left out: "keeps one group" names no
    operand. A solution that skips a given quantity has skipped a step of the problem, unless the quantity is a
    distractor (GSM-IC's added sentences), which this cannot tell."""
    given = [_readings(t) for t in _step_tokens(question) if t.kind == "num" and t.text[:1].isdigit()]
    if not given:
        return 1.0
    used = [r for step in steps for chain in _claims(step) for e in chain if _literal(e) is None
            for t in e if t.kind == "num" for r in _readings(t)]
    # a percentage counts in either reading: 25% used as 25 (x 25 / 100) or as 0.25
    return sum(any(_close(abs(u), abs(g)) for u in used for g in readings) for readings in given) / len(given)


def check_steps(steps: Sequence[str], quantities: Sequence[float], final_answer: float | str | None = None,
                *, constants: Sequence[float] = (), answer_computed: bool = False) -> list[bool]:
    """Whether each step is correct (rules in the module docstring): true claims over known operands only.

    answer_computed: without a `final_answer` to compare with (a verifier at test time), a stated numeric answer
    must be a known value: a result the solution computed, or a number of the problem. "The answer is 30." after
    "23 + 5 = 28" fails, as does an answer stated with no work that the problem does not give."""
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
        elif ok and stated is not None and final_answer is None and answer_computed:
            value = parse_number(stated)
            if isinstance(value, Fraction):  # a number past 10^+-1000 (a Decimal) is no value computed here
                values = [value, value / 100] if stated.rstrip().endswith("%") else [value]
                ok = any(_close(v, k) for v in values for k in known)
            elif value is not None or "\\" not in stated:
                ok = False  # past 10^+-1000, or not one number ("26 * 5 = 125 balloons", "Ken has doubled")
            # a LaTeX answer (\sqrt{2}, \frac{a}{b}) is not a number this can compare: left to the claims
        labels.append(ok)
    return labels


def first_error(steps: Sequence[str], quantities: Sequence[float], final_answer: float | str | None = None,
                *, constants: Sequence[float] = ()) -> int:
    """Index of the first incorrect step, or -1 when every step is correct."""
    for i, ok in enumerate(check_steps(steps, quantities, final_answer, constants=constants)):
        if not ok:
            return i
    return -1

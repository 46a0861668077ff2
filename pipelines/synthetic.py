"""The synthetic problem source (pure): arithmetic word problems with the value of every step known.

`synthetic_problem(cfg, i)` is reproducible from (cfg, i) alone, and its rows carry the reference steps, the value
after each step and the numbers of the question, which are the ground truth that step checks and labels use.
`pipelines.problems.load_problems("synthetic")` serves them next to the file sources.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from pipelines.config import help_field
from pipelines.schema import Problem, _problem


def format_number(x: float) -> str:
    """17.0 -> "17", 2.5 -> "2.5" (how synthetic answers and step values are written)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class SyntheticConfig:
    n: int = help_field(200, "number of problems")
    seed: int = help_field(0, "problem i is drawn from random.Random(f'{seed}:{i}'), so each is reproducible alone")
    min_steps: int = help_field(1, "fewest arithmetic steps in a problem (1-5)")
    max_steps: int = help_field(2, "most arithmetic steps in a problem (1-5)")
    ops: tuple[str, ...] = help_field(("+", "-", "*", "/"), "operations to draw from: + - * / (exact division)")
    max_start: int = help_field(50, "largest starting quantity")
    max_operand: int = help_field(20, "largest operand of + and -")
    max_factor: int = help_field(5, "largest factor of * and divisor of /")
    max_value: int = help_field(1000, "no intermediate value exceeds this")
    phrasings: int = help_field(0, "phrasings per sentence kind to draw from: 0 = all (the default: many sentence "
                                   "shapes), k = only the first k of each (a narrow wording, e.g. for a controlled "
                                   "study of how training follows the problems' wording)")

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps <= 5:
            raise ValueError(f"steps must satisfy 1 <= min_steps <= max_steps <= 5, got {self.min_steps}..{self.max_steps}")
        bad = [o for o in self.ops if o not in ("+", "-", "*", "/")]
        if bad or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of + - * /, got {list(self.ops)}")
        if self.phrasings < 0:
            raise ValueError(f"phrasings must be >= 0 (0 = all), got {self.phrasings}")
        if self.max_factor < 2 or self.max_start < 2 or self.max_operand < 1 or self.n < 0:
            raise ValueError("max_factor and max_start must be >= 2, max_operand >= 1 and n >= 0")

    def key(self) -> str:
        """Short hash of everything that shapes the problems (so ids never collide across configs)."""
        blob = json.dumps([self.seed, self.min_steps, self.max_steps, list(self.ops), self.max_start,
                           self.max_operand, self.max_factor, self.max_value]
                          + ([self.phrasings] if self.phrasings else []))  # ids of the default stay as they were
        return hashlib.sha1(blob.encode()).hexdigest()[:6]


# Scenes: (who, pronoun, possessive, item, container-verb). Many scenes x many phrasings per operation, so the
# model does not learn a single sentence shape (the calibration run in docs/cpu-engine.md saw that).
_NAMES = [("Tom", "he", "his"), ("Mia", "she", "her"), ("Ravi", "he", "his"), ("Lena", "she", "her"),
          ("Omar", "he", "his"), ("Sofia", "she", "her"), ("Ken", "he", "his"), ("Ada", "she", "her"),
          ("Luis", "he", "his"), ("Zoe", "she", "her")]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells", "cards",
          "balloons", "toy cars"]
_OPEN = [
    "{N} has {a} {I}.",
    "{N} starts with {a} {I}.",
    "There are {a} {I} in {N}'s bag.",
    "{N} owns {a} {I}.",
    "At first, {N} has {a} {I}.",
    "{N} collected {a} {I} last week.",
]
_ADD = [
    "{P_} buys {b} more {I}.",
    "{N} finds {b} more {I}.",
    "A friend gives {N} {b} {I}.",
    "Then {p} gets {b} more.",
    "{N} wins {b} {I} in a game.",
    "{P_} adds {b} {I} to {h} pile.",
]
_SUB = [
    "{P_} gives away {b} {I}.",
    "{N} loses {b} of them.",
    "Then {p} uses {b} {I}.",
    "{N} sells {b} {I}.",
    "{b} of the {I} get lost.",
    "{P_} gives {b} {I} to a friend.",
]
_MUL = [
    "Then {N} ends up with {b} times as many {I} as before.",
    "The number of {I} {N} has becomes {b} times bigger.",
    "{N}'s pile of {I} grows to {b} times its size.",
    "{P_} multiplies {h} {I} by {b}.",
]
_DIV = [
    "{N} splits the {I} into {b} equal groups and keeps one group.",
    "{P_} shares the {I} equally among {b} friends, including {self}, and keeps one share.",
    "Then {N} keeps only one of {b} equal parts of the {I}.",
    "{P_} divides {h} {I} equally into {b} boxes and keeps one box.",
]
_ASK = [
    "How many {I} does {N} have now?",
    "How many {I} does {N} have at the end?",
    "What is the number of {I} {N} has now?",
    "How many {I} are left with {N}?",
]
_OP_TEMPLATES = {"+": _ADD, "-": _SUB, "*": _MUL, "/": _DIV}


def _fill(template: str, name: tuple[str, str, str], item: str, **nums: int) -> str:
    n, p, h = name
    return template.format(N=n, p=p, P_=p.capitalize(), h=h, I=item,
                           self="himself" if p == "he" else "herself", **nums)


def _apply(op: str, v: int, b: int) -> int:
    return {"+": v + b, "-": v - b, "*": v * b, "/": v // b}[op]


def synthetic_problem(cfg: SyntheticConfig, i: int) -> Problem:
    """Problem i of the config: reproducible from (cfg, i) alone, with the value of every step recorded."""
    rng = random.Random(f"{cfg.seed}:{i}")  # string seeds hash with sha512: stable across runs and platforms
    pick = (lambda xs: rng.choice(xs[:cfg.phrasings])) if cfg.phrasings else rng.choice
    n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, cfg.max_start)
    sentences = [_fill(pick(_OPEN), name, item, a=value)]
    quantities: list[float] = [float(value)]
    ref_steps: list[str] = []
    ref_values: list[float] = []
    ops_used: list[str] = []
    for _ in range(n_steps):
        options = []
        for op in cfg.ops:
            if op == "+" and value + 1 <= cfg.max_value:
                options.append((op, [b for b in range(1, cfg.max_operand + 1) if value + b <= cfg.max_value]))
            elif op == "-" and value > 1:
                options.append((op, list(range(1, min(cfg.max_operand, value - 1) + 1))))
            elif op == "*":
                bs = [b for b in range(2, cfg.max_factor + 1) if value * b <= cfg.max_value]
                if bs:
                    options.append((op, bs))
            elif op == "/":
                bs = [b for b in range(2, cfg.max_factor + 1) if value % b == 0 and value // b >= 1]
                if bs:
                    options.append((op, bs))
        if not options:  # e.g. only "/" requested and the value is prime: fall back to the first usable op
            options = [("+", [1])]
        op, bs = rng.choice(options)
        b = rng.choice(bs)
        new = _apply(op, value, b)
        sentences.append(_fill(pick(_OP_TEMPLATES[op]), name, item, b=b))
        sym = {"+": "+", "-": "-", "*": "*", "/": "/"}[op]
        ref_steps.append(f"{value} {sym} {b} = {new}")
        ref_values.append(float(new))
        quantities.append(float(b))
        ops_used.append(op)
        value = new
    sentences.append(_fill(pick(_ASK), name, item))
    return _problem(
        id=f"syn-{cfg.key()}-{i:06d}",
        question=" ".join(sentences),
        answer=format_number(value),
        source="synthetic",
        kind="numeric",
        ref_steps=ref_steps,
        ref_values=ref_values,
        quantities=quantities,
        meta=json.dumps({"n_steps": n_steps, "ops": ops_used, "seed": cfg.seed, "index": i}),
    )


def synthetic_problems(cfg: SyntheticConfig) -> list[Problem]:
    return [synthetic_problem(cfg, i) for i in range(cfg.n)]


# ------------------------------------------------------------------------------------------- planted solutions
# Process supervision for free: a synthetic problem's reference path is known, so solutions with one planted error
# at a known step (a wrong operation whose arithmetic is right, an arithmetic slip, a wrong final line) carry exact
# step labels. Written in a few sentence shapes so that a verifier cannot tell them from the model's own by style.
_STEP_STYLES = [
    "{v} {sym} {b} = {new}",
    "{N} now has {v} {sym} {b} = {new} {I}.",
    "So {N} has {v} {sym} {b} = {new} {I}.",
    "After that, {p} has {v} {sym} {b} = {new} {I}.",
    "The number of {I} is {v} {sym} {b} = {new}.",
]
_FINAL_STYLES = ["The answer is {ans}.", "{N} has {ans} {I} now. The answer is {ans}.", "The answer is {ans}."]
PLANTED_ERRORS = ("operation", "operation", "slip", "final")  # the model's own errors are mostly operations


def _scene(question: str) -> tuple[str, str, str]:
    """(name, pronoun, item) as the question writes them (its first sentence names both)."""
    name = next(((n, p) for n, p, _ in _NAMES if n in question), ("they", "they"))
    item = next((i for i in _ITEMS if i in question), "items")
    return name[0], name[1], item


def planted_solutions(problem: dict, k: int, seed: int = 0) -> list[tuple[list[str], list[int]]]:
    """k solutions of a synthetic problem with exact prefix labels (1 = no error up to this step): about half follow
    the reference path, the others carry one planted error at a random step and continue correctly from it:
      operation  the step applies another of + - * / to the same numbers, its arithmetic right;
      slip       the step's result is off by 1-3 (or 10 for results over 20);
      final      every step right, the final line states another number (an intermediate or a question number).
    Each solution ends with a line stating its answer. Reproducible from (problem id, k, seed)."""
    try:  # a problem without a recorded path (another source, a hand-edited row) gets none, never a guess
        meta = json.loads(problem.get("meta") or "{}")
        ops, q = list(meta.get("ops") or []), [float(x) for x in problem.get("quantities") or []]
    except (ValueError, TypeError, AttributeError):
        return []
    if not ops or len(q) != len(ops) + 1 or any(o not in _OP_TEMPLATES for o in ops) \
            or any(not x.is_integer() or x < 1 for x in q):
        return []
    q = [int(x) for x in q]
    rng = random.Random(f"planted:{seed}:{problem['id']}")
    name, pron, item = _scene(problem["question"])
    out = []
    for j in range(k):
        error = None if j % 2 == 0 else rng.choice(PLANTED_ERRORS)
        at = rng.randrange(len(ops)) if error in ("operation", "slip") else len(ops)
        v, steps, labels, ok, values = q[0], [], [], True, []
        for t, (op, b) in enumerate(zip(ops, q[1:])):
            use, new = op, _apply(op, v, b)
            if t == at and error == "operation":
                others = [o for o in "+-*/" if (o != "/" or v % b == 0) and (o != "-" or v > b)
                          and _apply(o, v, b) != new]  # 2 + 2 = 2 * 2 would plant no error
                error = "operation" if others else "slip"
                if others:
                    use = rng.choice(others)
                    new = _apply(use, v, b)
            if t == at and error == "slip":
                d = 10 if new > 20 else rng.randint(1, 3)
                new = new + d if new - d < 1 or rng.random() < 0.5 else new - d
            ok = ok and t != at
            sym = "x" if use == "*" and rng.random() < 0.3 else use
            steps.append(rng.choice(_STEP_STYLES).format(v=v, sym=sym, b=b, new=new, N=name, p=pron, I=item))
            labels.append(int(ok))
            values.append(new)
            v = new
        ans = v
        if error == "final":
            wrong = sorted({x for x in (*values[:-1], *q) if x != v})
            ans = rng.choice(wrong) if wrong else v + 1
            ok = False
        steps.append(rng.choice(_FINAL_STYLES).format(ans=ans, N=name, I=item))
        labels.append(int(ok))
        out.append((steps, labels))
    return out

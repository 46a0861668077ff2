"""What every search strategy shares (pure): the types a search takes and returns, and the ledger.

Completion, SearchProblem, SearchConfig and SearchResult are the strategies' contract (`pipelines.search` documents
the generate/score callables and the token accounting). `_Ledger` wraps those callables for one search: it checks
that every call returns exactly what was asked (budgets are exact), counts every token, and builds the partial
solutions (`_Path`) that step-level search expands, scores and rolls out.

It is its own module so that `pipelines.search` (the strategies and their dict) and `pipelines.search_mcts` both
import it, rather than each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import help_field
from pipelines.prompts import FORMATS, separator, split_steps
from pipelines.verify.extract import STATED_ANSWER
from pipelines.votes import AGGREGATE, reduce_steps

REFLECTION_CUE = "Wait! Maybe I made some mistakes! I need to rethink from scratch."
# What follows an attempt in a revision prompt: the same text in correction training rows
# (`pipelines.train.data.correction_pairs`) and in the `revise` strategy, so a generator trained on the rows knows it.
REVISE_CUE = "Let me check that solution and write a corrected one."


def revision_prompt(prompt: str, attempt: str, cue: str = REVISE_CUE) -> str:
    """The prompt of a revision: the problem's prompt, the attempt, then the cue on its own line."""
    return f"{prompt}{attempt.rstrip()}\n{cue}\n"


@dataclass(frozen=True)
class Completion:
    text: str  # continues its prefix; a step ends with the separator when it stopped on it
    n_tokens: int  # tokens the engine generated for it (its token ids), whatever the text looks like
    finish_reason: str  # "stop" (separator or end of turn) | "length" | "error"
    token_logprobs: list[float] = field(default_factory=list)  # (T,) chosen token logprob per position
    top_logprobs: list[list[float]] = field(default_factory=list)  # (T, k) top-k logprobs per position


@dataclass(frozen=True)
class SearchProblem:
    prompt: str  # the generation prefix: chat template applied, ending at the assistant turn
    question: str  # what the scorer is given as the prompt of every solution (the PRM: as rendered in training)
    kind: str = "numeric"  # answer equivalence for votes: numeric | math


@dataclass(frozen=True)
class SearchConfig:
    fmt: str = help_field("lines", "step layout of the prompt (prompts.FORMATS): sets the separator and step split")
    temperature: float = help_field(0.7, "sampling temperature of every sampled sequence (greedy uses 0)")
    top_p: float = help_field(1.0, "nucleus sampling")
    seed: int | None = help_field(None, "sampling seed: the k-th sampled engine call of a search uses seed + 1000 k, "
                                        "so a search is reproducible on one engine (the endpoint's `seed` field); "
                                        "None = the engine's own random state")
    logprobs: int = help_field(5, "top-k logprobs per token (Marco-o1 confidence, MCTS priors); 0 = none")
    max_tokens: int = help_field(256, "most generated tokens of one solution (step searches check it per step)")
    step_tokens: int = help_field(64, "most tokens of one step in step-level search")
    max_steps: int = help_field(12, "most steps of a solution in step-level search")
    action: str = help_field("step", "step-level action: step (up to the separator) | ministep (fixed token count)")
    ministep_tokens: int = help_field(32, "tokens of a mini-step action (Marco-o1 used 32 and 64)")
    expansions: int = help_field(4, "children per expanded node: beam width = budget // expansions; DVTS subtrees "
                                    "likewise; MCTS children per expansion")
    agg: str = help_field("min", "solution score from step scores: min | last | prod")
    search_agg: str = help_field("last", "partial-path score in beam/DVTS/MCTS from step scores: min | last | prod")
    c_puct: float = help_field(1.0, "MCTS exploration constant of PUCT")
    mcts_value: str = help_field("score", "MCTS leaf value: score (the scorer on the new child's path) | rollout "
                                          "(the scorer on one rollout from the child to a terminal)")
    reflection_cue: str = help_field(REFLECTION_CUE, "text appended before each reflection")
    revise_cue: str = help_field(REVISE_CUE, "revise: the text after an attempt that asks for a corrected solution "
                                             "(a generator trained with select.corrections learned this one)")
    revise_threshold: float = help_field(0.5, "revise: an attempt whose solution score reaches this satisfies the "
                                              "verifier, and the search stops")
    record_tree: bool = help_field(False, "keep the search tree in the result's meta (traces.jsonl): every node "
                                          "beam/DVTS/MCTS generated (parent, step text, tokens, score, terminal) and "
                                          "the chosen node; stream-of-search training data reads it")

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt {self.fmt!r} is not one of {list(FORMATS)}")
        for name in ("agg", "search_agg"):
            if getattr(self, name) not in AGGREGATE:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {sorted(AGGREGATE)}")
        if self.action not in ("step", "ministep"):
            raise ValueError(f"action {self.action!r} is not one of step, ministep")
        if self.mcts_value not in ("score", "rollout"):
            raise ValueError(f"mcts_value {self.mcts_value!r} is not one of score, rollout")
        if min(self.max_tokens, self.step_tokens, self.max_steps, self.ministep_tokens, self.expansions) < 1:
            raise ValueError("max_tokens, step_tokens, max_steps, ministep_tokens and expansions must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or not 0 <= self.logprobs <= 20:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, 0 <= logprobs <= 20")


@dataclass
class SearchResult:
    strategy: str
    budget: int
    answer: str | None  # the chosen answer (extracted from `completion`, or the winning group's representative)
    completion: str  # the chosen solution, a continuation of the prompt
    steps: list[str]
    step_scores: list[float]  # the scorer's output for the chosen solution ([] when it was never scored)
    score: float  # the chosen solution's score (cfg.agg over step_scores), NaN when unscored
    tokens_generated: int
    tokens_scored: int
    sequences: int  # sequences the engine returned
    generate_calls: int
    score_calls: int
    candidates: list[dict[str, Any]]  # the finished solutions the choice was made among: answer, score
    meta: dict[str, Any]  # strategy facts: rounds, width, simulations, visits of the root's children, ...


# ----------------------------------------------------------------------------------------------------------
# Shared machinery: partial solutions, the ledger that counts every token, terminal tests
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Path:
    """A (partial) solution: the generated pieces after the prompt, in order."""
    pieces: tuple[Completion, ...] = ()
    terminal: bool = False
    scores: list[float] = field(default_factory=list)  # the scorer's step scores of this path (when scored)
    node: int = -1  # its node in the ledger's recorded tree (-1: the root, or not recorded)

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.pieces)

    @property
    def tokens(self) -> int:
        return sum(c.n_tokens for c in self.pieces)

    def extend(self, c: Completion, terminal: bool) -> "_Path":
        return _Path(self.pieces + (c,), terminal)


def _answer(text: str) -> str | None:
    from pipelines.verify import extract_answer

    return extract_answer(text).answer


def _states_answer(text: str) -> bool:
    """A step that states a final answer ("The answer is 7.", \\boxed{7}, #### 7) ends the solution."""
    from pipelines.verify import extract_answer

    return extract_answer(text).method in STATED_ANSWER


class _Ledger:
    """Wraps generate/score for one search: checks shapes (budgets are exact) and counts every token."""

    def __init__(self, problem: SearchProblem, generate, score, cfg: SearchConfig):
        self.problem, self._generate, self._score, self.cfg = problem, generate, score, cfg
        self.sep = separator(cfg.fmt)
        self.tokens_generated = self.tokens_scored = self.sequences = self.generate_calls = self.score_calls = 0
        # cfg.record_tree: every path expand/rollout made, {id, parent, text, tokens, terminal, kind, score}
        self.tree: list[dict] | None = [] if cfg.record_tree else None

    def generate(self, prefixes: list[str], n: int, stop_at_step: bool, max_tokens: int,
                 greedy: bool = False) -> list[list[Completion]]:
        out = self._generate(prefixes, n, stop_at_step, max_tokens, greedy=greedy)
        if len(out) != len(prefixes) or any(len(c) != n for c in out):
            raise ValueError(f"generate returned {[len(c) for c in out]} completions for {len(prefixes)} prefixes "
                             f"with n={n}; a search budget is exact, so the callable must return n per prefix")
        self.generate_calls += 1
        self.sequences += len(prefixes) * n
        self.tokens_generated += sum(c.n_tokens for comps in out for c in comps)
        return out

    def steps(self, path: _Path) -> list[str]:
        return split_steps(path.text, self.cfg.fmt)

    def score(self, paths: list[_Path]) -> None:
        """Set `scores` on each path (a path with no step text gets [] without a call)."""
        step_lists = [self.steps(p) for p in paths]
        if getattr(self._score, "reads_logprobs", False):
            for p, steps in zip(paths, step_lists):
                p.scores = self._score.score_pieces(p.pieces, steps)
            self._note_scores(paths)
            return
        todo = [i for i, s in enumerate(step_lists) if s]
        for p in paths:
            p.scores = []
        if not todo:
            return
        if self._score is None:
            raise ValueError("this strategy needs a score callable (a PRM, an ORM or CONFIDENCE)")
        out = self._score([self.problem.question] * len(todo), [step_lists[i] for i in todo])
        if len(out) != len(todo):
            raise ValueError(f"score returned {len(out)} score lists for {len(todo)} solutions")
        self.score_calls += 1
        free = getattr(self._score, "model_free", False)  # a rule-based scorer reads no tokens with a model
        for i, s in zip(todo, out):
            paths[i].scores = [float(v) for v in s]
            self.tokens_scored += 0 if free else paths[i].tokens
        self._note_scores(paths)

    def _note_scores(self, paths: list[_Path]) -> None:
        if self.tree is not None:
            for p in paths:
                if p.node >= 0 and p.scores:
                    self.tree[p.node]["score"] = reduce_steps(p.scores, self.cfg.search_agg)

    def _record(self, parent: _Path, child: _Path, kind: str) -> _Path:
        """Give `child` (parent + its last piece) a node of the recorded tree, when recording."""
        if self.tree is not None:
            c = child.pieces[-1]
            child.node = len(self.tree)
            self.tree.append({"id": child.node, "parent": parent.node, "text": c.text, "tokens": c.n_tokens,
                              "terminal": child.terminal, "kind": kind, "score": None})
        return child

    def expand(self, paths: list[_Path], counts: list[int]) -> list[list[_Path]]:
        """counts[i] sampled next actions (a step, or a mini-step) of paths[i], as child paths with terminal set."""
        cfg = self.cfg
        step = cfg.action == "step"
        width = cfg.step_tokens if step else cfg.ministep_tokens
        prefixes = [self.problem.prompt + p.text for p in paths]
        if len(set(counts)) == 1:
            out = self.generate(prefixes, counts[0], step, width)
        else:  # uneven shares: one request per sequence (prefix caching shares the prompt)
            flat = self.generate([pre for pre, k in zip(prefixes, counts) for _ in range(k)], 1, step, width)
            out, i = [], 0
            for k in counts:
                out.append([c[0] for c in flat[i: i + k]])
                i += k
        return [[self._child(p, c) for c in comps] for p, comps in zip(paths, out)]

    def _child(self, parent: _Path, c: Completion) -> _Path:
        cfg = self.cfg
        child = parent.extend(c, False)
        depth_limit = cfg.max_steps if cfg.action == "step" else math.ceil(cfg.max_tokens / cfg.ministep_tokens)
        if c.finish_reason == "error" or child.tokens >= cfg.max_tokens or len(child.pieces) >= depth_limit:
            child.terminal = True
        elif cfg.action == "step":
            # "stop" without the separator is the end of the turn; a step that states the answer ends it too
            child.terminal = (c.finish_reason == "stop" and not c.text.endswith(self.sep)) or _states_answer(c.text)
        else:
            child.terminal = c.finish_reason != "length"
        return self._record(parent, child, "step")

    def rollout(self, paths: list[_Path]) -> list[_Path]:
        """One sampled continuation of each path to the end of the solution."""
        if not paths:
            return []
        left = max(1, self.cfg.max_tokens - min(p.tokens for p in paths))
        out = self.generate([self.problem.prompt + p.text for p in paths], 1, False, left)
        return [self._record(p, p.extend(c[0], True), "rollout") for p, c in zip(paths, out)]

    def result(self, strategy: str, budget: int, chosen: _Path, answer: str | None, candidates: list[dict],
               meta: dict) -> SearchResult:
        scored = bool(chosen.scores)
        if self.tree is not None:
            meta = {**meta, "tree": self.tree, "chosen_node": chosen.node}
        return SearchResult(
            strategy=strategy, budget=budget, answer=answer, completion=chosen.text, steps=self.steps(chosen),
            step_scores=list(chosen.scores), score=reduce_steps(chosen.scores, self.cfg.agg) if scored else math.nan,
            tokens_generated=self.tokens_generated, tokens_scored=self.tokens_scored, sequences=self.sequences,
            generate_calls=self.generate_calls, score_calls=self.score_calls, candidates=candidates, meta=meta)


def _check_budget(name: str, budget: int) -> None:
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"{name}: budget must be an integer >= 1, got {budget!r}")

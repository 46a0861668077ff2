"""Test-time search (pure): aggregators over sampled answers, and search strategies over generate/score callables.

Aggregators (votes over answers, step scores reduced to one) are in `pipelines.votes`.

Strategies (`STRATEGIES[name](problem, generate, score, budget, cfg) -> SearchResult`) see the model only through
two callables, so they are tested with scripted ones and run unchanged on the real engine:

    generate(prefixes, n, stop_at_step, max_tokens, greedy=False) -> list[list[Completion]]
        n continuations of every prefix; a Completion's text continues its prefix. stop_at_step: end at the step
        separator (kept in the text). `engine_generate` adapts a VLLMGenerator (Ray actor or local instance).
    score(prompts, step_lists) -> list[list[float]]
        a score in [0, 1] per step of each (partial) solution: a PRM, an ORM behind `orm_as_step_scorer`
        (one score per solution), or CONFIDENCE (Marco-o1, from the token logprobs the search already holds).

Budgets, respected exactly (the ledger refuses a generate callable that returns another number of sequences):
    greedy      one sequence at temperature 0; budget must be 1
    majority    N = budget full samples, self-consistency vote (never calls score)
    best_of_n   N full samples, the best by the solution score (`cfg.agg` over step scores)
    weighted    N full samples, Math-Shepherd's sc+rm: the answer group with the largest summed solution score
    beam        every round samples exactly N = budget next steps spread over the live beams and keeps the top
                W = max(1, N // cfg.expansions) by the partial-path score (`cfg.search_agg`, default the last step's,
                "keep the top beams by r(z_t)"); beams that end leave the beam, the search stops when W have ended
    dvts        T = max(1, N // cfg.expansions) independent subtrees; each round a live subtree samples its share of N
                and keeps its single best child (DVTS: diverse verifier tree search)
    mcts        N = budget simulations of PUCT selection, expansion into cfg.expansions children (steps or mini-steps
                of cfg.ministep_tokens tokens) and backup; leaf value = the scorer on the child's path, or on one
                rollout to a terminal (cfg.mcts_value="rollout"). Answer: the most-visited path, finished with one
                rollout when it ends before a terminal (its tokens are counted)
    reflection  N = budget thoughts: one solution, then N-1 times the reflection cue and a continuation; the answer
                is the last one stated (never calls score)

Token accounting (SearchResult): tokens_generated = the engine's token counts of every sequence the strategy
received, kept or discarded; tokens_scored = the generated tokens of every (partial) solution sent to a learned
scorer, counted again each time it is sent (a PRM re-reads a beam's prefix every round; the question is not
counted). CONFIDENCE reads logprobs the engine already returned and scores 0 tokens.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pipelines.config import help_field
from pipelines.prompts import FORMATS, join_steps, separator, split_steps
from pipelines.votes import (AGGREGATE, argmax_group, best_index, default_equivalence, group_answers, reduce_steps,
                             vote_index)

REFLECTION_CUE = "Wait! Maybe I made some mistakes! I need to rethink from scratch."


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


class ConfidenceScorer:
    """Marco-o1 confidence as a scorer: each step gets the confidence (`pipelines.generate.confidence`: softmax of
    the chosen token's logprob against the top-k, averaged over the tokens) of the generated piece it ends in. A full
    sample is one piece, so every step gets the rollout's confidence v; in step search each step is its own piece.

    It needs the logprobs of the generated text, which only the search holds, so strategies recognise it
    (`reads_logprobs`) and compute it from their Completions; it costs no scorer tokens.
    """

    reads_logprobs = True
    name = "confidence"

    def __call__(self, prompts: list[str], step_lists: list[list[str]]) -> list[list[float]]:
        raise TypeError("CONFIDENCE scores from token logprobs: pass it as `score` to a search strategy, which "
                        "supplies the logprobs of the text it generated; it cannot score text alone")

    @staticmethod
    def score_pieces(pieces: Sequence[Completion], steps: Sequence[str]) -> list[float]:
        from pipelines.generate import confidence

        conf = []
        for c in pieces:
            v = confidence(c.top_logprobs, c.token_logprobs)
            if math.isnan(v):
                if c.n_tokens:
                    raise ValueError("CONFIDENCE needs token logprobs; the generate callable returned none "
                                     "(set logprobs > 0 in SearchConfig)")
                v = 0.0  # an empty piece (engine error) has no confidence
            conf.append(v)
        ends, total = [], 0
        for c in pieces:
            total += len(c.text)
            ends.append(total)
        text, pos, out = "".join(c.text for c in pieces), 0, []
        for s in steps:  # steps are stripped substrings of the text, in order
            i = text.find(s, pos)
            end = i + len(s) if i >= 0 else pos
            pos = end
            out.append(conf[min(bisect.bisect_left(ends, end), len(conf) - 1)])
        return out


CONFIDENCE = ConfidenceScorer()


def orm_as_step_scorer(score_outcome: Callable[[list[str], list[str]], list[float]], fmt: str = "lines"):
    """An outcome RM `score_outcome(prompts, completions) -> [score]` as a step scorer: one score per solution."""
    def score(prompts: list[str], step_lists: list[list[str]]) -> list[list[float]]:
        return [[float(v)] for v in score_outcome(prompts, [join_steps(s, fmt) for s in step_lists])]
    return score


def engine_generate(engine, cfg: SearchConfig) -> Callable[..., list[list[Completion]]]:
    """The `generate` callable over a VLLMGenerator: a Ray actor handle, a local instance, or anything with
    `.generate(prompts, sampling) -> [[completion dict]]`.

    Stops at a step with stop=[separator] and include_stop_str_in_output=True: vLLM drops the stop string from the
    text by default, and after the fact "stopped on the separator" cannot be told from "stopped at the end of the
    turn" (both finish with "stop"; the actor does not return vLLM's stop_reason), so the engine keeps it instead
    of us re-appending it. n_tokens is the length of the engine's token ids (they include the token that completed
    the stop string, so the count is what the engine generated).
    """
    remote = hasattr(getattr(engine, "generate", None), "remote")
    sep = separator(cfg.fmt)

    def generate(prefixes: list[str], n: int, stop_at_step: bool, max_tokens: int,
                 greedy: bool = False) -> list[list[Completion]]:
        params: dict[str, Any] = {"n": n, "max_tokens": max_tokens, "temperature": 0.0 if greedy else cfg.temperature,
                                  "top_p": 1.0 if greedy else cfg.top_p}
        if cfg.logprobs:
            params["logprobs"] = cfg.logprobs
        if stop_at_step:
            params.update(stop=[sep], include_stop_str_in_output=True)
        if remote:
            import ray

            out = ray.get(engine.generate.remote(list(prefixes), params))
        else:
            out = engine.generate(list(prefixes), params)
        return [[Completion(c["text"], len(c["token_ids"]), "error" if c["error"] else c["finish_reason"],
                            list(c["token_logprobs"] or []), [list(t) for t in c["top_logprobs"] or []])
                 for c in comps] for comps in out]

    return generate


# ----------------------------------------------------------------------------------------------------------
# Shared machinery: partial solutions, the ledger that counts every token, terminal tests
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Path:
    """A (partial) solution: the generated pieces after the prompt, in order."""
    pieces: tuple[Completion, ...] = ()
    terminal: bool = False
    scores: list[float] = field(default_factory=list)  # the scorer's step scores of this path (when scored)

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

    return extract_answer(text).method in ("boxed", "answer_is", "gsm8k", "answer_line")


def _spread(total: int, k: int) -> list[int]:
    """`total` split over k parts as evenly as possible, the first parts taking the remainder."""
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


class _Ledger:
    """Wraps generate/score for one search: checks shapes (budgets are exact) and counts every token."""

    def __init__(self, problem: SearchProblem, generate, score, cfg: SearchConfig):
        self.problem, self._generate, self._score, self.cfg = problem, generate, score, cfg
        self.sep = separator(cfg.fmt)
        self.tokens_generated = self.tokens_scored = self.sequences = self.generate_calls = self.score_calls = 0

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
        for i, s in zip(todo, out):
            paths[i].scores = [float(v) for v in s]
            self.tokens_scored += paths[i].tokens

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
        return child

    def rollout(self, paths: list[_Path]) -> list[_Path]:
        """One sampled continuation of each path to the end of the solution."""
        if not paths:
            return []
        left = max(1, self.cfg.max_tokens - min(p.tokens for p in paths))
        out = self.generate([self.problem.prompt + p.text for p in paths], 1, False, left)
        return [p.extend(c[0], True) for p, c in zip(paths, out)]

    def result(self, strategy: str, budget: int, chosen: _Path, answer: str | None, candidates: list[dict],
               meta: dict) -> SearchResult:
        scored = bool(chosen.scores)
        return SearchResult(
            strategy=strategy, budget=budget, answer=answer, completion=chosen.text, steps=self.steps(chosen),
            step_scores=list(chosen.scores), score=reduce_steps(chosen.scores, self.cfg.agg) if scored else math.nan,
            tokens_generated=self.tokens_generated, tokens_scored=self.tokens_scored, sequences=self.sequences,
            generate_calls=self.generate_calls, score_calls=self.score_calls, candidates=candidates, meta=meta)


def _check_budget(name: str, budget: int) -> None:
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"{name}: budget must be an integer >= 1, got {budget!r}")


def _pick_best(led: _Ledger, strategy: str, budget: int, finals: list[_Path], meta: dict) -> SearchResult:
    """The finished path with the best solution score (answers first, earliest on ties)."""
    answers = [_answer(p.text) for p in finals]
    scores = [reduce_steps(p.scores, led.cfg.agg) for p in finals]
    i = best_index(answers, scores)
    if i is None:  # no finished path states any answer: report the best-scored one
        i = max(range(len(finals)), key=lambda j: (scores[j], -j))
    cands = [{"answer": a, "score": s} for a, s in zip(answers, scores)]
    return led.result(strategy, budget, finals[i], answers[i], cands, meta)


# ----------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------

def search_greedy(problem: SearchProblem, generate, score, budget: int, cfg: SearchConfig) -> SearchResult:
    """One solution at temperature 0 (the budget-1 baseline)."""
    if budget != 1:
        raise ValueError(f"greedy: budget must be 1 (greedy decoding has one outcome), got {budget}")
    led = _Ledger(problem, generate, score, cfg)
    c = led.generate([problem.prompt], 1, False, cfg.max_tokens, greedy=True)[0][0]
    path = _Path((c,), True)
    answer = _answer(path.text)
    return led.result("greedy", budget, path, answer, [{"answer": answer, "score": math.nan}], {})


def _samples(led: _Ledger, budget: int) -> tuple[list[_Path], list[str | None]]:
    comps = led.generate([led.problem.prompt], budget, False, led.cfg.max_tokens)[0]
    paths = [_Path((c,), True) for c in comps]
    return paths, [_answer(p.text) for p in paths]


def search_majority(problem: SearchProblem, generate, score, budget: int, cfg: SearchConfig) -> SearchResult:
    """Self-consistency over N samples (answers grouped by equivalence)."""
    _check_budget("majority", budget)
    led = _Ledger(problem, generate, score, cfg)
    paths, answers = _samples(led, budget)
    groups = group_answers(answers, default_equivalence(problem.kind))
    g = argmax_group(groups, len)
    cands = [{"answer": a, "score": math.nan} for a in answers]
    return led.result("majority", budget, paths[g[0] if g else 0], answers[g[0]] if g else None, cands,
                      {"votes": sorted((len(g) for g in groups), reverse=True)})


def search_best_of_n(problem: SearchProblem, generate, score, budget: int, cfg: SearchConfig) -> SearchResult:
    """N samples, the one with the best solution score."""
    _check_budget("best_of_n", budget)
    led = _Ledger(problem, generate, score, cfg)
    paths, _ = _samples(led, budget)
    led.score(paths)
    return _pick_best(led, "best_of_n", budget, paths, {})


def search_weighted(problem: SearchProblem, generate, score, budget: int, cfg: SearchConfig) -> SearchResult:
    """N samples, weighted majority vote (sc+rm): the answer group with the largest summed solution score."""
    _check_budget("weighted", budget)
    led = _Ledger(problem, generate, score, cfg)
    paths, answers = _samples(led, budget)
    led.score(paths)
    scores = [reduce_steps(p.scores, cfg.agg) for p in paths]
    i = vote_index(answers, scores, kind=problem.kind)
    cands = [{"answer": a, "score": s} for a, s in zip(answers, scores)]
    return led.result("weighted", budget, paths[i or 0], answers[i] if i is not None else None, cands, {})


def search_beam(problem: SearchProblem, generate, score, budget: int, cfg: SearchConfig) -> SearchResult:
    """PRM-guided step-level beam search: N next steps per round over the live beams, keep the top W."""
    _check_budget("beam", budget)
    led = _Ledger(problem, generate, score, cfg)
    width = max(1, budget // cfg.expansions)
    active, finished, rounds = [_Path()], [], 0
    while active:
        rounds += 1
        kids = [k for group in led.expand(active, _spread(budget, len(active))) for k in group]
        led.score(kids)
        # sorted() is stable: equal scores keep generation order
        ranked = sorted(kids, key=lambda p: -reduce_steps(p.scores, cfg.search_agg))[: width - len(finished)]
        finished += [p for p in ranked if p.terminal]
        active = [p for p in ranked if not p.terminal]
    return _pick_best(led, "beam", budget, finished, {"width": width, "rounds": rounds, "per_round": budget})


def search_dvts(problem: SearchProblem, generate, score, budget: int, cfg: SearchConfig) -> SearchResult:
    """Diverse verifier tree search: T independent subtrees, each keeping its best child every round."""
    _check_budget("dvts", budget)
    led = _Ledger(problem, generate, score, cfg)
    n_trees = max(1, budget // cfg.expansions)
    share = _spread(budget, n_trees)
    heads: list[_Path] = [_Path() for _ in range(n_trees)]
    done: list[_Path | None] = [None] * n_trees
    rounds = 0
    while any(d is None for d in done):
        rounds += 1
        live = [t for t in range(n_trees) if done[t] is None]
        groups = led.expand([heads[t] for t in live], [share[t] for t in live])
        led.score([k for g in groups for k in g])
        for t, kids in zip(live, groups):
            best = max(kids, key=lambda p: reduce_steps(p.scores, cfg.search_agg))  # max keeps the first on ties
            if best.terminal:
                done[t] = best
            else:
                heads[t] = best
    return _pick_best(led, "dvts", budget, [d for d in done if d is not None],
                      {"subtrees": n_trees, "rounds": rounds, "per_round": share})


@dataclass
class _Node:
    path: _Path
    prior: float = 1.0
    value: float = 0.0  # the leaf estimate made when the node was created
    visits: int = 0
    total: float = 0.0
    children: list["_Node"] = field(default_factory=list)
    rollout: _Path | None = None  # mcts_value="rollout": the finished solution its value came from

    def q(self) -> float:
        return self.total / self.visits if self.visits else self.value


def _priors(pieces: list[Completion]) -> list[float]:
    """Softmax over siblings of the mean token logprob (length-normalised likelihood); uniform without logprobs."""
    means = [sum(c.token_logprobs) / len(c.token_logprobs) if c.token_logprobs else None for c in pieces]
    if any(m is None for m in means):
        return [1.0 / len(pieces)] * len(pieces)
    top = max(means)  # type: ignore[type-var]
    e = [math.exp(m - top) for m in means]  # type: ignore[operator]
    return [x / sum(e) for x in e]


def search_mcts(problem: SearchProblem, generate, score, budget: int, cfg: SearchConfig) -> SearchResult:
    """MCTS over reasoning steps (or mini-steps): PUCT selection, expansion into cfg.expansions children, leaf value
    from the scorer (or a rollout scored to its end), backup of the best new child's value along the path.

    Selection: argmax Q(c) + c_puct * P(c) * sqrt(N(parent)) / (1 + N(c)), Q(c) = mean backed-up value, or the
    child's own estimate before its first visit; P = `_priors`. Backing up the best child's value (not the mean)
    credits a node with the best continuation found below it, so a sound step is not averaged down by the
    wrong siblings sampled after it. Ties go to the earlier child.
    """
    _check_budget("mcts", budget)
    led = _Ledger(problem, generate, score, cfg)
    root = _Node(_Path())
    for _ in range(budget):
        node, trail = root, [root]
        while node.children and not node.path.terminal:
            sqrt_n = math.sqrt(node.visits)
            node = max(node.children, key=lambda c: c.q() + cfg.c_puct * c.prior * sqrt_n / (1 + c.visits))
            trail.append(node)
        if node.path.terminal:
            v = node.value
        else:
            kids = led.expand([node.path], [cfg.expansions])[0]
            priors = _priors([k.pieces[-1] for k in kids])
            node.children = [_Node(k, prior=p) for k, p in zip(kids, priors)]
            if cfg.mcts_value == "rollout":
                open_ = [c for c in node.children if not c.path.terminal]
                for c, r in zip(open_, led.rollout([c.path for c in open_])):
                    c.rollout = r
                judged = [c.rollout or c.path for c in node.children]
                led.score(judged)
                for c, j in zip(node.children, judged):
                    c.value = reduce_steps(j.scores, cfg.agg)
            else:
                led.score(kids)
                for c in node.children:
                    c.value = reduce_steps(c.path.scores, cfg.agg if c.path.terminal else cfg.search_agg)
            v = max(c.value for c in node.children)
        for n in trail:
            n.visits += 1
            n.total += v
    # the answer: follow the most-visited child (then the higher Q, then the earlier) down to a leaf
    node = root
    while node.children:
        node = max(node.children, key=lambda c: (c.visits, c.q()))
    if node.path.terminal:
        final = node.path
    elif node.rollout is not None:
        final = node.rollout
    else:
        final = led.rollout([node.path])[0]
        led.score([final])
    meta = {"simulations": budget, "root_visits": [c.visits for c in root.children],
            "root_values": [round(c.q(), 4) for c in root.children], "depth": len(node.path.pieces)}
    answer = _answer(final.text)
    return led.result("mcts", budget, final, answer, [{"answer": answer, "score": reduce_steps(final.scores, cfg.agg)}],
                      meta)


def search_reflection(problem: SearchProblem, generate, score, budget: int, cfg: SearchConfig) -> SearchResult:
    """Self-reflection: a solution, then budget-1 times the reflection cue and a continuation (the cue's tokens are
    given, not generated, so they are not counted). Stops early when the engine reports the context is full."""
    _check_budget("reflection", budget)
    led = _Ledger(problem, generate, score, cfg)
    text, pieces, rounds = "", [], 0
    for r in range(budget):
        if r:
            text = text.rstrip() + "\n" + cfg.reflection_cue + "\n"
        c = led.generate([problem.prompt + text], 1, False, cfg.max_tokens)[0][0]
        rounds += 1
        pieces.append(c)
        text += c.text
        if c.finish_reason == "error":
            break
    path = _Path((Completion(text, sum(c.n_tokens for c in pieces), pieces[-1].finish_reason),), True)
    answer = _answer(text)
    return led.result("reflection", budget, path, answer, [{"answer": answer, "score": math.nan}],
                      {"rounds": rounds, "answers": [_answer(c.text) for c in pieces]})


STRATEGIES = {
    "greedy": search_greedy,
    "majority": search_majority,
    "best_of_n": search_best_of_n,
    "weighted": search_weighted,
    "beam": search_beam,
    "dvts": search_dvts,
    "mcts": search_mcts,
    "reflection": search_reflection,
}
SCORED = {"best_of_n", "weighted", "beam", "dvts", "mcts"}  # strategies that call the scorer

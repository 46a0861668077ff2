"""Monte-Carlo tree search over reasoning steps (pure): `search_mcts`, one of `pipelines.search.STRATEGIES`.

PUCT selection, expansion into cfg.expansions children (steps, or mini-steps of cfg.ministep_tokens tokens), a leaf
value from the scorer (or from one rollout scored to its end) and backup; the budget is the number of simulations.
The model is reached only through the ledger of `pipelines.search_ledger`, like every other strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipelines.search_ledger import (Completion, SearchConfig, SearchProblem, SearchResult, _answer, _check_budget,
                                     _Ledger, _Path)
from pipelines.votes import reduce_steps


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

"""Test-time search (pure): aggregators over sampled answers, and search strategies over generate/score callables.

Aggregators (votes over answers, step scores reduced to one) are in `pipelines.votes`.
The types every strategy shares and the ledger that counts its tokens are in `pipelines.search_ledger`; MCTS is
in `pipelines.search_mcts`.

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
    revise      up to N = budget attempts: a solution, then while the verifier scores the latest below
                cfg.revise_threshold, a revision written with the attempt and cfg.revise_cue as context; the answer
                is the best-scored attempt (learning to correct; a generator trained on correction pairs)

Token accounting (SearchResult): tokens_generated = the engine's token counts of every sequence the strategy
received, kept or discarded; tokens_scored = the generated tokens of every (partial) solution sent to a learned
scorer, counted again each time it is sent (a PRM re-reads a beam's prefix every round; the question is not
counted). CONFIDENCE reads logprobs the engine already returned and scores 0 tokens.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Callable, Sequence

from pipelines.prompts import join_steps, separator
from pipelines.search_ledger import (Completion, SearchConfig, SearchProblem, SearchResult, _answer, _check_budget,
                                     _Ledger, _Path, revision_prompt)
from pipelines.search_mcts import search_mcts
from pipelines.votes import argmax_group, best_index, default_equivalence, group_answers, reduce_steps, vote_index


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


class StepChecksScorer:
    """The arithmetic step checks (`verify.check_steps`) as a verifier that needs no model and no gold answer: a
    calculator over the solution. A step scores 1 while every claim in it and before it holds over known operands
    (the numbers the question states, `verify.question_numbers`, and results computed earlier) and any answer it
    states is such a value; 0 from the first step that fails. The last step's score is then multiplied by the
    coverage (`verify.coverage`): the share of the numbers the question writes in digits that the solution computes
    with, so a solution that skips a given quantity (a two-step problem answered in one step) scores below one that
    uses them all. It reads the numbers from the question it is given (a search passes its problem's question as the
    prompts), so it needs nothing a served request lacks.

    What it cannot see: a true computation with the wrong operation ("23 - 5 = 18" where the question says "5 times
    as many") and prose steps with no arithmetic both pass; a distractor number in the question costs a right
    solution its coverage. It scores no tokens (`model_free`). Written here rather
    than taken from a library: the checks are the project's own ground truth for synthetic problems
    (`pipelines.verify.step_check`), used without the gold answer.
    """

    model_free = True
    name = "checks"

    def __call__(self, prompts: list[str], step_lists: list[list[str]]) -> list[list[float]]:
        from pipelines.verify import check_steps, coverage, question_numbers

        out = []
        for question, steps in zip(prompts, step_lists):
            ok = check_steps(list(steps), question_numbers(question), answer_computed=True)
            first = next((i for i, o in enumerate(ok) if not o), len(ok))
            scores = [1.0 if i < first else 0.0 for i in range(len(steps))]
            if scores:
                scores[-1] *= coverage(steps, question)
            out.append(scores)
        return out


CHECKS = StepChecksScorer()


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
    calls = [0]  # sampled engine calls made so far (a seeded search's k-th call samples from seed + 1000 k)

    def generate(prefixes: list[str], n: int, stop_at_step: bool, max_tokens: int,
                 greedy: bool = False) -> list[list[Completion]]:
        params: dict[str, Any] = {"n": n, "max_tokens": max_tokens, "temperature": 0.0 if greedy else cfg.temperature,
                                  "top_p": 1.0 if greedy else cfg.top_p}
        if cfg.logprobs:
            params["logprobs"] = cfg.logprobs
        if cfg.seed is not None and not greedy:
            # vLLM gives the i-th of n samples seed + i; spacing calls by 1,000 keeps every sample's seed distinct
            params["seed"] = cfg.seed + 1000 * calls[0]
            calls[0] += 1
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


def _spread(total: int, k: int) -> list[int]:
    """`total` split over k parts as evenly as possible, the first parts taking the remainder."""
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


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


def search_revise(problem: SearchProblem, generate, score, budget: int, cfg: SearchConfig) -> SearchResult:
    """Learning to correct, at test time: a solution, scored; while its score is below `revise_threshold` and
    attempts remain (budget = most attempts), the generator revises it (`revision_prompt`: the attempt and the
    revise cue as context) and the revision is scored. The answer is the best-scored attempt (the one that satisfied
    the verifier, if any did). Meant for a generator trained on correction pairs (`stepray train sft
    select.corrections=N`); any generator runs it."""
    _check_budget("revise", budget)
    led = _Ledger(problem, generate, score, cfg)
    c = led.generate([problem.prompt], 1, False, cfg.max_tokens)[0][0]
    attempts = [_Path((c,), True)]
    led.score(attempts)
    while len(attempts) < budget and c.finish_reason != "error" and \
            reduce_steps(attempts[-1].scores, cfg.agg) < cfg.revise_threshold:
        c = led.generate([revision_prompt(problem.prompt, attempts[-1].text, cfg.revise_cue)], 1, False,
                         cfg.max_tokens)[0][0]
        attempts.append(_Path((c,), True))
        led.score(attempts[-1:])
    return _pick_best(led, "revise", budget, attempts,
                      {"attempts": len(attempts), "scores": [reduce_steps(p.scores, cfg.agg) for p in attempts]})


STRATEGIES = {
    "greedy": search_greedy,
    "majority": search_majority,
    "best_of_n": search_best_of_n,
    "weighted": search_weighted,
    "beam": search_beam,
    "dvts": search_dvts,
    "mcts": search_mcts,
    "reflection": search_reflection,
    "revise": search_revise,
}
SCORED = {"best_of_n", "weighted", "beam", "dvts", "mcts", "revise"}  # strategies that call the scorer

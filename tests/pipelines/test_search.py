"""Search: aggregator tables with hand-derived answers, strategies over scripted generate/score callables where the
right path is known, and every strategy on the real vLLM engine (tiny model) with its token counts checked against
the engine's own."""

import math
from collections import Counter

import pytest

from pipelines.search import (CHECKS, CONFIDENCE, STRATEGIES, Completion, SearchConfig, SearchProblem, engine_generate,
                              orm_as_step_scorer)
from pipelines.search_ledger import REFLECTION_CUE
from pipelines.votes import (best_index, best_of_n, group_answers, majority_vote, reduce_steps, vote_index,
                             weighted_majority_vote)

HALF = ["1/2", "0.5", "\\frac{1}{2}"]


# ---------------------------------------------------------------------------------------------- aggregators

@pytest.mark.parametrize("answers, kind, expected", [
    (["1/2", "0.5", "\\frac{1}{2}", "3", "3"], "math", "1/2"),  # 3 votes (one group, three spellings) beat 2
    (["3", "3", "1/2", "0.5", "\\frac{1}{2}"], "math", "1/2"),  # the group's first member is returned
    (["0.5", "3", "\\frac{1}{2}", "3"], "math", "0.5"),  # 2-2 tie: the group seen first wins
    (["3", "0.5", "\\frac{1}{2}", "3"], "math", "3"),  # 2-2 tie, other order
    (["7", "7.0", "8", "8", "8"], "numeric", "8"),
    (["7", "7.0", "07", "8", "8"], "numeric", "7"),  # 7 = 7.0 = 07
    ([None, None, "5"], "numeric", "5"),  # None is no vote
    ([None, None], "numeric", None),
    ([], "math", None),
    # LaTeX spellings of one value group under "math" (the Serve default), not under "numeric"
    (["\\frac{\\sqrt{2}}{2}", "1", "\\sqrt{2}/2", "\\tfrac{\\sqrt2}{2}", "1"], "math", "\\frac{\\sqrt{2}}{2}"),
    (["\\frac{\\sqrt{2}}{2}", "1", "\\sqrt{2}/2", "\\tfrac{\\sqrt2}{2}", "1"], "numeric", "1"),
])
def test_majority_vote_table(answers, kind, expected):
    assert majority_vote(answers, kind=kind) == expected


def test_equivalent_spellings_fall_into_one_group():
    from pipelines.verify import answers_equivalent

    assert group_answers(HALF + ["2", "1/2"], lambda a, b: answers_equivalent(a, b, "math")) == [[0, 1, 2, 4], [3]]


@pytest.mark.parametrize("answers, scores, expected", [
    (["1/2", "0.5", "3"], [0.2, 0.2, 0.9], "3"),  # 0.9 > 0.2 + 0.2
    (["1/2", "0.5", "3"], [0.3, 0.3, 0.5], "1/2"),  # 0.6 > 0.5 (majority of a weaker group wins on the sum)
    (["3", "\\frac{1}{2}", "0.5"], [0.5, 0.25, 0.25], "\\frac{1}{2}"),  # 0.5 = 0.5 tie: the larger group
    (["\\frac{1}{2}", "3", "0.5"], [0.25, 0.5, 0.25], "\\frac{1}{2}"),  # same tie, other order
    (["3", "4", "4"], [1.0, 0.5, 0.5], "4"),  # 1.0 = 1.0: the group of two samples, though one came first
    (["3", "4", "5"], [0.0, 0.0, 0.0], "3"),  # a full tie (equal sums, equal sizes): first-seen group
    (["3", "4", "4"], [0.0, 0.0, 0.0], "4"),  # a 0/1 verifier that passes none: the count decides
    ([None, "4"], [0.9, 0.1], "4"),
])
def test_weighted_majority_vote_table(answers, scores, expected):
    assert weighted_majority_vote(answers, scores, kind="math") == expected


@pytest.mark.parametrize("answers, scores, expected, index", [
    (["a", "b", "c"], [0.1, 0.7, 0.3], "b", 1),
    (["a", "b", "c"], [0.7, 0.7, 0.3], "a", 0),  # tie: earliest
    ([None, "b"], [0.9, 0.2], "b", 1),  # None never wins, whatever its score
    ([None], [0.9], None, None),
])
def test_best_of_n_table(answers, scores, expected, index):
    assert best_of_n(answers, scores) == expected
    assert best_index(answers, scores) == index


@pytest.mark.parametrize("how, expected", [("min", 0.2), ("last", 0.5), ("prod", 0.9 * 0.2 * 0.5)])
def test_reduce_steps_table(how, expected):
    assert reduce_steps([0.9, 0.2, 0.5], how) == pytest.approx(expected)
    assert reduce_steps([], how) == 0.0
    assert reduce_steps([0.9, math.nan, 0.2, 0.5], how) == pytest.approx(expected)  # unread steps left out
    assert reduce_steps([math.nan], how) == 0.0


def test_aggregators_reject_mismatched_lengths_and_unknown_reduction():
    with pytest.raises(ValueError, match="2 answers but 1 scores"):
        best_of_n(["a", "b"], [0.1])
    with pytest.raises(ValueError, match="2 answers but 3 scores"):
        weighted_majority_vote(["a", "b"], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="not one of min, last, prod"):
        reduce_steps([0.1], "mean")


def test_vote_index_returns_the_representative():
    assert vote_index(["3", "0.5", "1/2"], kind="math") == 1  # 2 votes for one half
    assert vote_index(["3", "0.5", "1/2"], [0.9, 0.4, 0.4], kind="math") == 0  # 0.9 > 0.8
    assert vote_index(["3", "0.5", "1/2"], [0.7, 0.4, 0.4], kind="math") == 1  # 0.8 > 0.7


# ------------------------------------------------------------------------------ scripted world (pure logic)

PROMPT = "<question: Ann has 3 apples, buys 4 more, then doubles them. How many?>\n"
RIGHT = {"3 + 4 = 7", "7 * 2 = 14", "The answer is 14."}


class ScriptedWorld:
    """A scripted stand-in for the engine (unit tests of search logic only). The next step from a state is drawn
    round-robin from a fixed list per state, three wrong options before the right one, so a single sample goes wrong
    3 times in 4 while the right step is among any 4 consecutive samples of a state. A token is a word."""

    def __init__(self):
        self.counters: Counter = Counter()
        self.tokens = self.sequences = 0
        self.calls: list[tuple[int, int, bool, int]] = []  # (prefixes, n, stop_at_step, max_tokens)

    @staticmethod
    def options(steps: tuple[str, ...]) -> list[str]:
        if not steps:
            return ["3 + 4 = 8", "3 + 4 = 8", "3 + 4 = 8", "3 + 4 = 7"]
        x = int(steps[-1].split("=")[-1].strip().rstrip("."))
        if len(steps) == 1:
            return [f"{x} * 2 = {2 * x + 1}"] * 3 + [f"{x} * 2 = {2 * x}"]
        return [f"The answer is {x}."]

    def next_step(self, steps: tuple[str, ...]) -> str:
        opts = self.options(steps)
        k = self.counters[steps]
        self.counters[steps] += 1
        return opts[k % len(opts)]

    def one(self, prefix: str, stop_at_step: bool, max_tokens: int) -> Completion:
        assert prefix.startswith(PROMPT)
        # the reflection cue means "rethink from scratch": the state restarts after it
        steps = tuple(s for s in prefix[len(PROMPT):].split(REFLECTION_CUE)[-1].split("\n") if s)
        words: list[str] = []
        text = ""
        while True:
            step = self.next_step(steps)
            final = step.startswith("The answer")
            piece = step if final else step + "\n"
            if len(words) + len(step.split()) > max_tokens:  # cut at the token limit
                take = step.split()[: max_tokens - len(words)]
                return Completion(text + " ".join(take), len(words) + len(take), "length")
            words += step.split()
            text += piece
            steps += (step,)
            if final or stop_at_step:
                return Completion(text, len(words), "stop")

    def generate(self, prefixes, n, stop_at_step, max_tokens, greedy=False):
        self.calls.append((len(prefixes), n, stop_at_step, max_tokens))
        out = [[self.one(p, stop_at_step, max_tokens) for _ in range(n)] for p in prefixes]
        self.tokens += sum(c.n_tokens for comps in out for c in comps)
        self.sequences += sum(len(c) for c in out)
        return out


class ScriptedPRM:
    """A scripted stand-in for a PRM: 0.95 for a step on the right path, 0.1 otherwise; counts the words it reads."""

    def __init__(self):
        self.tokens = 0

    def __call__(self, prompts, step_lists):
        assert all(p == PROBLEM.question for p in prompts)
        self.tokens += sum(len(s.split()) for steps in step_lists for s in steps)
        return [[0.95 if s in RIGHT else 0.1 for s in steps] for steps in step_lists]


PROBLEM = SearchProblem(prompt=PROMPT, question="Ann has 3 apples...", kind="numeric")
CFG = SearchConfig(max_tokens=64, step_tokens=16, max_steps=6, expansions=4)


def run(name, budget, cfg=CFG):
    world, prm = ScriptedWorld(), ScriptedPRM()
    res = STRATEGIES[name](PROBLEM, world.generate, prm, budget, cfg)
    # exact accounting: the ledger's counts equal what the scripted engine produced and the scripted PRM read
    assert res.tokens_generated == world.tokens and res.sequences == world.sequences
    assert res.tokens_scored == prm.tokens
    assert res.generate_calls == len(world.calls)
    return res, world, prm


def test_scripted_world_single_samples_go_wrong():
    # hand-derived: samples 1-4 from the root follow (8,17), (8,17), (8,17), (7,15): no right answer among 4
    res, world, prm = run("majority", 4)
    assert [c["answer"] for c in res.candidates] == ["17", "17", "17", "15"]
    assert res.answer == "17" and res.meta["votes"] == [3, 1]
    assert world.calls == [(1, 4, False, 64)] and prm.tokens == 0 and res.score_calls == 0
    assert res.tokens_generated == 4 * (5 + 5 + 4)


def test_greedy_takes_one_sequence_and_refuses_a_larger_budget():
    res, world, _ = run("greedy", 1)
    assert res.answer == "17" and world.calls == [(1, 1, False, 64)]
    with pytest.raises(ValueError, match="budget must be 1"):
        STRATEGIES["greedy"](PROBLEM, ScriptedWorld().generate, None, 2, CFG)


def test_best_of_n_and_weighted_pick_by_scores():
    # hand-derived, 16 samples: every 4th sample takes 3 + 4 = 7 and then 7 * 2 = 15, 15, 15, 14; the others take
    # 3 + 4 = 8 and then 17, 17, 17, 16 in turn. Answers: 17 x9, 16 x3, 15 x3, 14 x1 (the last sample).
    res, world, prm = run("best_of_n", 16)
    assert [c["answer"] for c in res.candidates].count("17") == 9 and res.candidates[-1]["answer"] == "14"
    assert res.answer == "14" and res.score == pytest.approx(0.95)  # the only sample with min score 0.95
    assert res.step_scores == [0.95, 0.95, 0.95]
    assert res.tokens_scored == res.tokens_generated  # every sample scored once
    w, _, _ = run("weighted", 16)
    assert w.answer == "14"  # summed min scores: 14 -> 0.95 beats 17 -> 9 x 0.1 = 0.9
    assert run("majority", 16)[0].answer == "17"
    assert run("weighted", 8)[0].answer == "17"  # 8 samples hold no 14: 17 -> 0.6, 15 -> 0.2, 16 -> 0.1


@pytest.mark.parametrize("budget, width", [(4, 1), (8, 2), (16, 4)])
def test_beam_search_finds_the_right_path_with_exact_budget(budget, width):
    res, world, prm = run("beam", budget)
    assert res.answer == "14" and res.steps == ["3 + 4 = 7", "7 * 2 = 14", "The answer is 14."]
    assert res.meta["width"] == width
    # every round asks for exactly `budget` next steps, however they are spread over the beams
    assert [p * n for p, n, _, _ in world.calls] == [budget] * res.meta["rounds"]
    assert all(stop for _, _, stop, _ in world.calls)
    assert res.tokens_scored > res.tokens_generated  # prefixes are re-read by the PRM each round


def test_beam_search_with_budget_one_is_a_single_sampled_path():
    res, world, _ = run("beam", 1)
    assert [(p, n) for p, n, _, _ in world.calls] == [(1, 1)] * 3
    assert res.answer == "17"  # the first option at each state


def test_dvts_subtrees_are_independent_and_find_the_right_path():
    res, world, _ = run("dvts", 8)
    assert res.meta["subtrees"] == 2 and res.answer == "14"
    assert [(p, n) for p, n, _, _ in world.calls] == [(2, 4)] * res.meta["rounds"]
    assert [c["answer"] for c in res.candidates] == ["14", "14"]


def test_mcts_prefers_the_right_step_and_runs_exactly_budget_simulations():
    res, world, _ = run("mcts", 6)
    assert res.meta["simulations"] == 6 and res.answer == "14"
    visits = res.meta["root_visits"]
    # root children in generation order: 8, 8, 8, 7 -> the right step (index 3) has the most visits
    assert visits.index(max(visits)) == 3 and visits[3] >= 4
    # one expansion of 4 children per simulation that reached an open leaf (simulations on a finished path expand
    # nothing), and no final rollout since the most-visited path ends in a terminal
    assert all(c == (1, 4, True, 16) for c in world.calls) and len(world.calls) <= 6


def test_mcts_with_rollout_values_and_ministeps_counts_every_token():
    cfg = SearchConfig(max_tokens=64, step_tokens=16, max_steps=6, expansions=2, mcts_value="rollout")
    res, world, prm = run("mcts", 3, cfg)
    # hand-derived: with 2 expansions the root's children are its first two samples, both "3 + 4 = 8", so every
    # path (and every rollout from it) ends in 17; one simulation expands the root, the other two visit a child each
    assert res.meta["simulations"] == 3 and res.answer == "17" and res.meta["root_visits"] == [1, 1]
    expansions = [c for c in world.calls if c[2]]
    rollouts = [c for c in world.calls if not c[2]]
    assert expansions and all(c[:2] == (1, 2) for c in expansions)
    assert rollouts and all(c[1] == 1 for c in rollouts)  # one rollout per open child, to the end
    # mini-steps of 5 tokens (a scripted step is 5 words, so a mini-step here ends on a line)
    cfg = SearchConfig(max_tokens=24, expansions=2, action="ministep", ministep_tokens=5)
    res, world, prm = run("mcts", 4, cfg)
    assert res.meta["simulations"] == 4
    # one 2-child expansion per simulation, no final rollout: the most-visited path reaches the answer step
    assert world.calls == [(1, 2, False, 5)] * 4
    assert res.completion.endswith("The answer is 17.") and res.meta["depth"] == 3


@pytest.mark.parametrize("name, budget", [("beam", 8), ("dvts", 8), ("mcts", 6)])
def test_record_tree_keeps_every_node_the_search_generated(name, budget):
    """search.record_tree: one node per sequence the engine returned (expansions and rollouts), each naming its
    parent (created before it), with the step text and tokens the engine gave and the search score of the
    scored ones; the chosen node's chain from the root spells the chosen completion. Off by default."""
    cfg = SearchConfig(max_tokens=64, step_tokens=16, max_steps=6, expansions=4, record_tree=True)
    res, world, _ = run(name, budget, cfg)
    tree = res.meta["tree"]
    assert len(tree) == world.sequences and sum(n["tokens"] for n in tree) == world.tokens
    assert [n["id"] for n in tree] == list(range(len(tree)))
    assert all(-1 <= n["parent"] < n["id"] for n in tree)
    assert all(n["score"] is not None for n in tree if n["kind"] == "step")  # these searches score every child
    chain, i = [], res.meta["chosen_node"]
    while i != -1:
        chain.append(tree[i])
        i = tree[i]["parent"]
    assert "".join(n["text"] for n in reversed(chain)) == res.completion and chain[0]["terminal"]
    assert "tree" not in run(name, budget)[0].meta


def test_beam_tree_linearises_into_a_stream_with_backtracks_at_each_depth():
    """The tree of a beam search (budget 8, width 2: the root's 8 children hold two right first steps, each right
    step's 4 children one right second step) as a stream-of-search target: dead ends are taken one depth at a time,
    each distinct one once: the wrong first step (cut where the step checks fail it, then "Back to the start"), the
    wrong second step (then "Back to step 1" and step 1 again); the verified path follows verbatim, so the stream
    grades right. Branches that finished right are never dead ends; a chosen path that fails the step checks
    gives no stream."""
    from pipelines.train.data import BACKTRACK, BACKTRACK_TO, tree_stream
    from pipelines.verify import grade

    cfg = SearchConfig(max_tokens=64, step_tokens=16, max_steps=6, expansions=4, record_tree=True)
    res, _, _ = run("beam", 8, cfg)
    problem = {"id": "p", "answer": "14", "kind": "numeric", "quantities": [3.0, 4.0, 2.0]}
    text, why = tree_stream(res.meta["tree"], res.meta["chosen_node"], problem, k=3)
    back1 = BACKTRACK_TO.format(n=1)
    assert text == (f"3 + 4 = 8\n{BACKTRACK}\n3 + 4 = 7\n"
                    f"7 * 2 = 15\n{back1}\n3 + 4 = 7\n7 * 2 = 14\nThe answer is 14.")
    assert grade(text, "14").correct
    # the other right first step's branch reached the answer: not a dead end; the other wrong ones repeat these
    assert why["finished_right_or_unanswered"] >= 1 and why["repeated_dead_end"] == 5 + 2
    assert tree_stream(res.meta["tree"], res.meta["chosen_node"], problem, k=1)[0] == \
        f"3 + 4 = 8\n{BACKTRACK}\n3 + 4 = 7\n7 * 2 = 14\nThe answer is 14."
    assert tree_stream(res.meta["tree"], res.meta["chosen_node"], {**problem, "answer": "15"}, k=3) == \
        (None, {"path_fails_step_checks": 1})
    # no checks (a non-synthetic problem): only branches that finished on a wrong answer are dead ends; here none
    text, why = tree_stream(res.meta["tree"], res.meta["chosen_node"], {"answer": "14", "kind": "numeric"}, k=3)
    assert text is None and why["no_dead_end"] == 1


def test_reflection_appends_the_cue_and_continues():
    res, world, _ = run("reflection", 3)
    assert res.completion.count("Wait! Maybe I made some mistakes! I need to rethink from scratch.") == 2
    assert [(p, n) for p, n, _, _ in world.calls] == [(1, 1)] * 3
    assert res.meta["rounds"] == 3 and res.answer == res.meta["answers"][-1]


def test_ledger_refuses_a_generate_that_breaks_the_budget():
    def short(prefixes, n, stop_at_step, max_tokens, greedy=False):  # scripted: returns one sequence too few
        return [[Completion("The answer is 1.", 4, "stop")] * (n - 1) for _ in prefixes]

    with pytest.raises(ValueError, match="must return n per prefix"):
        STRATEGIES["majority"](PROBLEM, short, None, 3, CFG)


def test_scored_strategy_without_a_scorer_says_so():
    with pytest.raises(ValueError, match="needs a score callable"):
        STRATEGIES["best_of_n"](PROBLEM, ScriptedWorld().generate, None, 2, CFG)


def test_confidence_scorer_maps_pieces_to_steps():
    lp = math.log
    a = Completion("a\n", 1, "stop", [lp(0.5)], [[lp(0.5), lp(0.3), lp(0.2)]])
    b = Completion("b\nc\n", 2, "stop", [lp(0.2), lp(0.6)], [[lp(0.5), lp(0.3), lp(0.2)], [lp(0.6), lp(0.4)]])
    assert CONFIDENCE.score_pieces([a, b], ["a", "b", "c"]) == pytest.approx([0.5, 0.4, 0.4])
    with pytest.raises(TypeError, match="token logprobs"):
        CONFIDENCE(["q"], [["a"]])
    with pytest.raises(ValueError, match="needs token logprobs"):
        CONFIDENCE.score_pieces([Completion("x", 1, "stop")], ["x"])


def test_strategies_run_with_the_confidence_scorer_at_no_scorer_cost():
    class WithLogprobs(ScriptedWorld):  # scripted: every token gets probability 0.5 among top-2 (0.5, 0.25)
        def one(self, prefix, stop_at_step, max_tokens):
            c = super().one(prefix, stop_at_step, max_tokens)
            return Completion(c.text, c.n_tokens, c.finish_reason, [math.log(0.5)] * c.n_tokens,
                              [[math.log(0.5), math.log(0.25)]] * c.n_tokens)

    for name in ("best_of_n", "weighted", "beam", "dvts", "mcts"):
        world = WithLogprobs()
        res = STRATEGIES[name](PROBLEM, world.generate, CONFIDENCE, 4, CFG)
        assert res.tokens_scored == 0 and res.score_calls == 0 and res.tokens_generated == world.tokens
        assert res.step_scores and all(s == pytest.approx(2 / 3) for s in res.step_scores)


def test_step_checks_scorer_picks_the_sample_whose_arithmetic_holds_at_no_scorer_cost():
    """CHECKS reads the question's numbers (3, 4, and 2 from "doubles") and scores 1 up to the first step whose
    arithmetic is false, uses a number neither given nor computed, or states an answer not computed; 0 after; the
    last step's score is scaled by the share of the question's digit numbers the solution computes with.
    Scripted 16 samples (see test_best_of_n_and_weighted_pick_by_scores): only the last one, 3 + 4 = 7, 7 * 2 = 14,
    passes, so best_of_n and weighted pick 14 where majority says 17; at 4 samples none passes and the weighted vote
    falls back to the count (17), where the first-seen rule of ties would have said the same only by order."""
    question = "Ann has 3 apples, buys 4 more, then doubles them. How many?"
    assert CHECKS([question] * 5, [["3 + 4 = 7", "7 * 2 = 14", "The answer is 14."],
                                   ["3 + 4 = 8", "8 * 2 = 16", "The answer is 16."],
                                   ["3 + 4 = 7", "7 * 5 = 35", "The answer is 35."],
                                   ["3 + 4 = 7", "The answer is 15."],
                                   ["3 * 2 = 6", "The answer is 6."]]) == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0],
                                                                          [1.0, 0.0, 0.0], [1.0, 0.0], [1.0, 0.5]]
    # the last: true arithmetic, but the 4 the question gives is never used (coverage 1/2 on the last step)
    problem = SearchProblem(prompt=PROMPT, question=question, kind="numeric")
    for name, budget, answer in (("best_of_n", 16, "14"), ("weighted", 16, "14"), ("weighted", 4, "17")):
        world = ScriptedWorld()
        res = STRATEGIES[name](problem, world.generate, CHECKS, budget, CFG)
        assert res.answer == answer, (name, budget)
        assert res.tokens_scored == 0 and res.score_calls == 1 and res.tokens_generated == world.tokens
    res = STRATEGIES["beam"](problem, ScriptedWorld().generate, CHECKS, 4, CFG)
    assert res.answer == "14" and res.step_scores == [1.0, 1.0, 1.0]  # step search keeps the beams that check out


def test_orm_as_step_scorer_gives_one_score_per_solution():
    seen = []

    def score_outcome(prompts, completions):  # scripted ORM
        seen.extend(completions)
        return [0.25 * len(c.splitlines()) for c in completions]

    s = orm_as_step_scorer(score_outcome, "lines")
    assert s(["q", "q"], [["a", "b"], ["c"]]) == [[0.5], [0.25]]
    assert seen == ["a\nb\n", "c\n"]
    res = STRATEGIES["best_of_n"](PROBLEM, ScriptedWorld().generate, s, 4, CFG)
    assert len(res.step_scores) == 1


def test_engine_adapter_sampling_params_and_token_counts():
    class ScriptedEngine:  # scripted stand-in with VLLMGenerator's local interface
        def __init__(self):
            self.params = []

        def generate(self, prompts, sampling):
            self.params.append(sampling)
            return [[{"text": "1 + 1 = 2\n", "token_ids": [5, 6, 7, 8], "finish_reason": "stop", "error": "",
                      "token_logprobs": [-0.1] * 4, "top_logprobs": [[-0.1, -2.0]] * 4}] * sampling["n"]
                    for _ in prompts]

    eng = ScriptedEngine()
    gen = engine_generate(eng, SearchConfig(fmt="paragraphs", temperature=0.9, logprobs=3))
    out = gen(["p1", "p2"], 2, True, 32)
    assert [len(c) for c in out] == [2, 2] and out[0][0].n_tokens == 4 and out[0][0].text == "1 + 1 = 2\n"
    assert eng.params[0] == {"n": 2, "max_tokens": 32, "temperature": 0.9, "top_p": 1.0, "logprobs": 3,
                             "stop": ["\n\n"], "include_stop_str_in_output": True}
    gen(["p"], 1, False, 8, greedy=True)
    assert eng.params[1]["temperature"] == 0.0 and "stop" not in eng.params[1]
    assert "seed" not in eng.params[0]  # unseeded: the engine's own random state
    # seeded: each sampled call of the search draws from its own seed (vLLM adds the sample index within a call)
    eng = ScriptedEngine()
    gen = engine_generate(eng, SearchConfig(seed=7))
    gen(["p"], 4, False, 8)
    gen(["p"], 1, False, 8, greedy=True)
    gen(["p"], 2, True, 8)
    assert [p.get("seed") for p in eng.params] == [7, None, 1007]


# ------------------------------------------------------------------------------------ the real engine (tiny)

@pytest.fixture(scope="module")
def engine(ray_session, tiny_model):
    from actors.vllm_generator import VLLMGenerator

    actor = ray_session.remote(num_cpus=1)(VLLMGenerator).remote(
        tiny_model, {"max_model_len": 512, "gpu_memory_utilization": 0.05}, {"max_tokens": 16}, 2, "tiny")
    ray_session.get(actor.ready.remote())
    yield actor
    ray_session.kill(actor)


@pytest.fixture(scope="module")
def tiny_problem(tiny_model):
    from transformers import AutoTokenizer

    from pipelines.synthetic import SyntheticConfig, synthetic_problem
    from pipelines.prompts import PromptConfig, render

    p = synthetic_problem(SyntheticConfig(), 0)
    return SearchProblem(render(AutoTokenizer.from_pretrained(tiny_model), p["question"], "numeric", PromptConfig()),
                         p["question"], "numeric")


class RecordingEngine:
    """The real engine actor behind VLLMGenerator's local interface, recording what the engine reported."""

    def __init__(self, ray, actor):
        self.ray, self.actor = ray, actor
        self.tokens = self.sequences = 0

    def generate(self, prompts, sampling):
        out = self.ray.get(self.actor.generate.remote(prompts, sampling))
        self.tokens += sum(len(c["token_ids"]) for comps in out for c in comps)
        self.sequences += sum(len(comps) for comps in out)
        return out


TINY = SearchConfig(max_tokens=24, step_tokens=8, max_steps=3, expansions=2, ministep_tokens=6)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_on_the_real_engine_counts_the_engines_tokens(name, engine, ray_session, tiny_problem):
    rec = RecordingEngine(ray_session, engine)
    budget = 1 if name == "greedy" else 2
    res = STRATEGIES[name](tiny_problem, engine_generate(rec, TINY), CONFIDENCE, budget, TINY)
    assert res.tokens_generated == rec.tokens > 0
    assert res.sequences == rec.sequences
    assert res.tokens_scored == 0  # confidence reads the engine's logprobs
    if name in ("best_of_n", "weighted", "beam", "dvts", "mcts"):
        assert res.step_scores == [] or all(0 < s <= 1 for s in res.step_scores)
    if name in ("majority", "best_of_n", "weighted"):
        assert rec.sequences == budget


@pytest.mark.slow
def test_scorer_tokens_on_the_real_engine(engine, ray_session, tiny_problem):
    calls = []

    def scripted_prm(prompts, step_lists):  # scripted scorer: 0.5 per step; records what it was sent
        calls.append(step_lists)
        return [[0.5] * len(s) for s in step_lists]

    rec = RecordingEngine(ray_session, engine)
    res = STRATEGIES["best_of_n"](tiny_problem, engine_generate(rec, TINY), scripted_prm, 3, TINY)
    # each of the 3 samples is scored once (those with any step text), so the scorer read what the engine made
    assert res.tokens_generated == rec.tokens
    assert len(calls) == 1 and res.tokens_scored <= res.tokens_generated
    rec = RecordingEngine(ray_session, engine)
    res = STRATEGIES["beam"](tiny_problem, engine_generate(rec, TINY), scripted_prm, 2, TINY)
    assert res.tokens_generated == rec.tokens and res.meta["rounds"] == len(calls) - 1


@pytest.mark.slow
def test_adapter_on_the_actor_handle_matches_the_local_path(engine, ray_session, tiny_problem):
    rec = RecordingEngine(ray_session, engine)
    via_handle = engine_generate(engine, TINY)([tiny_problem.prompt], 1, False, 12, greedy=True)[0][0]
    via_local = engine_generate(rec, TINY)([tiny_problem.prompt], 1, False, 12, greedy=True)[0][0]
    assert (via_handle.text, via_handle.n_tokens) == (via_local.text, rec.tokens)


@pytest.mark.slow
def test_step_boundaries_and_beam_search_on_smollm2(engine, ray_session, smollm2):
    """The random tiny model never writes a newline, so real step boundaries need a real model: SmolLM2 writes one
    calculation per line and ends with "The answer is N." (the tiny engine is released first: 2 CPUs here)."""
    from transformers import AutoTokenizer

    from actors.vllm_generator import VLLMGenerator
    from pipelines.synthetic import SyntheticConfig, synthetic_problem
    from pipelines.prompts import PromptConfig, render

    ray_session.kill(engine)  # the module is done with it; the fixture's kill at teardown is then a no-op
    actor = ray_session.remote(num_cpus=1)(VLLMGenerator).remote(
        smollm2, {"max_model_len": 1024, "gpu_memory_utilization": 0.1}, {}, 2, "smollm2")
    try:
        p = synthetic_problem(SyntheticConfig(), 1)
        prob = SearchProblem(render(AutoTokenizer.from_pretrained(smollm2), p["question"], "numeric",
                                    PromptConfig()), p["question"], "numeric")
        cfg = SearchConfig(step_tokens=40, max_steps=4, max_tokens=120, expansions=2)
        steps = engine_generate(actor, cfg)([prob.prompt], 6, True, 40)[0]
        ended = [c for c in steps if c.text.endswith("\n")]
        assert ended, [c.text for c in steps]  # SmolLM2 ends its first line within 40 tokens
        for c in steps:
            assert "\n" not in c.text[:-1]  # the engine stopped at the first separator and kept it
            assert c.finish_reason == ("stop" if c in ended or c.n_tokens < 40 else "length")
        rec = RecordingEngine(ray_session, actor)
        res = STRATEGIES["beam"](prob, engine_generate(rec, cfg), CONFIDENCE, 2, cfg)
        assert res.tokens_generated == rec.tokens and rec.sequences == 2 * res.meta["rounds"]
        assert 1 <= len(res.steps) <= 4 and len(res.step_scores) == len(res.steps)
        assert res.answer is not None
    finally:
        ray_session.kill(actor)


def _revise_world(right_after: int):
    """A scripted generator whose attempt k (0-based) is wrong before `right_after` and right from it on, and a
    scorer that scores right solutions 0.9 and wrong ones 0.1. Returns (generate, score, prefixes seen)."""
    seen = []

    def generate(prefixes, n, stop_at_step, max_tokens, greedy=False):
        seen.extend(prefixes)
        k = len(seen) - 1
        text = "3 + 4 = 7\nThe answer is 7." if k >= right_after else f"3 + 4 = {8 + k}\nThe answer is {8 + k}."
        return [[Completion(text, 9, "stop")] * n for _ in prefixes]

    def score(prompts, step_lists):
        return [[0.9 if "= 7" in "".join(s) else 0.1] * len(s) for s in step_lists]

    return generate, score, seen


def test_revise_rewrites_until_the_verifier_is_satisfied_and_keeps_the_best_attempt():
    from pipelines.search_ledger import REVISE_CUE, revision_prompt

    generate, score, seen = _revise_world(right_after=2)
    res = STRATEGIES["revise"](PROBLEM, generate, score, 4, CFG)
    assert res.answer == "7" and res.meta["attempts"] == 3  # wrong, wrong, right: satisfied, stop before 4
    assert res.meta["scores"] == pytest.approx([0.1, 0.1, 0.9])
    assert seen[0] == PROBLEM.prompt
    assert seen[1] == revision_prompt(PROBLEM.prompt, "3 + 4 = 8\nThe answer is 8.") and REVISE_CUE in seen[1]
    assert seen[2].startswith(PROBLEM.prompt + "3 + 4 = 9") and seen[2].endswith(REVISE_CUE + "\n")
    assert res.tokens_generated == 27 and res.tokens_scored == 27
    # satisfied at once: one attempt; never satisfied: the budget's attempts and the best-scored (the first) answer
    assert STRATEGIES["revise"](PROBLEM, *_revise_world(0)[:2], 4, CFG).meta["attempts"] == 1
    never = STRATEGIES["revise"](PROBLEM, *_revise_world(99)[:2], 3, CFG)
    assert never.meta["attempts"] == 3 and never.answer == "8"


def test_correction_pairs_put_a_failed_attempt_and_the_cue_before_a_verified_solution():
    from pipelines.search_ledger import revision_prompt
    from pipelines.train.data import correction_pairs

    rows = [{"problem_id": "a", "sample_id": f"a/s{i}", "prompt": "P:", "completion": c, "correct": ok, "error": ""}
            for i, (c, ok) in enumerate([("3 + 4 = 7\nThe answer is 7.", True), ("3 + 4 = 8\nThe answer is 8.", False),
                                         ("3 + 4 = 9\nThe answer is 9.", False)])]
    rows.append({"problem_id": "b", "sample_id": "b/s0", "prompt": "Q:", "completion": "1", "correct": False,
                 "error": ""})
    out, why = correction_pairs(rows, k=1)
    assert len(out) == 1 and out[0]["completion"] == "3 + 4 = 7\nThe answer is 7."
    assert out[0]["prompt"] in (revision_prompt("P:", "3 + 4 = 8\nThe answer is 8."),
                                revision_prompt("P:", "3 + 4 = 9\nThe answer is 9."))
    assert why == {"over_k": 1, "problem_without_verified": 1}

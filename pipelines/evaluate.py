"""The accuracy-against-compute evaluation of test-time search: every (problem, strategy, budget) searched against
the real engine, graded by the automatic verifier, summarised as a table and a plot of accuracy against generated
tokens per problem (o1's test-time scaling curve).

    tasks (problem x strategy[:scorer] x budget) ──driver threads, tasks_in_flight per engine──> strategies
        ──each search's own call──> AsyncVLLMGenerator.generate (async engine: continuous batching)   [Ray actor]
        ──CallBatcher──> one PRMScorer.score / score_outcome call with every pending solution        [Ray actor]
    results ──verify.grade──> EvalRecord rows (schema.EVAL_RECORD) + traces (steps, step scores, candidates)

Why threads in the driver, not Ray Data: a search makes many small dependent engine calls (a beam round, an MCTS
expansion), so throughput comes from keeping many searches in flight. Ray Data map_batches over problems would run
each batch's searches to completion before the next, leaving the engine with shrinking batches at every batch's
tail. With the async engine (engine.async_engine, the default) each search thread calls the engine actor itself and
vLLM's continuous batching merges the requests of all searches as they arrive: no search waits for a flush, and a
long sequence of one call does not hold back the others. With the synchronous engine (`vllm.LLM.generate` takes
no lock, so one call at a time per actor) one batcher per engine (`pipelines.evaluate_batching`) merges the
searches' requests into one call, flushing as soon as every search thread of that engine is waiting (or
`max_wait_s` after the oldest request). Scorer calls always go through the batcher: a scorer's forward pass is
cheaper per solution in a batch whose solutions share a prompt. Each call carries up to `tasks_in_flight` searches'
requests (by default every search of 16 problems); more engines (engine.max_engines, one GPU each) split the
problems between them. The search logic is light Python in the driver. On 2 CPU cores the PRM's forward passes
cost more than generation (they read every sampled solution's tokens with the prompt): summary.json's
`prm_busy_s` says how long the scorer calls ran.

Shared samples (share_samples=true): strategies that draw full solutions from the problem's prompt (majority,
best-of-N, weighted, reflection's first thought) draw from one pool per problem, i.e. the first N i.i.d. samples
serve budget N of every such strategy (common random numbers: differences between strategies are not sampling
noise). Each record still counts the tokens of the samples it used, as if it had run alone; summary.json reports
the tokens the engine really generated. Scores of identical solutions are likewise computed once per problem.

Grading: the chosen solution goes through `verify.grade` against the problem's answer; a task that fails (engine
error) is set aside in failed_tasks.jsonl with its reason and left out of the table, never counted as wrong.
"""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from pipelines.config import help_field
from pipelines.evaluate_batching import CallBatcher, SharedSamples, SharedScores, _BatchedEngine, _DirectEngine
from pipelines.generate import EngineConfig
from pipelines.problems import SyntheticConfig
from pipelines.prompts import PromptConfig
from pipelines.search import CHECKS, CONFIDENCE, SCORED, STRATEGIES, SearchConfig, SearchProblem, engine_generate

SCORERS = ("prm", "orm", "vstar", "genrm", "confidence", "checks")  # checks: search.StepChecksScorer, no model
VERIFIERS = ("prm", "orm", "vstar", "genrm")  # the trained ones, each an EvalConfig field holding its folder


@dataclass(frozen=True)
class EvalConfig:
    problems: str = help_field("synthetic", "source name (synthetic, gsm8k, math500) or a problem file")
    limit: int = help_field(0, "use only the first N problems (0 = all)")
    synthetic: SyntheticConfig = help_field(SyntheticConfig(n=100, seed=1, min_steps=1, max_steps=2),
                                            "synthetic problems; seed 1 keeps them apart from the seed-0 problems "
                                            "the generator and the PRM are trained on")
    prompt: PromptConfig = help_field(PromptConfig(), "prompt format (search.fmt must match prompt.format)")
    engine: EngineConfig = help_field(EngineConfig(), "the vLLM engines (max_engines of them, fixed)")
    search: SearchConfig = help_field(SearchConfig(), "search settings shared by every strategy")
    strategies: tuple[str, ...] = help_field(
        ("greedy", "majority", "best_of_n", "weighted", "beam", "mcts"),
        "strategies (search.STRATEGIES), each optionally :prm, :orm, :vstar, :genrm, :confidence or :checks (the "
        "arithmetic step checks as a calculator verifier, no model) to pick its scorer; scored strategies default to "
        "the PRM, else the ORM, else confidence")
    budgets: tuple[int, ...] = help_field((1, 2, 4, 8, 16), "budgets to run every strategy at (greedy runs at 1)")
    prm: str = help_field("", "PRM checkpoint (actors.prm_scorer.PRMScorer); empty = no PRM")
    orm: str = help_field("", "ORM checkpoint (PRMScorer.score_outcome); empty = no ORM")
    vstar: str = help_field("", "V-STaR verifier (`stepray train dpo`: LikelihoodRatioScorer, scored like an ORM); "
                                "empty = none")
    genrm: str = help_field("", "GenRM verifier (`stepray train genrm`: GenerativeVerifierScorer, p(Yes) after the "
                                "question and the solution, scored like an ORM); empty = none")
    scorer_input: str = help_field("prompt", "what a PRM/ORM gets before the steps: prompt (the question rendered "
                                             "as in its training, reward_model.json) | question (the raw text)")
    scorer_num_cpus: float = help_field(1.0, "CPUs Ray reserves per scorer actor")
    scorer_num_gpus: float = help_field(0.0, "GPUs per scorer actor (0 = CPU)")
    scorer_threads: int = help_field(0, "torch threads of a CPU scorer: 0 = its num_cpus, -1 = every core of its "
                                        "node, N = N (more threads than the cores left by the engines slow both "
                                        "down: measured on 2 cores, -1 made the demo's evaluation slower)")
    tasks_in_flight: int = help_field(0, "searches running at once per engine (their calls are batched); 0 = "
                                         "every search of `problems_in_flight` problems")
    problems_in_flight: int = help_field(16, "with tasks_in_flight=0: problems whose searches run at once per "
                                             "engine (tasks are problem-major and a problem's sampling searches "
                                             "share one pool, so problems, not searches, fill an engine call)")
    max_wait_s: float = help_field(0.05, "longest a request waits for other searches' requests before a call")
    share_cores: bool = help_field(True, "on one CPU node with CPU scorers, the engines get the cores the scorers "
                                         "leave (engine.threads lowered so that engine and scorer threads fit in the "
                                         "node's CPUs): OpenMP threads bound to a core that another process also "
                                         "runs on stall both (measured on 2 cores, the demo's evaluation of 48 "
                                         "problems: 72 s with engine 2 + PRM 1 threads, 55 s with 1 + 1)")
    share_samples: bool = help_field(True, "draw full samples of a problem from one pool for every strategy/budget")
    verify_timeout_s: float = help_field(5.0, "time limit per answer check")
    out: str = help_field("runs/evaluate", "output folder")

    def __post_init__(self) -> None:
        if self.search.fmt == SearchConfig.fmt and self.prompt.format != SearchConfig.fmt:
            # the search splits steps at the prompt's separator: prompt.format alone sets it
            object.__setattr__(self, "search", replace(self.search, fmt=self.prompt.format))
        elif self.search.fmt != self.prompt.format:
            raise ValueError(f"search.fmt={self.search.fmt!r} but prompt.format={self.prompt.format!r}: the search "
                             f"splits steps with the prompt's separator; set prompt.format only")
        if not self.strategies:
            raise ValueError("strategies is empty; give e.g. greedy,majority,best_of_n")
        for spec in self.strategies:
            parse_strategy(spec, self.prm, self.orm, self.vstar, self.genrm)
        if not self.budgets or any(b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be integers >= 1, got {list(self.budgets)}")
        if self.scorer_input not in ("question", "prompt"):
            raise ValueError(f"scorer_input {self.scorer_input!r} is not one of question, prompt")
        if self.tasks_in_flight < 0 or self.problems_in_flight < 1 or self.max_wait_s < 0:
            raise ValueError("tasks_in_flight must be >= 0 (0 = auto), problems_in_flight >= 1 and max_wait_s >= 0")

    def searches_in_flight(self, n_tasks: int, n_problems: int) -> int:
        """Threads per engine: tasks_in_flight, or (0) every search of problems_in_flight problems."""
        if self.tasks_in_flight:
            return self.tasks_in_flight
        return max(1, -(-n_tasks // max(n_problems, 1)) * self.problems_in_flight)


def parse_strategy(spec: str, prm: str = "", orm: str = "", vstar: str = "", genrm: str = "") -> tuple[str, str]:
    """"beam:orm" -> ("beam", "orm"); "beam" -> ("beam", the default scorer: prm, orm, vstar, genrm, confidence, the
    first given); "majority" -> ("majority", "")."""
    name, _, scorer = spec.partition(":")
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r} is not one of {sorted(STRATEGIES)}")
    if name not in SCORED:
        if scorer:
            raise ValueError(f"strategy {name!r} uses no scorer, so {spec!r} cannot name one")
        return name, ""
    scorer = scorer or ("prm" if prm else "orm" if orm else "vstar" if vstar else "genrm" if genrm else "confidence")
    if scorer not in SCORERS:
        raise ValueError(f"{spec!r}: scorer {scorer!r} is not one of {list(SCORERS)}")
    if {"prm": not prm, "orm": not orm, "vstar": not vstar, "genrm": not genrm}.get(scorer, False):
        raise ValueError(f"{spec!r} needs a {scorer.upper()} checkpoint: give --{scorer} PATH")
    return name, scorer


# ----------------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------------

def make_tasks(problems: list[dict], cfg: EvalConfig) -> list[dict]:
    """problem x strategy x budget, problem-major (a problem's searches run together and share its samples)."""
    tasks = []
    for i, p in enumerate(problems):
        for spec in cfg.strategies:
            name, scorer = parse_strategy(spec, cfg.prm, cfg.orm, cfg.vstar, cfg.genrm)
            for b in ([1] if name == "greedy" else sorted(set(cfg.budgets))):
                tasks.append({"index": i, "problem": p, "strategy": spec, "name": name, "scorer": scorer,
                              "budget": b})
    return tasks


def evaluate(problems: list[dict], prompts: dict[str, str], cfg: EvalConfig,
             engines: list[Callable[[list[str], list[dict]], list[list[dict]]]],
             scorers: dict[str, Callable[[list[str], list[list[str]]], list[list[float]]]],
             scorer_prompts: dict[str, dict[str, str]], scorer_names: dict[str, str], model: str,
             log: Callable[[str], None] = print, every_s: float = 10.0, concurrent_engines: bool = False
             ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Run every task; returns (records, failed tasks, facts). `engines`: one batch function per engine
    (VLLMGenerator.generate semantics); `scorers`: "prm"/"orm" batch step scorers; `scorer_prompts`: per scorer,
    problem id -> the text it reads before the steps; `scorer_names` names the scorers in the records; `prompts`:
    problem id -> generation prompt. `concurrent_engines`: the engines take concurrent calls (async engines), so
    each search calls its engine directly and only the scorer calls are batched."""
    from pipelines.verify import grade

    tasks = make_tasks(problems, cfg)
    engine_tokens, engine_calls, engine_requests = [0] * len(engines), [0] * len(engines), [0] * len(engines)
    lock = threading.Lock()

    def engine_fn(e: int):  # every call that reaches engine e (merged by the batcher, or a search's own), counted
        def run(prompts: list, sampling: list) -> list:
            out = engines[e](prompts, sampling)
            with lock:
                engine_tokens[e] += sum(len(c["token_ids"]) for comps in out for c in comps)
                engine_calls[e] += 1
                engine_requests[e] += len(prompts)
            return out
        return run

    def pairs(f):
        return lambda items: f([p for p, _ in items], [s for _, s in items])

    batchers = [CallBatcher({**({} if concurrent_engines else {"generate": pairs(engine_fn(e))}),
                             **{k: pairs(f) for k, f in scorers.items()}}, cfg.max_wait_s)
                for e in range(len(engines))]
    pool_size = max(cfg.budgets) if any(parse_strategy(s, cfg.prm, cfg.orm, cfg.vstar, cfg.genrm)[0] in ("majority", "best_of_n",
                                                                                             "weighted")
                                        for s in cfg.strategies) else 0
    samples = {p["id"]: SharedSamples(prompts[p["id"]], pool_size) for p in problems}
    scores = {(p["id"], k): SharedScores() for p in problems for k in scorers}

    def run_task(t: dict) -> dict:
        p, batcher = t["problem"], batchers[t["index"] % len(engines)]
        problem = SearchProblem(prompts[p["id"]], p["question"], p["kind"])
        t0 = time.time()
        e = t["index"] % len(engines)
        with batcher.member():
            engine = (_DirectEngine(engine_fn(e), batcher) if concurrent_engines else
                      _BatchedEngine(batcher))
            generate = engine_generate(engine, cfg.search)
            if cfg.share_samples:
                generate = samples[p["id"]].wrap(generate, batcher.waiting)
            if t["scorer"] == "confidence":
                score = CONFIDENCE
            elif t["scorer"] == "checks":  # rule-based, run here: reads the question the search passes it
                score = CHECKS
            elif t["scorer"]:  # every solution of this search is this problem's: send the scorer's own prompt
                kind, sp = t["scorer"], scorer_prompts[t["scorer"]][p["id"]]
                score = scores[(p["id"], kind)].wrap(lambda ps, ss: batcher.call(kind, [(sp, s) for s in ss]))
            else:
                score = None
            res = STRATEGIES[t["name"]](problem, generate, score, t["budget"], cfg.search)
        wall = time.time() - t0
        v = grade(res.completion, p["answer"], kind=p["kind"], timeout_s=cfg.verify_timeout_s)
        return {"problem_id": p["id"], "strategy": t["strategy"], "budget": t["budget"], "answer": res.answer,
                "gold": p["answer"], "correct": bool(v.correct), "reason": v.reason,
                "tokens_generated": res.tokens_generated, "tokens_scored": res.tokens_scored, "wall_s": wall,
                "model": model, "prm": scorer_names.get(t["scorer"], t["scorer"]),
                "completion": res.completion, "steps": res.steps, "step_scores": res.step_scores,
                "score": None if math.isnan(res.score) else res.score, "sequences": res.sequences,
                "generate_calls": res.generate_calls, "score_calls": res.score_calls,
                "candidates": res.candidates, "meta": res.meta}

    records, failed = [], []
    t0 = last = time.time()
    in_flight = cfg.searches_in_flight(len(tasks), len(problems))
    pools = [ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix=f"search{e}")
             for e in range(len(engines))]
    try:
        futures = {pools[t["index"] % len(engines)].submit(run_task, t): t for t in tasks}
        for f in as_completed(futures):
            t = futures[f]
            try:
                records.append(f.result())
            except Exception as e:  # noqa: BLE001 - set aside with its reason, never counted as wrong
                failed.append({"problem_id": t["problem"]["id"], "strategy": t["strategy"], "budget": t["budget"],
                               "error": f"{type(e).__name__}: {e}"[:1000]})
            now = time.time()
            done = len(records) + len(failed)
            if now - last >= every_s or done == len(tasks):
                el = now - t0
                rate = done / el if el else 0.0
                eta = (len(tasks) - done) / rate if rate else float("nan")
                log(f"[evaluate] {done}/{len(tasks)} searches ({len(failed)} failed), "
                    f"{sum(engine_tokens)} engine tokens, {sum(engine_tokens) / el:.1f} tokens/s, ETA {eta:.0f}s")
                last = now
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        for b in batchers:
            b.close()
    facts = {"tasks": len(tasks), "failed": len(failed), "engine_tokens": sum(engine_tokens),
             "record_tokens": sum(r["tokens_generated"] for r in records), "wall_s": time.time() - t0,
             "engine_calls": sum(engine_calls), "engine_requests": sum(engine_requests),
             "searches_in_flight": in_flight, "concurrent_engines": concurrent_engines,
             # wall time inside each batched kind's calls (a kind's calls run one at a time per engine)
             **{f"{k}_busy_s": round(sum(b.seconds[k] for b in batchers), 1) for k in batchers[0].seconds}}
    return records, failed, facts


# ----------------------------------------------------------------------------------------------------------
# Table and plot
# ----------------------------------------------------------------------------------------------------------

def hits_by_strategy(records: list[dict]) -> dict[str, dict[str, bool]]:
    """Per "strategy@budget", whether each problem was answered right: what paired comparisons read (the loop's
    gains over the base model, the demo's verifiers against majority, benchmarks.verifier_votes)."""
    hits: dict[str, dict[str, bool]] = {}
    for r in records:
        hits.setdefault(f"{r['strategy']}@{r['budget']}", {})[r["problem_id"]] = bool(r["correct"])
    return hits


def accuracy_table(records: list[dict], order: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """One row per (strategy, budget): problems, accuracy, mean generated and scored tokens per problem, mean wall
    time; strategies in `order` (then first-seen order), budgets ascending."""
    groups: dict[tuple[str, int], list[dict]] = {}
    order = list(order)
    for r in records:
        if r["strategy"] not in order:
            order.append(r["strategy"])
        groups.setdefault((r["strategy"], r["budget"]), []).append(r)
    rows = []
    for (strategy, budget), rs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        n = len(rs)
        rows.append({"strategy": strategy, "budget": budget, "scorer": rs[0]["prm"], "problems": n,
                     "accuracy": sum(r["correct"] for r in rs) / n,
                     "tokens_generated": sum(r["tokens_generated"] for r in rs) / n,
                     "tokens_scored": sum(r["tokens_scored"] for r in rs) / n,
                     "wall_s": sum(r["wall_s"] for r in rs) / n})
    return rows


def format_table(rows: list[dict]) -> str:
    """The table as markdown (README- and terminal-friendly)."""
    lines = ["| strategy | budget | scorer | problems | accuracy | gen tokens / problem | scored tokens / problem |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['budget']} | {r['scorer'] or '-'} | {r['problems']} | "
                     f"{r['accuracy']:.3f} | {r['tokens_generated']:.0f} | {r['tokens_scored']:.0f} |")
    return "\n".join(lines)


def plot_accuracy(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Accuracy against generated tokens per problem (log x), one line per strategy, points labelled by budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    for s in strategies:
        pts = sorted((r["tokens_generated"], r["accuracy"], r["budget"]) for r in rows if r["strategy"] == s)
        xs = [max(x, 1e-9) for x, _, _ in pts]
        ax.plot(xs, [y for _, y, _ in pts], marker="o", label=s)
        for x, y, b in pts:
            ax.annotate(str(b), (max(x, 1e-9), y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem (log scale); labels: budget")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(out: Path, records: list[dict], failed: list[dict], rows: list[dict], title: str) -> dict[str, Path]:
    """records.parquet (EvalRecord), traces.jsonl, failed_tasks.jsonl, table.md/.csv, accuracy_vs_tokens.png."""
    import csv

    import pyarrow.parquet as pq

    from pipelines import schema

    out.mkdir(parents=True, exist_ok=True)
    paths = {"records": out / "records.parquet", "traces": out / "traces.jsonl", "failed": out / "failed_tasks.jsonl",
             "table_md": out / "table.md", "table_csv": out / "table.csv", "plot": out / "accuracy_vs_tokens.png"}
    pq.write_table(schema.to_table(records, "eval_record"), paths["records"])
    with open(paths["traces"], "w") as f:
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")
    with open(paths["failed"], "w") as f:
        for r in failed:
            f.write(json.dumps(r) + "\n")
    paths["table_md"].write_text(format_table(rows) + "\n")
    with open(paths["table_csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["strategy"])
        w.writeheader()
        w.writerows(rows)
    if rows:
        plot_accuracy(rows, paths["plot"], title)
    else:
        del paths["plot"]
    return paths


def engine_threads(cfg: EvalConfig, node_cpus: int, nodes: int) -> tuple[int, str]:
    """The engine threads this evaluation runs with, and why when they differ from engine.threads (share_cores):
    on a single CPU node, engines and CPU scorers together get at most the node's CPUs."""
    eng = cfg.engine
    kinds = scorers_used(cfg)  # the scorer actors start_scorers will start
    if not (cfg.share_cores and kinds and eng.threads and nodes == 1 and not eng.num_gpus and not cfg.scorer_num_gpus):
        return eng.threads, ""
    per_scorer = cfg.scorer_threads if cfg.scorer_threads > 0 else node_cpus if cfg.scorer_threads < 0 else \
        max(1, int(cfg.scorer_num_cpus))
    scorer_threads = per_scorer * len(kinds)
    if eng.threads * eng.max_engines + scorer_threads <= node_cpus:
        return eng.threads, ""
    threads = max(1, (node_cpus - scorer_threads) // eng.max_engines)
    if threads == eng.threads:
        return eng.threads, ""
    return threads, (f"engine.threads {eng.threads} -> {threads}: {eng.max_engines} engine(s) and {scorer_threads} "
                     f"scorer thread(s) share this node's {node_cpus} CPUs (share_cores=false keeps "
                     f"engine.threads)")


def scorers_used(cfg: EvalConfig) -> set[str]:
    """The verifier kinds some strategy of cfg scores with (greedy, majority and reflection score nothing)."""
    return {parse_strategy(s, cfg.prm, cfg.orm, cfg.vstar, cfg.genrm)[1] for s in cfg.strategies} & set(VERIFIERS)


def start_scorers(cfg: EvalConfig, problems: list[dict]) -> tuple[dict, dict, dict, list]:
    """One scorer actor per verifier given (--prm, --orm, --vstar, --genrm) that a strategy uses: (scorers by kind,
    each kind's prompts by problem id, scorer names, the actors to kill). A verifier no strategy reads is not loaded
    (the loop passes its PRM to every evaluation, also to greedy and majority alone). Each scorer reads the
    question as it was rendered in its training (its metadata's "prompt"); an ORM or a V-STaR verifier scores a
    path's steps through `orm_as_step_scorer`."""
    import ray
    from transformers import AutoTokenizer

    from actors.start import scorer_actor
    from pipelines.prompts import PromptConfig, render
    from pipelines.search import orm_as_step_scorer

    scorers, scorer_prompts, names, actors = {}, {}, {"confidence": "confidence"}, []
    used = scorers_used(cfg)
    for kind in VERIFIERS:
        path = getattr(cfg, kind)
        if not path or kind not in used:
            continue
        h, meta = scorer_actor(path, kind, cfg.scorer_num_cpus, cfg.scorer_num_gpus, cfg.scorer_threads)
        actors.append(h)
        pcfg = PromptConfig(**meta["prompt"]) if meta.get("prompt") else cfg.prompt
        ptok = AutoTokenizer.from_pretrained(path)
        # GenRM builds its own verification prompt around the question (pipelines.train.data.genrm_prompt)
        scorer_prompts[kind] = {p["id"]: p["question"] if cfg.scorer_input == "question" or kind == "genrm" else
                                render(ptok, p["question"], p["kind"], pcfg) for p in problems}
        if kind == "prm":
            scorers["prm"] = lambda ps, ss, h=h: ray.get(h.score.remote(ps, ss))
        else:  # an ORM, a V-STaR or a GenRM verifier: one score per solution, a path's steps joined
            scorers[kind] = orm_as_step_scorer(lambda ps, cs, h=h: ray.get(h.score_outcome.remote(ps, cs)),
                                               cfg.prompt.format)
        names[kind] = f"{kind}:{path}"
    return scorers, scorer_prompts, names, actors

"""Evaluate test-time search: accuracy against generated tokens for every strategy at every budget.

    stepray evaluate --problems synthetic --model smollm2 [--prm PATH] [--orm PATH] \\
        --strategies greedy,majority,best_of_n,weighted,beam,mcts --budgets 1,2,4,8,16 --out runs/evaluate \\
        [--limit N] [--config cfg.yaml] [key=value ...]
    python -m jobs.evaluate_search ...           (the Ray job entrypoint: ray job submit -- python -m jobs...)

A strategy may name its scorer: best_of_n:orm, beam:prm, weighted:confidence. Scored strategies default to the
PRM (--prm), else the ORM (--orm), else Marco-o1 confidence from token logprobs (said so in the log).

Writes under --out: records.parquet (schema.EVAL_RECORD, one row per problem x strategy x budget), traces.jsonl
(the same with the chosen solution, its steps and step scores, candidates), failed_tasks.jsonl, table.md and
table.csv (accuracy, generated and scored tokens per problem), accuracy_vs_tokens.png (log x), config.json,
summary.json; logs all of it to MLflow (pipelines.runtime.mlflow_uri()).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from actors.start import actor_options, engine_actor, wait_ready
from pipelines import config as C
from pipelines import inputs
from pipelines.config import InputError
from pipelines.evaluate import (VERIFIERS, EvalConfig, accuracy_table, engine_threads, evaluate, format_table,
                                parse_strategy, start_scorers, write_outputs)
from pipelines.models import load_path
from pipelines.problems import load_problems, write_rejects
from pipelines.runs import write_problems
from pipelines.prompts import render
from pipelines.runtime import cli_main, init_ray, log_stage


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, EvalConfig]:
    ap = argparse.ArgumentParser(prog="stepray evaluate", description=__doc__.split("\n\n")[0],
                                 epilog="config keys (key=value overrides):\n" + C.describe(EvalConfig),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file with EvalConfig fields")
    ap.add_argument("--problems", help="source name or file (sets problems=)")
    ap.add_argument("--model", help="generator: model name or path (sets engine.model=)")
    ap.add_argument("--prm", help="PRM checkpoint path (sets prm=)")
    ap.add_argument("--orm", help="ORM checkpoint path (sets orm=)")
    ap.add_argument("--vstar", help="V-STaR verifier path, from `stepray train dpo` (sets vstar=)")
    ap.add_argument("--genrm", help="GenRM verifier path, from `stepray train genrm` (sets genrm=)")
    ap.add_argument("--strategies", help="comma-separated strategy[:scorer] list (sets strategies=)")
    ap.add_argument("--budgets", help="comma-separated budgets (sets budgets=)")
    ap.add_argument("--limit", type=int, help="first N problems only (sets limit=)")
    ap.add_argument("--out", help="output folder (sets out=)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. search.temperature=0.8 synthetic.n=50")
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in (("problems", "problems"), ("model", "engine.model"), ("prm", "prm"), ("orm", "orm"),
                      ("vstar", "vstar"), ("genrm", "genrm"),
                      ("limit", "limit"), ("out", "out")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    for flag in ("strategies", "budgets"):  # a YAML list, so that a single item (--budgets 16) is a list too
        if getattr(args, flag) is not None:
            overrides.append(f"{flag}=[{getattr(args, flag)}]")
    return args, C.load_config(EvalConfig, args.config, overrides)


def run(cfg: EvalConfig, use_mlflow: bool = True, log=print) -> dict:
    # inputs first: a user's mistake ends here, before any output, Ray or engine.
    # Code problems are graded by tests, not answers, so search evaluation sets them aside.
    loaded = load_problems(cfg.problems, synthetic=cfg.synthetic, limit=cfg.limit or None)
    problems = [p for p in loaded.problems if p["kind"] in ("numeric", "math")]
    if not problems:
        raise InputError(f"problems: {cfg.problems} holds no numeric or math problems to evaluate "
                         f"({loaded.summary()})")
    model_path = load_path(cfg.engine.model)
    for kind in VERIFIERS:
        if getattr(cfg, kind):
            inputs.reward_model_folder(getattr(cfg, kind), f"--{kind}", kind)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(C.to_dict(cfg), indent=1, default=str))
    rejects = loaded.rejects + [{"source": p["source"], "line": None, "reason": "code_problem: search evaluation "
                                 "grades answers (numeric, math)", "row": {"id": p["id"]}}
                                for p in loaded.problems if p["kind"] not in ("numeric", "math")]
    write_rejects(rejects, out / "rejects.jsonl")
    write_problems(problems, out)
    log(f"[evaluate] {cfg.problems}: {len(problems)} problems, {len(rejects)} set aside (rejects.jsonl)")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    prompts = {p["id"]: render(tok, p["question"], p["kind"], cfg.prompt) for p in problems}

    ray = init_ray()
    eng = cfg.engine
    threads, why = engine_threads(cfg, int(ray.cluster_resources().get("CPU", 0)),
                                  sum(1 for n in ray.nodes() if n.get("Alive")))
    if why:
        log(f"[evaluate] {why}")
        eng = replace(eng, threads=threads)
    # the scorer each strategy uses ("" for the unscored ones), read once for the log line and the table's title
    strategy_scorers = [parse_strategy(s, cfg.prm, cfg.orm, cfg.vstar, cfg.genrm)[1] for s in cfg.strategies]
    engines = [engine_actor(eng, model_path, eng.model) for _ in range(eng.max_engines)]
    actors = list(engines)
    try:
        scorers, scorer_prompts, names, scorer_actors = start_scorers(cfg, problems)
        actors += scorer_actors
        if not any(getattr(cfg, k) for k in VERIFIERS) and "confidence" in strategy_scorers:
            log("[evaluate] no --prm, --orm, --vstar or --genrm given: the scored strategies without a :scorer score "
                "solutions with Marco-o1 confidence from token logprobs, not with a trained verifier")
        ready = wait_ready(engines, f"{len(engines)} engine(s)", actor_options(eng.num_cpus, eng.num_gpus))
        log(f"[evaluate] {len(engines)} engine(s) up ({ready[0]['load_s']:.0f}s load); scorers: "
            f"{', '.join(sorted(names))}")

        engine_fns = [lambda ps, ss, h=h: ray.get(h.generate.remote(ps, ss)) for h in engines]
        records, failed, facts = evaluate(problems, prompts, cfg, engine_fns, scorers, scorer_prompts, names,
                                          eng.model, log=log, concurrent_engines=eng.async_engine)
    finally:
        for a in actors:
            ray.kill(a)

    rows = accuracy_table(records, cfg.strategies)
    used_scorers = sorted({names.get(k, k) for k in strategy_scorers if k})
    title = (f"{eng.model} on {cfg.problems} ({len(problems)} problems); scorer: "
             f"{', '.join(used_scorers) or 'none'}")
    paths = write_outputs(out, records, failed, rows, title)
    summary = {"problems": len(problems), "rejected_problems": len(rejects), **facts, "engine_threads": eng.threads,
               "scorer_fallback": not any(getattr(cfg, k) for k in VERIFIERS), "table": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log("\n" + format_table(rows))
    log(f"[evaluate] engine generated {facts['engine_tokens']} tokens; records count {facts['record_tokens']} "
        f"(samples shared across strategies and budgets: {cfg.share_samples}); {facts['failed']} failed searches; "
        f"outputs in {out}")
    if use_mlflow:  # one curve per strategy, the budget as the step
        curves = [(f"{name}.{r['strategy'].replace(':', '-')}", r[name], r["budget"]) for r in rows
                  for name in ("accuracy", "tokens_generated", "tokens_scored")]
        log_stage("evaluate", cfg, {k: v for k, v in summary.items() if k != "table"}, paths.values(), curves, log)
    return summary


@cli_main("stepray evaluate")
def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    run(cfg, use_mlflow=not args.no_mlflow)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What `stepray train` measures after training, one hook per task (EVALUATE[task]), and the run's summary table.

    sft  greedy accuracy on held-out problems before (the starting model) and after training, through vLLM
    prm  step-level P/R/F1 and AUC of "step is wrong" against ground-truth step checks (held-out synthetic problems,
         or the finished samples of a generate run: eval.truth_data), at eval.threshold and at a threshold fitted on
         that truth (cross-fitted; the fit on all of it goes to reward_model.json), and ProcessBench F1 at both
    orm  AUC and accuracy of the score against the verifier's verdicts on held-out problems
    dpo  pair accuracy (verified ranked above failed) and AUC of the V-STaR score on held-out problems' pairs

Scoring runs the PRMScorer actor pool over a Ray Data dataset (`metrics.scored_rows`); the scorer's torch device
follows the GPUs Ray gave its actor (eval.engine.num_gpus), so nothing here names a device.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from pipelines import config as C
from pipelines.config import InputError, MissingInput
from pipelines.problems import data_root, load_problems
from pipelines.prompts import render
from pipelines import runs, runtime
from pipelines.train.config import TrainConfig
from pipelines.train.data import read_rows
from pipelines.train.metrics import (auc, greedy_accuracy, predicted_first_error, problems_by_id,
                                     processbench_f1, scored_rows, step_truth, truth_scores_metrics)


def fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_summary(s: dict) -> str:
    t = s["train"]
    lines = [f"{'task':<26}{s['task']} ({s['round_mode'] if s['task'] == 'sft' else 'from base'})",
             f"{'training rows':<26}{s['train_rows']} ({s['train_tokens']} tokens), {s['rejected']} set aside, "
             f"{s['holdout_rows']} held out",
             f"{'steps':<26}{t['steps']} (resumed from {t['resumed_from']})",
             f"{'loss':<26}{fmt(t['first_loss'])} -> {fmt(t['final_loss'])}",
             f"{'tokens/s (mean)':<26}{fmt(t['tokens_per_s'], '.0f')}",
             f"{'model':<26}{t['model']}"]
    flat = C.flatten(s["eval"])
    width = max([26, *(len(k) + 7 for k in flat)])
    for k, v in flat.items():
        lines.append(f"{'eval.' + k:<{width}}{fmt(v) if isinstance(v, float) else v}")
    lines.append(f"{'wall':<26}{s['wall_s']:.0f}s")
    return "\n".join(lines)


def log_evaluation(run_id: str, evaluation: dict, fit_s: float, summary_path: Path) -> None:
    """Add the evaluation's finite numbers (eval.<key>), the fit time and the summary file to the training's MLflow
    run (the run the driver opened before training)."""
    import mlflow

    mlflow.set_tracking_uri(runtime.mlflow_uri())
    with mlflow.start_run(run_id=run_id):
        metrics = {f"eval.{k}": float(v) for k, v in C.flatten(evaluation).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        mlflow.log_metrics({**metrics, "train.fit_s": fit_s})
        mlflow.log_artifact(str(summary_path))




def evaluate_sft(cfg: TrainConfig, init_path: str, model_path: str, examples, log) -> dict:
    """Greedy accuracy on held-out problems, before (the starting model) and after training, through vLLM."""
    import ray
    from transformers import AutoTokenizer

    from actors.start import engine_actor

    problems = load_problems(cfg.eval.problems, synthetic=cfg.eval.synthetic,
                             limit=cfg.eval.limit or None).problems
    # a held-out problem whose question is inside a training prompt is not held out: leave it out, and say so
    train_prompts = [e["prompt"] for e in examples.train]
    overlap = [p for p in problems if any(p["question"] in tp for tp in train_prompts)]
    problems = [p for p in problems if p not in overlap]
    tok = AutoTokenizer.from_pretrained(model_path)
    prompts = [render(tok, p["question"], p["kind"], cfg.prompt) for p in problems]
    eng = cfg.eval.engine
    result = {"heldout_problems": len(problems), "overlap_left_out": len(overlap), "source": cfg.eval.problems}
    for name, path in (("before", init_path), ("after", model_path)):
        t = time.time()
        gen = engine_actor(eng, path, name)
        try:
            ray.get(gen.ready.remote())
            acc = greedy_accuracy(gen, problems, prompts, cfg.eval.max_tokens)
        finally:
            ray.kill(gen)
        result[f"greedy_{name}"] = acc["accuracy"]
        result[f"tokens_{name}"] = acc["tokens"]
        log(f"[eval sft] greedy accuracy {name}: {acc['correct']}/{acc['problems']} = {acc['accuracy']:.3f} "
            f"({time.time() - t:.0f}s, {path})")
    result["greedy_delta"] = result["greedy_after"] - result["greedy_before"]
    return result


def evaluate_prm(cfg: TrainConfig, init_path: str, model_path: str, examples, log) -> dict:
    """Step-level F1/AUC against ground-truth step checks (held-out synthetic problems) and ProcessBench F1."""
    from transformers import AutoTokenizer

    from actors.prm_scorer import PRMScorer

    tok = AutoTokenizer.from_pretrained(model_path)
    ev = cfg.eval
    result: dict = {}
    # ground truth of the held-out rows: the problems the labels' run recorded (problems.parquet), else the synthetic
    # problems of eval.truth_synthetic rebuilt from their ids
    try:
        recorded, _ = runs.run_problems(cfg.data)
    except InputError as err:  # after training, a missing problem source costs this metric, not the run
        recorded = {}
        log(f"[eval prm] the problems of {cfg.data} could not be read ({err}); trying eval.truth_synthetic")
    held_ids = [e["problem_id"] for e in examples.holdout]
    truth_problems = ({pid: recorded[pid] for pid in held_ids if recorded.get(pid, {}).get("quantities")}
                      or problems_by_id(held_ids, ev.truth_synthetic))
    held = [e for e in examples.holdout if e["problem_id"] in truth_problems]
    if not held:
        result["synthetic_skipped"] = (f"no held-out rows with ground truth ({len(examples.holdout)} held out; "
                                       f"ids must be syn-{ev.truth_synthetic.key()}-<i>, set eval.truth_synthetic "
                                       f"to the generation's synthetic config)")
        log(f"[eval prm] {result['synthetic_skipped']}")
    else:
        result["synthetic"] = truth_metrics(cfg, tok, model_path, held, truth_problems)
        log(f"[eval prm] held-out labelled solutions: {_truth_line(result['synthetic'])}")
    if ev.truth_data:
        samples, problems, left_out = truth_samples(ev.truth_data)
        result["truth_data"] = {**truth_metrics(cfg, tok, model_path, samples, problems), "path": ev.truth_data,
                                "left_out": left_out}
        log(f"[eval prm] samples of {ev.truth_data}: {_truth_line(result['truth_data'])}; not scored: "
            f"{left_out or 'none'}")
    # the threshold fitted on held-out ground truth, where there was any: ProcessBench's first-error decision and
    # whoever loads the model (reward_model.json "threshold") use it instead of the fixed eval.threshold
    fitted = next((result[k]["calibrated"]["threshold"] for k in ("synthetic", "truth_data") if k in result), None)
    if fitted is not None:
        result["threshold"] = {"fixed": ev.threshold, "fitted": fitted,
                               "fitted_on": "synthetic" if "synthetic" in result else "truth_data"}
        _record_threshold(model_path, result["threshold"])
    for subset in ev.processbench:
        path = data_root() / "processbench" / f"{subset}.json"
        if not path.exists():
            result[f"processbench_{subset}_skipped"] = f"{path} not found (set STEPRAY_DATA)"
            log(f"[eval prm] ProcessBench {subset}: {path} not found, skipped")
            continue
        rows = json.loads(path.read_text())
        if ev.processbench_limit:  # the first N erroneous and the first N correct solutions: both accuracies exist
            rows = ([r for r in rows if r["label"] >= 0][: ev.processbench_limit]
                    + [r for r in rows if r["label"] < 0][: ev.processbench_limit])
        t = time.time()
        items = [{"idx": i, "prompt": render(tok, r["problem"], "math", cfg.prompt), "steps": r["steps"]}
                 for i, r in enumerate(rows)]
        scored = sorted(scored_rows(_items_dataset(items), model_path, PRMScorer, ev.batch_size, ev.max_len,
                                    cfg.eval.engine.num_gpus),
                        key=lambda r: r["idx"])
        labels = [int(r["label"]) for r in rows]
        pb = processbench_f1([predicted_first_error(list(s["step_scores"]), ev.threshold) for s in scored], labels)
        pb["unscored_steps"] = sum(sum(math.isnan(x) for x in s["step_scores"]) for s in scored)
        if fitted is not None:
            pb["calibrated"] = processbench_f1([predicted_first_error(list(s["step_scores"]), fitted)
                                                for s in scored], labels)
        result[f"processbench_{subset}"] = pb
        cal = f"; at the fitted threshold {fitted:.3f}: F1 {pb['calibrated']['f1']:.3f}" if fitted is not None else ""
        log(f"[eval prm] ProcessBench {subset}: F1 {pb['f1']:.3f} at {ev.threshold} (error acc {pb['error_acc']:.3f}, "
            f"correct acc {pb['correct_acc']:.3f}, {pb['n']} solutions, {time.time() - t:.0f}s){cal}")
    return result


def _items_dataset(items: list[dict]):
    """A Ray Data dataset of the rows to score, on a Ray started here if the caller has none: init_ray is idempotent
    and starts a fresh local cluster, where Ray Data's auto-init would join a stale one named in /tmp/ray."""
    import ray.data

    runtime.init_ray()
    return ray.data.from_items(items)


def truth_samples(path: str) -> tuple[list[dict], dict[str, dict], dict[str, int]]:
    """Finished samples of a `stepray generate` run, the run's problems that have ground truth (quantities: synthetic
    problems, whose steps can be checked), and the rows not scored, by reason."""
    run = Path(path)
    if not (run / "config.json").exists():
        raise MissingInput(f"eval.truth_data={path}: no config.json there; give a `stepray generate` run folder "
                           f"made on synthetic problems")
    found, _ = runs.run_problems(run)
    problems = {pid: p for pid, p in found.items() if p.get("quantities")}
    kind, rows = read_rows(run)
    if kind != "sample":
        raise InputError(f"eval.truth_data={path}: expected Sample rows (a generate run), found {kind} rows")
    samples, left_out = [], {}
    for r in rows:  # what is not scored is counted by reason (reported in eval.json), never silently dropped
        why = ("no_ground_truth" if r["problem_id"] not in problems else "engine_error" if r.get("error")
               else "unfinished" if r.get("finish_reason") != "stop" else "no_steps" if not r.get("steps") else "")
        if why:
            left_out[why] = left_out.get(why, 0) + 1
        else:
            samples.append(r)
    if not samples:
        raise InputError(f"eval.truth_data={path}: no finished samples of problems with ground truth (synthetic "
                         f"problems) to score")
    return samples, {pid: problems[pid] for pid in {r["problem_id"] for r in samples}}, left_out


def truth_metrics(cfg: TrainConfig, tok, model_path: str, rows: list[dict], problems: dict[str, dict]) -> dict:
    """Score rows {problem_id, question | prompt, steps} with the PRM and measure the scores against the ground-truth
    step checks (`metrics.truth_scores_metrics`)."""

    from actors.prm_scorer import PRMScorer

    ev = cfg.eval
    items = [{"idx": i, "steps": list(e["steps"]),
              "prompt": render(tok, e["question"], "numeric", cfg.prompt) if e.get("question") else e["prompt"]}
             for i, e in enumerate(rows)]
    scored = sorted(scored_rows(_items_dataset(items), model_path, PRMScorer, ev.batch_size, ev.max_len,
                                cfg.eval.engine.num_gpus), key=lambda r: r["idx"])
    solutions = [(e["problem_id"], step_truth(problems[e["problem_id"]], e["steps"], e.get("correct"),
                                              e.get("answer") or ""), list(r["step_scores"]))
                 for e, r in zip(rows, scored)]
    return truth_scores_metrics(solutions, ev.threshold)


def _truth_line(m: dict) -> str:
    c = m["calibrated"]
    return (f"F1(step wrong) {m['f1']:.3f} (flag-all baseline {m['flag_all_f1']:.3f}), AUC {m['auc_wrong']:.3f} "
            f"(chance 0.5), first-error accuracy {m['first_error_acc']:.3f}, {m['steps']} steps of "
            f"{m['solutions']} solutions; with a fitted threshold ({c['threshold']:.3f}, cross-fitted): F1 "
            f"{c['f1']:.3f}, first-error accuracy {c['first_error_acc']:.3f}")


def _record_threshold(model_path: str, threshold: dict) -> None:
    """Add the fitted threshold to the model's reward_model.json (read by PRMScorer.ready() as meta)."""
    path = Path(model_path) / "reward_model.json"
    meta = json.loads(path.read_text())
    meta["threshold"] = threshold["fitted"]
    meta["threshold_fitted_on"] = threshold["fitted_on"]
    path.write_text(json.dumps(meta, indent=1))


def evaluate_orm(cfg: TrainConfig, init_path: str, model_path: str, examples, log) -> dict:
    """AUC of the ORM's score against the verifier's verdicts on held-out problems."""

    from actors.prm_scorer import PRMScorer

    if not examples.holdout:
        log("[eval orm] no held-out rows (eval.holdout_fraction is 0 or too small): skipped")
        return {"skipped": "no held-out rows"}
    items = [{"idx": i, "prompt": e["prompt"], "completion": e["completion"]} for i, e in enumerate(examples.holdout)]
    scored = sorted(scored_rows(_items_dataset(items), model_path, PRMScorer, cfg.eval.batch_size,
                                cfg.eval.max_len, cfg.eval.engine.num_gpus), key=lambda r: r["idx"])
    scores = [r["score"] for r in scored]
    labels = [e["target"] >= 0.5 for e in examples.holdout]
    res = {"auc": auc(scores, labels), "accuracy": sum((s >= 0.5) == y for s, y in zip(scores, labels)) / len(labels),
           "positives": sum(labels), "rows": len(labels)}
    log(f"[eval orm] held-out verdicts: AUC {res['auc']:.3f}, accuracy@0.5 {res['accuracy']:.3f} "
        f"({res['positives']} correct of {res['rows']})")
    return res


def evaluate_dpo(cfg: TrainConfig, init_path: str, model_path: str, examples, log) -> dict:
    """The V-STaR verifier on held-out problems' pairs: how often it ranks the verified solution above the failed
    one (pair accuracy; ties count half, so the untrained verifier, whose log-ratio is 0 everywhere, scores 0.5), and
    the AUC of its score against the verdicts over the pairs' distinct solutions."""
    from actors.vstar_scorer import LikelihoodRatioScorer

    if not examples.holdout:
        log("[eval dpo] no held-out pairs (eval.holdout_fraction is 0 or too small): skipped")
        return {"skipped": "no held-out pairs"}
    scorer = LikelihoodRatioScorer(model_path, batch_size=cfg.eval.batch_size, max_len=cfg.eval.max_len,
                                   threads=int(cfg.cpus_per_worker) or 1)
    solutions = {}
    for e in examples.holdout:
        solutions[(e["prompt"], e["chosen"])] = True
        solutions[(e["prompt"], e["rejected"])] = False
    keys = list(solutions)
    ratio = dict(zip(keys, scorer.log_ratio([k[0] for k in keys], [k[1] for k in keys])))
    wins = [1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in
            (ratio[(e["prompt"], e["chosen"])] - ratio[(e["prompt"], e["rejected"])] for e in examples.holdout)
            if not math.isnan(d)]
    res = {"pair_accuracy": sum(wins) / len(wins) if wins else float("nan"), "pairs": len(examples.holdout),
           "auc": auc([ratio[k] for k in keys], [solutions[k] for k in keys]), "solutions": len(keys)}
    log(f"[eval dpo] held-out pairs: the verified solution ranked first in {res['pair_accuracy']:.3f} of "
        f"{res['pairs']} pairs (chance 0.5); AUC on verdicts {res['auc']:.3f} over {res['solutions']} solutions")
    return res


def evaluate_genrm(cfg: TrainConfig, init_path: str, model_path: str, examples, log) -> dict:
    """The GenRM verifier on held-out problems' solutions: AUC of p(Yes) against the verdicts, and the accuracy of
    p(Yes) >= 0.5 (GenRM-CoT: p(Yes) averaged over sampled rationales)."""
    from actors.genrm_scorer import GenerativeVerifierScorer
    from actors.vstar_scorer import VERIFIER_FILE

    held = [e for e in examples.holdout if "verdict" in e]
    if not held:
        log("[eval genrm] no held-out solutions (eval.holdout_fraction is 0 or too small): skipped")
        return {"skipped": "no held-out solutions"}
    questions, solutions = [e["question"] for e in held], [e["solution"] for e in held]
    if json.loads((Path(model_path) / VERIFIER_FILE).read_text()).get("cot"):
        # GenRM-CoT samples rationales on a vLLM engine: a scorer actor with the evaluation engine's resources
        # (a GPU where the config gives one), not this driver
        import ray

        from actors.start import scorer_actor

        eng = cfg.eval.engine
        handle, _ = scorer_actor(model_path, "genrm", eng.num_cpus, eng.num_gpus, eng.threads)
        try:
            scores = ray.get(handle.score_outcome.remote(questions, solutions))
        finally:
            ray.kill(handle)
    else:
        scorer = GenerativeVerifierScorer(model_path, batch_size=cfg.eval.batch_size, max_len=cfg.eval.max_len,
                                          threads=int(cfg.cpus_per_worker) or 1)
        scores = scorer.score_outcome(questions, solutions)
    labels = [e["verdict"] == "Yes" for e in held]
    ok = [(sc, y) for sc, y in zip(scores, labels) if not math.isnan(sc)]
    res = {"auc": auc([sc for sc, _ in ok], [y for _, y in ok]),
           "accuracy": sum((sc >= 0.5) == y for sc, y in ok) / max(len(ok), 1),
           "positives": sum(labels), "rows": len(held)}
    log(f"[eval genrm] held-out verdicts: AUC {res['auc']:.3f}, accuracy@0.5 {res['accuracy']:.3f} "
        f"({res['positives']} correct of {res['rows']})")
    return res


EVALUATE = {"sft": evaluate_sft, "prm": evaluate_prm, "orm": evaluate_orm, "dpo": evaluate_dpo,
            "genrm": evaluate_genrm}

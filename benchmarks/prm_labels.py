"""What limits the verifier: PRMs trained on different step labels of the same samples, at equal training compute,
and an ORM on every sample's verdict, measured on held-out solutions against the synthetic ground truth.

    python -m benchmarks.prm_labels [--problems 160] [--heldout 60] [--n 4] [--label-samples 96] [--steps 20]
                                    [--model smollm2] [--out runs/prm_labels] [--quick]

Each step is the job a user would run (subprocesses, each with its own local Ray):
1. `jobs.generate_samples`: --n samples of --problems synthetic 1-2 step problems (seed 0) and of --heldout
   problems (seed 7), graded by the verifier;
2. `jobs.annotate_steps` on the same --label-samples training samples (balanced selection), three ways:
   step_check (the step checks' prefix truth: process ground truth, no rollouts), outcome (the verdict on every
   step, no rollouts) and mc (Monte-Carlo, the demo's binary+reuse with 4 rollouts); and step_check on every
   training sample (the "amount" axis: ground-truth labels cost nothing here);
3. `jobs.train_model prm` on each label set and `jobs.train_model orm` on every training sample's verdict, all with
   the same optimizer steps (--steps x --batch rows at --lr, from the base model): equal training compute;
4. each model scores the held-out samples (PRMScorer, in this process): AUC of "step is wrong" against the truth
   (PRMs), AUC of "answer is wrong" from the solution score (min over steps; the ORM's one score), best-of-N and
   PRM-weighted vote accuracy at N=--n beside majority and pass@N, with 95% bootstrap intervals over problems
   (the vote differences paired).
A stage whose output folder holds its summary.json is skipped (a re-run with the same --out resumes; copy or link
another run's gen_train/gen_held there to train new models on its samples). Writes <out>/report.json and prints a
table. --quick: the tiny model at smoke-test sizes (numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str]) -> None:
    print("[prm_labels] $ " + " ".join(cmd[1:]), flush=True)
    if subprocess.call(cmd) != 0:
        raise SystemExit(f"[prm_labels] step failed: {' '.join(cmd)}")


def measure(model_dir: Path, kind: str, held: list[dict], problems: dict[str, dict]) -> dict:
    from actors.prm_scorer import PRMScorer
    from pipelines.stats import bootstrap_ci, paired_gain
    from pipelines.prompts import PromptConfig, render
    from pipelines.train.metrics import auc, step_truth, truth_scores_metrics
    from pipelines.votes import best_index, majority_vote, reduce_steps, weighted_majority_vote

    cache = model_dir.parent / "heldout_scores.json"  # scoring is the slow part: a re-measure reads it back
    if cache.exists() and json.loads(cache.read_text()).get("n") == len(held):
        steps = json.loads(cache.read_text())["steps"]
        value = json.loads(cache.read_text())["value"]
    else:
        scorer = PRMScorer(str(model_dir), threads=-1)
        pcfg = PromptConfig(**scorer.meta["prompt"]) if scorer.meta.get("prompt") else PromptConfig()
        prompts = [render(scorer.tokenizer, problems[s["problem_id"]]["question"], "numeric", pcfg) for s in held]
        if kind == "prm":
            steps = scorer.score(prompts, [list(s["steps"]) for s in held])
            value = [reduce_steps(v, "min") for v in steps]
        else:
            value = scorer.score_outcome(prompts, [s["completion"] for s in held])
            steps = None
        cache.write_text(json.dumps({"n": len(held), "steps": steps, "value": value}))
    by_problem: dict[str, list[int]] = {}
    for i, s in enumerate(held):
        by_problem.setdefault(s["problem_id"], []).append(i)
    pids = sorted(by_problem)

    def ranking(val: list[float]) -> dict:
        """Outcome AUC, best-of-N and weighted vote of one solution score, with intervals over problems."""
        def outcome_auc(ps):
            idx = [i for p in ps for i in by_problem[p]]
            return auc([-val[i] for i in idx], [not held[i]["correct"] for i in idx])

        def solved(how: str) -> dict[str, bool]:
            """Per problem, whether the method's pick is right: computed once (a vote groups answers through the
            math-equivalence worker; a bootstrap that re-voted every resample spent minutes per model there)."""
            out = {}
            for p, idx in by_problem.items():
                answers = [held[i]["answer"] for i in idx]
                if how == "best":
                    j = best_index(answers, [val[i] for i in idx])
                    out[p] = j is not None and bool(held[idx[j]]["correct"])
                else:
                    win = (majority_vote(answers) if how == "majority" else
                           weighted_majority_vote(answers, [val[i] for i in idx]))
                    out[p] = bool(win) and any(held[i]["answer"] == win and held[i]["correct"] for i in idx)
            return out

        hits = {how: solved(how) for how in ("best", "weighted", "majority")}
        r = {"outcome_auc": outcome_auc(pids), "outcome_auc_ci": bootstrap_ci(pids, outcome_auc)}
        for how in ("best", "weighted", "majority"):
            r[f"{how}@n"] = sum(hits[how].values()) / len(pids)
        r["weighted_minus_majority_ci"] = paired_gain(hits["majority"], hits["weighted"])["ci"]
        r["best_minus_majority_ci"] = paired_gain(hits["majority"], hits["best"])["ci"]
        return r

    res = ranking(value)  # the PRM's min over steps (the ORM's one score)
    if steps is not None:  # the other reductions of the step scores, beside min
        res["by_reduction"] = {how: ranking([reduce_steps(v, how) for v in steps]) for how in ("last", "prod")}
    if steps is not None:
        sols = [(s["problem_id"], step_truth(problems[s["problem_id"]], s["steps"], s["correct"], s["answer"]),
                 steps[i])
                for i, s in enumerate(held)]
        m = truth_scores_metrics(sols, 0.5)
        res.update({"step_auc": m["auc_wrong"], "step_f1@0.5": m["f1"], "step_f1_fitted": m["calibrated"]["f1"],
                    "threshold_fitted": m["calibrated"]["threshold"],
                    "first_error_acc_fitted": m["calibrated"]["first_error_acc"]})

        def step_auc(ps):
            chosen = [sols[i] for p in ps for i in by_problem[p]]
            flat = [(sc, ok) for _, oks, scs in chosen for sc, ok in zip(scs, oks) if not math.isnan(sc)]
            return auc([-sc for sc, _ in flat], [not ok for _, ok in flat])
        res["step_auc_ci"] = bootstrap_ci(pids, step_auc)

        # Prefix truth makes every step after a first error wrong, so late steps are mostly wrong and early ones
        # mostly right: a scorer that only knows a step's position gets a high AUC. The AUC among steps at the same
        # position (pooled over positions, weighted by their pairs) takes that prior out.
        by_pos: dict[int, list[tuple[float, bool]]] = {}
        for _, oks, scs in sols:
            for t, (sc, ok) in enumerate(zip(scs, oks)):
                if not math.isnan(sc):
                    by_pos.setdefault(t, []).append((sc, ok))
        num = den = 0.0
        for pairs in by_pos.values():
            wrong = sum(not ok for _, ok in pairs)
            w = wrong * (len(pairs) - wrong)
            if w:
                num += w * auc([-sc for sc, _ in pairs], [not ok for _, ok in pairs])
                den += w
        res["step_auc_same_position"] = num / den if den else math.nan
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=160)
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--n", type=int, default=4, help="samples per problem (and N of best-of-N / the votes)")
    ap.add_argument("--label-samples", type=int, default=96, help="training samples labelled by each method")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of every model")
    ap.add_argument("--batch", type=int, default=8, help="rows per optimizer step")
    ap.add_argument("--lr", type=float, default=5e-5, help="learning rate of every model")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="runs/prm_labels")
    ap.add_argument("--labels", default="step_check,outcome,mc,step_check_all",
                    help="label sets to train PRMs on (comma list of step_check, outcome, mc, step_check_all, "
                         "outcome_all, step_check_all_planted: *_all labels every training sample, the others "
                         "--label-samples; *_planted adds --planted solutions per problem with planted errors)")
    ap.add_argument("--planted", type=int, default=6, help="planted solutions per training problem added to the "
                                                             "step_check_all_planted labels")
    ap.add_argument("--no-orm", action="store_true", help="skip the ORM on every sample's verdict")
    ap.add_argument("--train-args", default="", help="more `stepray train` overrides for every model, space "
                                                     "separated (e.g. 'precision=bf16 freeze_layers=20')")
    ap.add_argument("--measure-only", action="store_true", help="skip generation, labels and training: measure the "
                                                                 "models an earlier run with the same --out made")
    ap.add_argument("--quick", action="store_true", help="tiny model, smoke-test sizes")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.problems, args.heldout, args.n, args.label_samples, args.steps = "tiny", 4, 3, 2, 4, 2
        args.batch = 2
    out, py, t0 = Path(args.out), sys.executable, time.time()
    syn = ["problems=synthetic", "synthetic.min_steps=1", "synthetic.max_steps=2"]
    gen = [f"sampling.n={args.n}", "sampling.max_tokens=128", "sampling.logprobs=0", "greedy=false",
           f"engine.model={args.model}", "--no-mlflow"]
    steps = [] if args.measure_only else ["gen", "label", "train"]
    done = lambda d: (out / d / "summary.json").exists()  # noqa: E731 - a stage whose output exists is skipped
    for name, n, seed in (("gen_train", args.problems, 0), ("gen_held", args.heldout, 7)) if steps else ():
        if not done(name):
            run([py, "-m", "jobs.generate_samples", "--out", str(out / name), *syn, f"synthetic.n={n}",
                 f"synthetic.seed={seed}", *gen])
    label_sets = {"step_check": ["--labels", "step_check", "--limit", str(args.label_samples)],
                  "outcome": ["--labels", "outcome", "--limit", str(args.label_samples)],
                  "mc": ["--labels", "mc", "--method", "binary", "--reuse", "--rollouts", "4",
                         "--limit", str(args.label_samples), "max_tokens=96"],
                  "step_check_all": ["--labels", "step_check"],
                  "outcome_all": ["--labels", "outcome"],
                  "step_check_all_planted": ["--labels", "step_check", f"planted={args.planted}"]}
    chosen = [x.strip() for x in args.labels.split(",") if x.strip()]
    unknown = sorted(set(chosen) - set(label_sets))
    if unknown:
        raise SystemExit(f"[prm_labels] --labels: unknown label set(s) {unknown}; choose from {sorted(label_sets)}")
    labelled = {k: label_sets[k] for k in chosen}
    for name, opts in labelled.items() if steps else ():
        if not done(f"ann_{name}"):
            run([py, "-m", "jobs.annotate_steps", "--samples", str(out / "gen_train" / "samples"), "--model", args.model,
                 "--out", str(out / f"ann_{name}"), "--no-mlflow", *opts, "select=balanced"])
    train = ["--base", args.model, f"max_steps={args.steps}", "epochs=1000", f"batch_size={args.batch}",
             f"lr={args.lr}", "num_workers=1", "cpus_per_worker=2", "eval.enabled=false", "eval.holdout_fraction=0",
             "--no-mlflow", *args.train_args.split()]
    for name in labelled if steps else ():
        if not done(f"prm_{name}"):
            run([py, "-m", "jobs.train_model", "prm", "--data", str(out / f"ann_{name}" / "labels"),
                 "--out", str(out / f"prm_{name}"), *train])
    if steps and not args.no_orm and not done("orm"):
        run([py, "-m", "jobs.train_model", "orm", "--data", str(out / "gen_train"), "--out", str(out / "orm"),
             *train])

    import pyarrow.parquet as pq

    from pipelines import runs

    problems, _ = runs.run_problems(out / "gen_held")
    held = [s for s in pq.read_table(out / "gen_held" / "samples").to_pylist()
            if not s["error"] and s["steps"]]  # unfinished ones too: they are candidates of best-of-N
    report = {"args": vars(args), "heldout_samples": len(held),
              "heldout_problems": len({s["problem_id"] for s in held}),
              "pass@n": sum(any(s["correct"] for s in held if s["problem_id"] == p)
                            for p in {s["problem_id"] for s in held}) / max(1, len({s["problem_id"] for s in held})),
              "models": {}}
    for name in labelled:
        labels = pq.read_table(out / f"ann_{name}" / "labels").to_pylist()
        report["models"][f"prm_{name}"] = {
            "labelled_steps": sum(h in (0, 1) for r in labels for h in r["hard_labels"]),
            **measure(out / f"prm_{name}" / "model", "prm", held, problems)}
    if not args.no_orm:
        report["models"]["orm"] = {"labelled_steps": None, **measure(out / "orm" / "model", "orm", held, problems)}
    report["wall_s"] = time.time() - t0
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))

    def f(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    def ci(x):
        return f"[{f(x[0])}, {f(x[1])}]" if x else "-"

    print(f"\nheld-out: {report['heldout_samples']} samples of {report['heldout_problems']} problems, "
          f"pass@{args.n} {f(report['pass@n'])}")
    print("| model | labelled steps | step AUC [95% CI] | step AUC, same position | F1@0.5 / fitted | outcome AUC [95% CI] | best@n | "
          "weighted@n | majority@n | weighted - majority [95% CI] |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, m in report["models"].items():
        print(f"| {name} | {m['labelled_steps'] if m['labelled_steps'] is not None else 'all verdicts'} | "
              f"{f(m.get('step_auc'))} {ci(m.get('step_auc_ci'))} | {f(m.get('step_auc_same_position'))} | "
              f"{f(m.get('step_f1@0.5'))} / "
              f"{f(m.get('step_f1_fitted'))} | {f(m['outcome_auc'])} {ci(m['outcome_auc_ci'])} | {f(m['best@n'])} | "
              f"{f(m['weighted@n'])} | {f(m['majority@n'])} | {ci(m['weighted_minus_majority_ci'])} |")
    print(f"\n[prm_labels] {report['wall_s']:.0f}s; report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation metrics (pure) and the runners that take the engine or scorer they use."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

from pipelines.problems import SyntheticConfig
from pipelines.steps import wrong_step_scores

def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """ROC AUC by the Mann-Whitney statistic (ties count 1/2); NaN when one class is absent."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2  # ranks i+1..j share their mean
        rank_sum += mean_rank * sum(lab for _, lab in ranked[i:j])
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def fit_threshold(scores: Sequence[float], wrong: Sequence[bool], default: float = 0.5) -> float:
    """The decision threshold t of "step is wrong" (score < t) with the best F1 on these labelled steps.

    Candidates lie midway between consecutive distinct scores (and just above the highest), so every way of cutting
    the sorted scores is tried once; equal F1 goes to the candidate nearest `default`. With no wrong step, or no
    right one, there is nothing to fit and `default` is returned. NaN scores (unscored steps) are left out."""
    pairs = sorted((s, bool(w)) for s, w in zip(scores, wrong, strict=True) if not math.isnan(s))
    n_wrong = sum(w for _, w in pairs)
    if n_wrong == 0 or n_wrong == len(pairs):
        return default
    best_f1, best_t = -1.0, default
    tp = fp = 0
    i = 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:  # a tie is on one side of every threshold
            tp += pairs[j][1]
            fp += not pairs[j][1]
            j += 1
        t = (pairs[i][0] + pairs[j][0]) / 2 if j < len(pairs) else math.nextafter(pairs[i][0], math.inf)
        f1 = 2 * tp / (2 * tp + fp + (n_wrong - tp))
        if f1 > best_f1 + 1e-12 or (abs(f1 - best_f1) <= 1e-12 and abs(t - default) < abs(best_t - default)):
            best_f1, best_t = f1, t
        i = j
    return best_t


def predicted_first_error(step_scores: Sequence[float], threshold: float) -> int:
    """The first step whose score is below threshold, -1 if none (unscored steps, NaN, are not flagged)."""
    for i, s in enumerate(step_scores):
        if not math.isnan(s) and s < threshold:
            return i
    return -1


def processbench_f1(pred: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """ProcessBench: accuracy on erroneous solutions (predicted index == label), on correct ones (predicted -1),
    and their harmonic mean (the paper's F1)."""
    err = [p == y for p, y in zip(pred, labels) if y >= 0]
    ok = [p == -1 for p, y in zip(pred, labels) if y < 0]
    acc_err = sum(err) / len(err) if err else float("nan")
    acc_ok = sum(ok) / len(ok) if ok else float("nan")
    if math.isnan(acc_err) or math.isnan(acc_ok):
        f1 = float("nan")
    else:
        f1 = 2 * acc_err * acc_ok / (acc_err + acc_ok) if acc_err + acc_ok > 0 else 0.0
    return {"error_acc": acc_err, "correct_acc": acc_ok, "f1": f1, "n": len(pred)}


def step_truth(problem: dict, steps: Sequence[str], correct: bool | None = None, answer: str = "") -> list[bool]:
    """Ground truth for a synthetic problem's steps, prefix-level: step i is right while no step up to it is wrong.

    A step is wrong when the step checks fail it (`verify.first_error`: false arithmetic, an unknown operand, a
    stated answer that is not the reference). With the sample's verdict: a solution whose extracted `answer` is
    wrong (`correct` False) has a wrong last step when no earlier step is wrong, since that step concludes the
    wrong answer (a claim like "23 - 5 = 18" holds as arithmetic yet answers another question). Without an answer
    (an unfinished solution) nothing more is said."""
    from pipelines.verify import first_error

    fe = first_error(list(steps), problem["quantities"], problem["answer"])
    if fe < 0 and correct is False and str(answer or "").strip() and steps:
        fe = len(steps) - 1
    return [fe < 0 or i < fe for i in range(len(steps))]


def problems_by_id(ids: Sequence[str], synthetic: SyntheticConfig) -> dict[str, dict]:
    """Synthetic problems for ids of the form syn-<key>-<index> whose key is synthetic.key() (others are left out)."""
    from pipelines.synthetic import synthetic_problem

    out = {}
    prefix = f"syn-{synthetic.key()}-"
    for pid in set(ids):
        if pid.startswith(prefix) and pid[len(prefix):].isdigit():
            out[pid] = synthetic_problem(synthetic, int(pid[len(prefix):]))
    return out


def greedy_accuracy(generator, problems: Sequence[dict], prompts: Sequence[str], max_tokens: int,
                    timeout_s: float = 5.0) -> dict[str, Any]:
    """Greedy decoding through a VLLMGenerator actor handle, graded by the verifier: accuracy and counts."""
    import ray

    from pipelines.verify import grade

    outs = ray.get(generator.generate.remote(list(prompts), {"n": 1, "temperature": 0.0, "max_tokens": max_tokens}))
    correct, tokens, errors = 0, 0, 0
    for p, comps in zip(problems, outs):
        c = comps[0]
        errors += bool(c["error"])
        tokens += len(c["token_ids"])
        correct += grade(c["text"], p["answer"], kind=p["kind"], timeout_s=timeout_s).correct
    return {"accuracy": correct / max(len(problems), 1), "correct": correct, "problems": len(problems),
            "tokens": tokens, "errors": errors}


def scored_rows(ds, model_path: str, scorer_cls: type, batch_size: int, max_len: int,
                num_gpus: float = 0.0) -> list[dict]:
    """Score a Ray Dataset of {prompt, steps | completion} rows with a scorer pool (PRMScorer): rows + scores.
    num_gpus is what each scorer actor asks Ray for; the scorer picks its torch device from what Ray gave it."""
    import ray.data

    # threads=-1: a CPU scorer uses every core (it runs alone, after training)
    return ds.map_batches(scorer_cls, fn_constructor_kwargs={"model_path": model_path, "max_len": max_len,
                                                             "batch_size": batch_size, "device": "auto",
                                                             "threads": 0 if num_gpus else -1},
                          batch_format="pyarrow", batch_size=64, num_cpus=1, num_gpus=num_gpus or None,
                          compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1)).take_all()


def step_f1(pred_ok: Sequence[Sequence[bool]], truth_ok: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Precision / recall / F1 of "step is wrong" (the positive class) over all steps, plus accuracy; the
    convention of `pipelines.steps.wrong_step_scores` (F1 NaN when nothing was wrong and nothing flagged)."""
    tp = fp = fn = tn = 0
    for pred, truth in zip(pred_ok, truth_ok, strict=True):
        for p, t in zip(pred, truth, strict=True):
            tp += (not p) and (not t)
            fp += (not p) and t
            fn += p and (not t)
            tn += p and t
    n = tp + fp + fn + tn
    return {**wrong_step_scores(tp, fp, fn, tn),
            "steps": n, "wrong_share": (tp + fn) / n if n else float("nan")}


def truth_scores_metrics(solutions: Sequence[tuple[str, Sequence[bool], Sequence[float]]], threshold: float) -> dict:
    """A PRM's step scores against the truth, one (problem_id, step is right, step scores) per solution: P/R/F1 of
    "step is wrong" (score < threshold), the flag-all baseline, AUC, first-error accuracy, and `calibrated`, the
    same decisions with a fitted threshold instead of the fixed one.

    Calibration is cross-fitted so that no solution is judged by a threshold fitted on its own steps: problems
    are split in two by a hash of their id, each half is decided with `fit_threshold` on the other half, and the
    metrics pool both halves. `calibrated.threshold` is fitted on all of them: the one to use on new data."""
    truth, pred, flat_scores, flat_ok, fe_hits = [], [], [], [], 0
    fold = [int(hashlib.sha1(pid.encode()).hexdigest()[:8], 16) % 2 for pid, _, _ in solutions]
    for _, ok, scores in solutions:
        keep = [j for j, s in enumerate(scores) if not math.isnan(s)]
        truth.append([ok[j] for j in keep])
        pred.append([scores[j] >= threshold for j in keep])
        flat_scores += [scores[j] for j in keep]
        flat_ok += [ok[j] for j in keep]
        fe_hits += predicted_first_error(scores, threshold) == _first_false(ok)
    f1 = step_f1(pred, truth)
    fitted = {}
    for f in (0, 1):
        other = [(s, not o) for (_, ok, scores), g in zip(solutions, fold) if g != f
                 for s, o in zip(scores, ok) if not math.isnan(s)]
        fitted[f] = fit_threshold([s for s, _ in other], [w for _, w in other], threshold)
    cal_pred = [[scores[j] >= fitted[g] for j, s in enumerate(scores) if not math.isnan(s)]
                for (_, _, scores), g in zip(solutions, fold)]
    cal = step_f1(cal_pred, truth)
    cal_fe = sum(predicted_first_error(scores, fitted[g]) == _first_false(ok)
                 for (_, ok, scores), g in zip(solutions, fold))
    n = max(len(solutions), 1)
    return {**f1, "auc_wrong": auc([-s for s in flat_scores], [not o for o in flat_ok]),
            "flag_all_f1": flag_all_f1(f1["wrong_share"]), "first_error_acc": fe_hits / n,
            "solutions": len(solutions),
            "calibrated": {"threshold": fit_threshold(flat_scores, [not o for o in flat_ok], threshold),
                           "fold_thresholds": [fitted[0], fitted[1]], "precision": cal["precision"],
                           "recall": cal["recall"], "f1": cal["f1"], "first_error_acc": cal_fe / n}}


def _first_false(ok: Sequence[bool]) -> int:
    return next((j for j, o in enumerate(ok) if not o), -1)


def flag_all_f1(wrong_share: float) -> float:
    """The trivial baseline: F1 of "step is wrong" when every step is flagged (precision p, recall 1)."""
    return 2 * wrong_share / (1 + wrong_share) if wrong_share == wrong_share else float("nan")

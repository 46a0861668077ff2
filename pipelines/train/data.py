"""The data path (driver side, pure): reading rows, selecting samples, mapping labels to targets, hold-out,
examples and token rows."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipelines import inputs, schema
from pipelines.config import InputError
from pipelines.prompts import render
from pipelines.train.config import SelectConfig, TrainConfig

DATA_HINT = ("give a parquet file or folder (the samples/ of `stepray generate`, the labels/ of `stepray annotate`), "
             "or a .json/.jsonl label file")


def data_files(path: str | Path) -> list[Path]:
    """The files behind --data: a file, or a folder's *.parquet (a generate run's `samples/`, an annotate run's
    `labels/`). A missing path or a folder without parquet files is an InputError naming it."""
    p = inputs.existing(path, "training data", DATA_HINT)
    if p.is_file():
        return [p]
    for sub in ("samples", "labels"):  # a `stepray generate` or a `stepray annotate` output folder
        # (its own parquet files at the top are its problems.parquet, which is not training data)
        if (p / sub).is_dir() and not [f for f in p.glob("*.parquet") if f.name != "problems.parquet"]:
            p = p / sub
            break
    return inputs.parquet_files(p, "training data", DATA_HINT)


def read_rows(path: str | Path) -> tuple[str, list[dict]]:
    """(detected row kind, rows) from parquet files (schema-checked when they are a stepray kind) or json/jsonl.

    A file that cannot be read as its format is an InputError naming it (checked before Ray or a trainer starts)."""
    files = data_files(path)
    rows: list[dict] = []
    for f in files:
        if f.suffix == ".parquet":
            table = inputs.read_parquet(f, "training data", hint=DATA_HINT)
            kind = detect_kind(table.column_names, {})
            if kind in ("sample", "step_label", "trajectory"):
                table = schema.check_table(table, kind, where=f"training data {f}")
            rows.extend(table.to_pylist())
        elif f.suffix in (".json", ".jsonl"):
            try:
                if f.suffix == ".json":
                    data = json.loads(f.read_bytes())
                    if not isinstance(data, list):
                        raise InputError(f"training data {f}: expected a JSON array of rows (ProcessBench layout), "
                                         f"got a JSON {type(data).__name__}")
                else:
                    data = [json.loads(line) for line in f.read_bytes().splitlines() if line.strip()]
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError; an InputError passes as it is
                if isinstance(e, InputError):
                    raise
                raise InputError(f"training data {f}: not {'JSON' if f.suffix == '.json' else 'JSON lines'} "
                                 f"({inputs.first_line(e)}); {DATA_HINT}") from None
            bad = next((i for i, r in enumerate(data, 1) if not isinstance(r, dict)), None)
            if bad is not None:
                raise InputError(f"training data {f}: row {bad} is not a JSON object; {DATA_HINT}")
            rows.extend(data)
        else:
            raise InputError(f"training data {f}: unsupported file type {f.suffix!r}; {DATA_HINT}")
    if not rows:
        raise InputError(f"training data {path}: holds no rows; {DATA_HINT}")
    return detect_kind(list(rows[0].keys()), rows[0]), rows


def detect_kind(columns: Sequence[str], first: dict) -> str:
    cols = set(columns)
    if "soft_labels" in cols and "steps" in cols:
        return "step_label"
    if {"correct", "completion", "prompt"} <= cols:
        return "sample"
    if {"completion", "prompt", "weight"} <= cols:
        return "trajectory"
    if "steps" in cols and "label" in cols and isinstance(first.get("label"), int):
        return "processbench"
    if "steps" in cols and "ratings" in cols:
        return "prm800k"
    if isinstance(first.get("label"), dict) and "steps" in first["label"]:
        return "prm800k"
    return "unknown"


_ACCEPTS = {"sft": ("sample", "trajectory"), "prm": ("step_label", "prm800k", "processbench"), "orm": ("sample",),
            "dpo": ("sample",), "genrm": ("sample",)}


def _norm_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def select_sft(samples: Sequence[dict], cfg: SelectConfig, problems: dict[str, dict] | None = None
               ) -> tuple[list[dict], dict[str, int]]:
    """Verified samples -> Trajectory rows (module docstring). Returns (rows, counts of why the others were left).

    problems (by id): with cfg.step_checks, a sample of a problem with step checks (quantities known) must also pass
    every step check; with cfg.shows_work, a numeric sample must compute its answer in a true claim."""
    from pipelines.train.metrics import step_truth  # the step checks' prefix truth, as the PRM's ground truth
    from pipelines.verify import computes_answer

    def stated_only(s: dict) -> bool:
        return cfg.shows_work and s.get("kind", "numeric") == "numeric" and \
            not computes_answer(list(s.get("steps") or []), s.get("answer"))

    def wrong_step(s: dict) -> bool:
        p = (problems or {}).get(s["problem_id"])
        if not cfg.step_checks or not p or not p.get("quantities"):
            return False
        return not all(step_truth(p, list(s.get("steps") or [])))

    why: dict[str, int] = {}
    by_problem: dict[str, list[dict]] = {}
    for s in samples:
        reason = ("error" if s.get("error") else "not_correct" if not s.get("correct")
                  else "no_stop" if cfg.require_stop and s.get("finish_reason") != "stop"
                  else "empty" if not str(s.get("completion") or "").strip()
                  else "wrong_step" if wrong_step(s) else "answer_not_computed" if stated_only(s) else "")
        if reason:
            why[reason] = why.get(reason, 0) + 1
            continue
        by_problem.setdefault(s["problem_id"], []).append(s)
    kept: list[dict] = []
    for pid, rows in by_problem.items():
        rows = sorted(rows, key=lambda r: (r.get("mode") != "sample", r.get("sample_idx") or 0, r["sample_id"]))
        seen: set[str] = set()
        mine = []
        for r in rows:
            key = _norm_text(r["completion"])
            if cfg.dedup and key in seen:
                why["duplicate"] = why.get("duplicate", 0) + 1
                continue
            seen.add(key)
            if cfg.k and len(mine) >= cfg.k:
                why["over_k"] = why.get("over_k", 0) + 1
                continue
            mine.append(r)
        weight = 1.0 / len(mine) if cfg.balance else 1.0
        kept += [{"problem_id": pid, "sample_id": r["sample_id"], "prompt": r["prompt"],
                  "completion": r["completion"], "weight": weight} for r in mine]
    return kept, why


def _by_verdict(samples: Sequence[dict], why: dict[str, int], verified=lambda r: bool(r.get("correct"))
                ) -> dict[str, tuple[list[dict], list[dict]]]:
    """Problem id -> (verified samples, failed samples); generation errors and empty samples are no evidence either
    way and are counted in why["error_or_empty"]."""
    by_problem: dict[str, tuple[list[dict], list[dict]]] = {}
    for r in samples:
        if r.get("error") or not str(r.get("completion") or "").strip():
            why["error_or_empty"] = why.get("error_or_empty", 0) + 1
            continue
        good, bad = by_problem.setdefault(r["problem_id"], ([], []))
        (good if verified(r) else bad).append(r)
    return by_problem


def _distinct(side: Sequence[dict], dedup: bool, why: dict[str, int]) -> list[dict]:
    """The samples in sample-id order, without whitespace-normalised repeats when dedup (counted in why)."""
    seen, kept = set(), []
    for r in sorted(side, key=lambda r: r["sample_id"]):
        norm = _norm_text(r["completion"])
        if dedup and norm in seen:
            why["duplicate"] = why.get("duplicate", 0) + 1
            continue
        seen.add(norm)
        kept.append(r)
    return kept


def preference_pairs(samples: Sequence[dict], k: int, seed: int = 0, dedup: bool = True
                     ) -> tuple[list[dict], dict[str, int]]:
    """V-STaR's preference pairs: per problem, (verified, failed) pairs of its samples, at most k of them drawn
    without replacement from all such pairs (random.Random(f"{seed}:{problem}"), so the draw is reproducible and does
    not depend on other problems). Failed means graded and wrong (a generation error is no evidence either way);
    unfinished wrong samples count as failed, as in V-STaR. Returns (pair examples {problem_id, sample_id
    "<chosen>><rejected>", prompt, chosen, rejected, weight}, counts of what could not be paired, by reason)."""
    import random

    why: dict[str, int] = {}
    out: list[dict] = []
    for pid, (good, bad) in _by_verdict(samples, why).items():
        if not good or not bad:
            key = "problem_without_verified" if not good else "problem_without_failed"
            why[key] = why.get(key, 0) + 1
            continue
        pairs = [(g, b) for g in _distinct(good, dedup, why) for b in _distinct(bad, dedup, why)]
        random.Random(f"{seed}:{pid}").shuffle(pairs)
        why["over_k"] = why.get("over_k", 0) + max(0, len(pairs) - k)
        out += [{"problem_id": pid, "sample_id": f"{g['sample_id']}>{b['sample_id']}", "prompt": g["prompt"],
                 "chosen": g["completion"], "rejected": b["completion"], "weight": 1.0} for g, b in pairs[:k]]
    return out, {k_: v for k_, v in why.items() if v}


def correction_pairs(samples: Sequence[dict], k: int, seed: int = 0, dedup: bool = True, cue: str = ""
                     ) -> tuple[list[dict], dict[str, int]]:
    """Learning-to-correct rows: per problem, at most k (failed, verified) pairs of its samples (drawn as in
    `preference_pairs`), each an SFT row whose prompt is the generator's prompt, the failed attempt and the revise
    cue (`search_ledger.revision_prompt`, the prompt the `revise` strategy writes) and whose target is the verified
    solution. Returns (rows {problem_id, sample_id, prompt, completion, weight}, counts of what was left out)."""
    from pipelines.search_ledger import REVISE_CUE, revision_prompt

    pairs, why = preference_pairs(samples, k, seed, dedup)
    rows = [{"problem_id": p["problem_id"], "sample_id": f"{p['sample_id']}/revise",
             "prompt": revision_prompt(p["prompt"], p["rejected"], cue or REVISE_CUE), "completion": p["chosen"],
             "weight": 1.0} for p in pairs]
    return rows, why


BACKTRACK = "That step is wrong. Back to the start, another way:"
DEAD_END = "That does not reach the answer. Back to the start, another way:"


def stream_of_search(samples: Sequence[dict], problems: dict[str, dict], k: int, fmt: str = "lines", seed: int = 0
                     ) -> tuple[list[dict], dict[str, int]]:
    """Stream-of-search rows: per problem with a verified sample, one SFT row whose target is a linearised search:
    up to k failed attempts (dead ends), each cut after its first wrong step where the step checks can tell
    (synthetic problems: `metrics.step_truth`) and followed by a backtrack line (BACKTRACK; DEAD_END where no step is
    known wrong), then the verified solution, whose final answer is the row's last. The tree searched is the
    problem's samples (a root with N children, each a path); the dead ends are drawn with
    random.Random(f"{seed}:{problem}"). Returns (rows {problem_id, sample_id, prompt, completion, weight}, counts)."""
    import random

    from pipelines.prompts import join_steps, split_steps
    from pipelines.train.metrics import step_truth

    why: dict[str, int] = {}
    out: list[dict] = []
    finished = _by_verdict(samples, why, lambda r: bool(r.get("correct")) and r.get("finish_reason", "stop") == "stop")
    for pid, (good, bad) in finished.items():
        if not good:
            why["problem_without_verified"] = why.get("problem_without_verified", 0) + 1
            continue
        rng = random.Random(f"{seed}:{pid}")
        bad = sorted(bad, key=lambda r: r["sample_id"])
        rng.shuffle(bad)
        target = sorted(good, key=lambda r: r["sample_id"])[0]
        problem = problems.get(pid) or {}
        parts = []
        for r in bad[:k]:
            steps = list(r.get("steps") or split_steps(r["completion"], fmt))
            truth = step_truth(problem, steps, bool(r.get("correct")), str(r.get("answer") or "")) \
                if problem.get("quantities") else [True] * len(steps)
            if False in truth:  # cut after the first wrong step: where the search turns back
                parts.append(join_steps(steps[: truth.index(False) + 1], fmt) + BACKTRACK + "\n")
            else:
                parts.append(join_steps(steps, fmt) + DEAD_END + "\n")
        if not parts:
            why["problem_without_failed"] = why.get("problem_without_failed", 0) + 1
            continue
        out.append({"problem_id": pid, "sample_id": f"{target['sample_id']}/sos", "prompt": target["prompt"],
                    "completion": "".join(parts) + target["completion"], "weight": 1.0})
    return out, {k_: v for k_, v in why.items() if v}


BACKTRACK_TO = "That step is wrong. Back to step {n}:"  # then step n of the path the search goes on from
DEAD_END_TO = "That does not reach the answer. Back to step {n}:"


def tree_stream(tree: Sequence[dict], chosen: int, problem: dict, k: int, fmt: str = "lines"
                ) -> tuple[str | None, dict[str, int]]:
    """Stream of search over a step-level search tree (beam, DVTS or MCTS with `search.record_tree`): the search's
    dead ends and its backtracks, then the path it finished on, as one SFT target.

    `tree`: the nodes of `SearchResult.meta["tree"]` ({id, parent, text, terminal}, parents before children, the
    root is -1), `chosen`: the node the search finished on (a verified solution: the caller checks). Walking the
    chosen path from the root, before each of its steps come its dead ends, in the order the search made them: a
    sibling of that step (another child of the same node) followed down the deepest branch the search grew under it;
    k in all, taken one depth at a time in turn so that deep backtracks show as well as the root's. A dead end is
    written up to its first wrong step where the step checks tell (synthetic problems: `metrics.step_truth` on the
    path's steps before it plus the branch) and followed by BACKTRACK_TO; a branch that finished on a wrong answer
    with no step known wrong is written whole and followed by DEAD_END_TO; a branch that was pruned while every step
    checked out is left out (the search preferred another, it did not err). The backtrack line names the step the
    stream returns to and repeats it (at the root: BACKTRACK / DEAD_END, "Back to the start"). The chosen path's own
    text follows verbatim, so the stream's last answer is the verified one. Returns (the stream, or None with no
    dead end to show; counts of what was left out)."""
    from pipelines.prompts import join_steps, separator, split_steps
    from pipelines.train.metrics import step_truth
    from pipelines.verify import extract_answer, grade
    from pipelines.verify.extract import STATED_ANSWER

    why: dict[str, int] = {}
    nodes = {n["id"]: n for n in tree}
    if chosen not in nodes:
        return None, {"no_chosen_node": 1}
    kids: dict[int, list[int]] = {}
    for n in tree:
        kids.setdefault(n["parent"], []).append(n["id"])
    path, i = [], chosen
    while i != -1:
        path.append(i)
        i = nodes[i]["parent"]
    path.reverse()
    on_path = set(path)

    def deepest(i: int) -> list[int]:  # the longest branch from i (the first grown on ties)
        best: list[int] = []
        for c in kids.get(i, []):
            b = deepest(c)
            if len(b) > len(best):
                best = b
        return [i] + best

    def count(key: str) -> None:
        why[key] = why.get(key, 0) + 1

    sep = separator(fmt)
    if any(not nodes[i]["text"].endswith(sep) for i in path[:-1]):
        # a mini-step or a step cut at step_tokens: a dead end would be spliced into the middle of a line
        return None, {"path_not_whole_steps": 1}
    if problem.get("quantities"):
        chosen_steps = split_steps("".join(nodes[i]["text"] for i in path), fmt)
        if not all(step_truth(problem, chosen_steps)):  # a right answer reached by a wrong step is not shown
            return None, {"path_fails_step_checks": 1}

    # every dead end of each depth of the chosen path, in the order the search made them (repeats once)
    found: list[list[list[str]]] = []
    done_steps: list[str] = []
    for node_id in path:
        found.append([])
        seen: set[str] = set()
        for sib in kids.get(nodes[node_id]["parent"], []):
            if sib in on_path:
                continue
            branch = deepest(sib)
            text = "".join(nodes[b]["text"] for b in branch)
            steps = split_steps(text, fmt)
            finished = nodes[branch[-1]]["terminal"]
            stated = extract_answer(text) if finished else None  # an answer the branch states, not a last number
            answer = stated.answer if stated and stated.method in STATED_ANSWER else None
            wrong_answer = bool(answer) and not grade(text, problem.get("answer", ""),
                                                      kind=problem.get("kind", "numeric")).correct
            cut = None
            if problem.get("quantities") and steps:
                truth = step_truth(problem, done_steps + steps, False if wrong_answer else None,
                                   answer or "")[len(done_steps):]
                cut = truth.index(False) + 1 if False in truth else None
            n = len(done_steps)  # the steps before this depth (a rollout or mini-step node is not one step)
            if cut is not None:
                line = BACKTRACK_TO.format(n=n) if n else BACKTRACK
                steps = steps[:cut]
            elif wrong_answer:
                line = DEAD_END_TO.format(n=n) if n else DEAD_END
            else:
                count("pruned_while_right" if not finished else "finished_right_or_unanswered")
                continue
            key = _norm_text(" ".join(steps))
            if key in seen:
                count("repeated_dead_end")
                continue
            seen.add(key)
            found[-1].append(steps + [line] + done_steps[-1:])
        done_steps += split_steps(nodes[node_id]["text"], fmt)
    # k of them, one depth at a time in turn (the root's first, then the next depth's, ...), so that backtracks
    # from deep in the tree are shown too, not only the root's many wrong first steps
    take = [0] * len(path)
    left = k
    while left > 0 and any(take[d] < len(found[d]) for d in range(len(path))):
        for d in range(len(path)):
            if left > 0 and take[d] < len(found[d]):
                take[d] += 1
                left -= 1
    if not any(take):
        count("no_dead_end")
        return None, why
    out = ""
    for d, node_id in enumerate(path):
        out += "".join(join_steps(steps, fmt) for steps in found[d][: take[d]]) + nodes[node_id]["text"]
    skipped = sum(len(f) for f in found) - sum(take)
    if skipped:
        why["dead_ends_over_k"] = skipped
    return out, why


GENRM_VERDICT = "Verdict:"  # GenRM-CoT: the rationale ends here and the next token is the verdict
GENRM_MAX_STEPS = 12  # a rationale checks at most this many steps (then says how many it left out)


def genrm_rationale(problem: dict, sample: dict, fmt: str = "lines") -> str:
    """GenRM-CoT's verification rationale for one graded sample, the text the verifier learns to write before its
    verdict: each step's arithmetic claims recomputed (`verify.find_claims`), the step judged right or wrong, and
    the solution's final answer, ending with GENRM_VERDICT.

    A step is judged on a synthetic problem by the step checks (`metrics.step_truth`, the process ground truth:
    false arithmetic, an operand the problem does not have, a wrong final step), elsewhere by its claims alone (a
    claim that does not hold); the rationale stops at the first wrong step. The paper (Zhang et al., GenRM-CoT)
    samples rationales from a stronger model given the reference and keeps those whose verdict is right; with no
    stronger model here, the rationales are written from the checks, and the verdict is always the grader's. At
    scoring time the verifier writes its own rationale without the reference (`actors/genrm_scorer.py`)."""
    from pipelines.prompts import split_steps
    from pipelines.train.metrics import step_truth
    from pipelines.verify import find_claims

    steps = [s for s in (sample.get("steps") or split_steps(sample["completion"], fmt)) if str(s).strip()]
    answer = str(sample.get("answer") or "").strip()
    truth = step_truth(problem, steps, bool(sample.get("correct")), answer) if problem.get("quantities") else None
    lines = []
    for i, step in enumerate(steps[:GENRM_MAX_STEPS]):
        claims = find_claims(step)
        ok = truth[i] if truth is not None else all(h for _, h in claims)
        said = "; ".join(f"{c} {'holds' if h else 'is false'}" for c, h in claims)
        lines.append(f"Step {i + 1}: {said + ', ' if said else ''}{'right' if ok else 'wrong'}.")
        if not ok:  # judged up to the first wrong step: what follows rests on it
            break
    else:
        if len(steps) > GENRM_MAX_STEPS:
            lines.append(f"({len(steps) - GENRM_MAX_STEPS} more steps not checked.)")
    lines.append(f"The final answer is {answer}." if answer else "The solution gives no final answer.")
    return "\n".join(lines) + "\n" + GENRM_VERDICT


def genrm_examples(samples: Sequence[dict], problems: dict[str, dict], k: int, lam: float, seed: int = 0,
                   dedup: bool = True, cot: bool = False, fmt: str = "lines") -> tuple[list[dict], dict[str, int]]:
    """GenRM's training examples from graded samples (the unified objective of Zhang et al.: verification SFT plus
    lambda x SFT on correct solutions). Per problem, at most k verified and k failed distinct samples (drawn with
    random.Random(f"{seed}:{problem}")) each become a verification example {question, solution, verdict "Yes"/"No"};
    with lam > 0 every kept verified sample is also a solution example {prompt, completion} of weight lam. The
    question comes from the run's problems (`problems`, by id). With `cot`, a verification example also carries
    the rationale its verdict follows (`genrm_rationale`: GenRM-CoT). Generation errors and empty samples are no
    evidence and are left out. Returns (examples, counts of what was left out, by reason)."""
    import random

    why: dict[str, int] = {}
    out: list[dict] = []
    for pid, sides in _by_verdict(samples, why).items():
        if pid not in problems:
            why["problem_not_in_run"] = why.get("problem_not_in_run", 0) + len(sides[0]) + len(sides[1])
            continue
        rng = random.Random(f"{seed}:{pid}")
        for side, verdict in zip(sides, ("Yes", "No")):
            kept = _distinct(side, dedup, why)
            rng.shuffle(kept)
            why["over_k"] = why.get("over_k", 0) + max(0, len(kept) - k)
            for r in kept[:k]:
                ex = {"problem_id": pid, "sample_id": r["sample_id"], "question": problems[pid]["question"],
                      "solution": r["completion"], "verdict": verdict, "weight": 1.0}
                if cot:
                    ex["rationale"] = genrm_rationale(problems[pid], r, fmt)
                out.append(ex)
                if verdict == "Yes" and lam > 0:
                    out.append({"problem_id": pid, "sample_id": f"{r['sample_id']}/sft", "prompt": r["prompt"],
                                "completion": r["completion"], "weight": lam})
    return out, {k_: v for k_, v in why.items() if v}


def targets_from_step_label(soft: Sequence[float | None], hard: Sequence[int | None], target: str) -> list[float]:
    """StepLabel -> targets; NaN where there is no label (soft NaN/None, hard -1/None)."""
    if target == "soft":
        return [float("nan") if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in soft]
    return [float("nan") if v is None or v < 0 else float(v) for v in hard]


def targets_from_ratings(ratings: Sequence[int], neutral: float, after_error: str) -> list[float]:
    """PRM800K ratings (-1 / 0 / 1) -> prefix values: 1 (good), `neutral` (0), 0 from the first -1 on."""
    out: list[float] = []
    failed = False
    for r in ratings:
        if failed:
            out.append(0.0 if after_error == "zero" else float("nan"))
        elif r is None:
            out.append(float("nan"))
        elif r < 0:
            out.append(0.0)
            failed = True
        else:
            out.append(1.0 if r > 0 else float(neutral))
    return out


def targets_from_first_error(first_error: int, n_steps: int, after_error: str) -> list[float]:
    """ProcessBench label (first wrong step, -1 = none) -> prefix values 1 ... 1, 0, then 0 or no label."""
    if first_error < 0:
        return [1.0] * n_steps
    after = 0.0 if after_error == "zero" else float("nan")
    return [1.0 if i < first_error else 0.0 if i == first_error else after for i in range(n_steps)]


def _prm800k_native(row: dict) -> tuple[str, list[str], list[int | None]] | None:
    """PRM800K's own jsonl row -> (question, steps, ratings) along the chosen path; None when unusable."""
    question = (row.get("question") or {}).get("problem")
    steps, ratings = [], []
    for st in (row.get("label") or {}).get("steps") or []:
        comps = st.get("completions") or []
        chosen = st.get("chosen_completion")
        if chosen is not None and 0 <= chosen < len(comps):
            c = comps[chosen]
        elif st.get("human_completion"):
            c = {"text": st["human_completion"].get("text", ""), "rating": 1}  # written by the labeller
        else:  # no choice: the labeller stopped here, at a wrong step if one was rated -1
            c = next((c for c in comps if c.get("rating") == -1), comps[0] if comps else None)
            if c is None:
                break
            steps.append(c.get("text", ""))
            ratings.append(c.get("rating"))
            break
        steps.append(c.get("text", ""))
        ratings.append(c.get("rating"))
    if not question or not steps:
        return None
    return question, steps, ratings


def in_holdout(problem_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether a problem is held out: sha1(f"{seed}:{problem_id}") as a number in [0, 1) below `fraction`."""
    if fraction <= 0:
        return False
    h = int(hashlib.sha1(f"{seed}:{problem_id}".encode()).hexdigest()[:8], 16)
    return h / 2**32 < fraction


@dataclass
class Examples:
    kind: str  # the row kind that was read
    train: list[dict]
    holdout: list[dict]  # PRM/ORM/DPO rows of held-out problems (evaluation)
    rejects: list[dict]  # {"row": id, "reason": ...}: rows set aside, with why
    dropped: dict[str, int]  # SFT: samples not selected, by reason

    def summary(self) -> str:
        s = f"{len(self.train)} training examples ({self.kind} rows)"
        if self.holdout:
            s += f", {len(self.holdout)} held out"
        if self.dropped:
            s += ", not selected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items()))
        if self.rejects:
            s += f", {len(self.rejects)} rejected"
        return s


def build_examples(kind: str, rows: Sequence[dict], cfg: TrainConfig, problems: dict[str, dict] | None = None
                   ) -> Examples:
    """Rows of a detected kind -> the task's examples (see the module docstring for every source); problems (by id,
    from the runs the rows came from) serve SFT's step checks."""
    if cfg.labels.source not in ("auto", kind):
        raise InputError(f"labels.source={cfg.labels.source} but {cfg.data} holds {kind} rows")
    if kind not in _ACCEPTS[cfg.task]:
        found = f"{kind} rows" if kind != "unknown" else f"rows of no stepray kind (columns {list(rows[0])[:8]})"
        raise InputError(f"`stepray train {cfg.task}` needs {' or '.join(_ACCEPTS[cfg.task])} rows, but {cfg.data} "
                         f"holds {found}")
    rejects: list[dict] = []
    dropped: dict[str, int] = {}
    out: list[dict] = []
    if cfg.task == "sft":
        if kind == "sample":
            out, dropped = select_sft(rows, cfg.select, problems)
            if cfg.select.stream_of_search:
                sos, why = stream_of_search(rows, problems, cfg.select.stream_of_search, cfg.prompt.format, cfg.seed)
                out += sos
                dropped.update({f"sos_{k}": v for k, v in why.items()})
            if cfg.select.corrections:
                fixes, why = correction_pairs(rows, cfg.select.corrections, cfg.seed, cfg.select.dedup)
                out += fixes
                dropped.update({f"corrections_{k}": v for k, v in why.items()})
        else:
            out = [{k: r[k] for k in ("problem_id", "sample_id", "prompt", "completion", "weight")} for r in rows]
    elif cfg.task == "dpo":
        out, dropped = preference_pairs(rows, cfg.pairs_per_problem, cfg.seed, cfg.select.dedup)
    elif cfg.task == "genrm":
        if not problems:
            raise InputError(f"training data {cfg.data}: GenRM needs each sample's question, read from its run's "
                             f"problems.parquet or config.json; give the folder of a `stepray generate` run")
        out, dropped = genrm_examples(rows, problems, cfg.genrm_per_problem, cfg.genrm_lambda, cfg.seed,
                                      cfg.select.dedup, cfg.genrm_cot, cfg.prompt.format)
    elif cfg.task == "orm":
        seen: set[tuple[str, str]] = set()
        for r in rows:
            if r.get("error"):
                rejects.append({"row": r.get("sample_id"), "reason": "generation_error"})
                continue
            key = (r["problem_id"], _norm_text(r["completion"]))
            if cfg.select.dedup and key in seen:
                dropped["duplicate"] = dropped.get("duplicate", 0) + 1
                continue
            seen.add(key)
            out.append({"problem_id": r["problem_id"], "sample_id": r["sample_id"], "prompt": r["prompt"],
                        "completion": r["completion"], "target": 1.0 if r["correct"] else 0.0, "weight": 1.0})
    else:
        for i, r in enumerate(rows):
            if kind == "step_label":
                q, steps = r["question"], list(r["steps"] or [])
                tg = targets_from_step_label(r["soft_labels"] or [], r["hard_labels"] or [], cfg.labels.target)
                pid, sid = r["problem_id"], r["sample_id"]
            elif kind == "processbench":
                q, steps = r["problem"], list(r["steps"])
                tg = targets_from_first_error(int(r["label"]), len(steps), cfg.labels.after_error)
                pid = sid = str(r.get("id", i))
            else:
                if "ratings" in r:
                    parsed = (r.get("question") or r.get("problem"), list(r["steps"]), list(r["ratings"]))
                else:
                    parsed = _prm800k_native(r)
                if parsed is None or not parsed[0]:
                    rejects.append({"row": i, "reason": "prm800k: no question or no rated step"})
                    continue
                q, steps, ratings = parsed
                tg = targets_from_ratings(ratings, cfg.labels.neutral, cfg.labels.after_error)
                pid = str(r.get("id") or hashlib.sha1(q.encode()).hexdigest()[:12])
                sid = f"{pid}/{i}"
            if len(tg) != len(steps):
                rejects.append({"row": sid if kind != "prm800k" else i,
                                "reason": f"label_length: {len(tg)} labels for {len(steps)} steps"})
                continue
            if not steps or all(math.isnan(t) for t in tg):
                rejects.append({"row": sid, "reason": "no_labelled_step"})
                continue
            out.append({"problem_id": pid, "sample_id": sid, "question": q, "steps": steps, "targets": tg,
                        "weight": 1.0})
    train, holdout = out, []
    if cfg.task in ("prm", "orm", "dpo", "genrm") and cfg.eval.enabled and cfg.eval.holdout_fraction > 0:
        train = [e for e in out if not in_holdout(e["problem_id"], cfg.eval.holdout_fraction, cfg.seed)]
        holdout = [e for e in out if in_holdout(e["problem_id"], cfg.eval.holdout_fraction, cfg.seed)]
    return Examples(kind, train, holdout, rejects, dropped)


def read_examples(cfg: TrainConfig) -> Examples:
    kind, rows = read_rows(cfg.data)
    ready: list[dict] = []  # SFT: trajectory rows beside samples (the loop's streams of search), taken as they are
    for extra in cfg.extra_data:
        extra_kind, extra_rows = read_rows(extra)
        if cfg.task == "sft" and kind == "sample" and extra_kind == "trajectory":
            ready += [{k: r[k] for k in ("problem_id", "sample_id", "prompt", "completion", "weight")}
                      for r in extra_rows]
            continue
        if extra_kind != kind:
            raise InputError(f"extra_data {extra}: holds {extra_kind} rows, but data {cfg.data} holds {kind} rows; "
                             f"give rows of one kind (SFT also takes trajectory rows beside samples)")
        rows += extra_rows
    problems: dict[str, dict] = {}
    if (cfg.task == "sft" and (cfg.select.step_checks or cfg.select.stream_of_search) or cfg.task == "genrm") \
            and kind == "sample":
        from pipelines.runs import run_problems

        for src in (cfg.data, *cfg.extra_data):
            problems.update(run_problems(src)[0])
    examples = build_examples(kind, rows, cfg, problems)
    examples.train += ready
    return examples


# ----------------------------------------------------------------------------------------------------------
# Tokenizing (driver side; collating is on the workers, worker.py)
# ----------------------------------------------------------------------------------------------------------

GENRM_SYSTEM = "You check solutions to math word problems. Answer Yes if the solution's final answer is correct, else No."
GENRM_QUESTION = "Is the answer correct? Answer Yes or No."
GENRM_QUESTION_COT = f"Check the solution step by step, then answer whether it is correct: {GENRM_VERDICT} Yes or No."


def genrm_prompt(tokenizer, question: str, solution: str, cot: bool = False) -> str:
    """GenRM's verification prompt (chat template): the problem, the proposed solution, and GENRM_QUESTION (the
    assistant's next token is the verdict) or, for GenRM-CoT, GENRM_QUESTION_COT (the assistant writes a rationale,
    then GENRM_VERDICT and the verdict). The same text in training (`tokenize_examples`) and scoring
    (`actors/genrm_scorer.py`)."""
    msgs = [{"role": "system", "content": GENRM_SYSTEM},
            {"role": "user", "content": f"Problem: {question}\n\nProposed solution:\n{solution.strip()}\n\n"
                                        f"{GENRM_QUESTION_COT if cot else GENRM_QUESTION}"}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def encode_sft(tokenizer, prompt: str, completion: str, max_len: int) -> tuple[list[int], int] | None:
    """prompt + completion + eos -> (ids, number of prompt tokens); the completion is cut at max_len.

    None when the prompt leaves no room for a completion token (the row is set aside by the caller).
    """
    p = tokenizer.encode(prompt, add_special_tokens=False)
    c = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    if len(p) >= max_len:
        return None
    return (p + c)[:max_len], len(p)


def tokenize_examples(task: str, examples: Sequence[dict], tokenizer, cfg: TrainConfig
                      ) -> tuple[list[dict], list[dict]]:
    """Examples -> token rows for Ray Data and rejects. Columns: input_ids, weight, and per task
    sft: n_prompt (prompt tokens, no loss); prm: positions (step-end token indices), targets (NaN = no label);
    orm: target; dpo: input_ids (prompt + chosen), rejected_ids (prompt + rejected), n_prompt."""
    rows, rejects = [], []
    for e in examples:
        row: dict[str, Any] = {"weight": float(e.get("weight", 1.0))}  # only the task's columns (no empty lists)
        if task == "sft":
            enc = encode_sft(tokenizer, e["prompt"], e["completion"], cfg.max_len)
            if enc is None:
                rejects.append({"row": e["sample_id"], "reason": f"prompt_too_long: max_len={cfg.max_len}"})
                continue
            row["input_ids"], row["n_prompt"] = enc
        elif task == "genrm":
            # verification rows: the verdict's tokens; solution rows: the solution's. Each row's weight is spread
            # over its target tokens, so the token-mean SFT loss weighs rows, not tokens: L_verify + lambda L_SFT
            # (a one-word verdict would otherwise count for 2 tokens against a solution's ~60)
            if "rationale" in e:
                # GenRM-CoT: two rows of half the weight each, the chain (rationale, GENRM_VERDICT, verdict) and the
                # verdict alone after the rationale. In the chain's token mean the one verdict token weighs 1/30
                # of the row, and the tiny model then learned the rationale's form but not the verdict it implies
                # (p(Yes) 0.87 after rationales of verified and of failed solutions alike)
                prompt = genrm_prompt(tokenizer, e["question"], e["solution"], cot=True)
                encs = [encode_sft(tokenizer, prompt, f"{e['rationale']} {e['verdict']}", cfg.max_len),
                        encode_sft(tokenizer, prompt + e["rationale"], f" {e['verdict']}", cfg.max_len)]
                if None in encs or max(len(ids) for ids, _ in encs) >= cfg.max_len:  # cut rows lose their verdict
                    rejects.append({"row": e["sample_id"], "reason": f"prompt_too_long: max_len={cfg.max_len}"})
                    continue
                rows += [{"input_ids": ids, "n_prompt": n, "weight": row["weight"] / 2 / max(1, len(ids) - n)}
                         for ids, n in encs]
                continue
            if "verdict" in e:
                enc = encode_sft(tokenizer, genrm_prompt(tokenizer, e["question"], e["solution"]), e["verdict"],
                                 cfg.max_len)
            else:
                enc = encode_sft(tokenizer, e["prompt"], e["completion"], cfg.max_len)
            if enc is None:
                rejects.append({"row": e["sample_id"], "reason": f"prompt_too_long: max_len={cfg.max_len}"})
                continue
            row["input_ids"], row["n_prompt"] = enc
            row["weight"] /= max(1, len(enc[0]) - enc[1])
        elif task == "dpo":
            chosen = encode_sft(tokenizer, e["prompt"], e["chosen"], cfg.max_len)
            rejected = encode_sft(tokenizer, e["prompt"], e["rejected"], cfg.max_len)
            if chosen is None or rejected is None:
                rejects.append({"row": e["sample_id"], "reason": f"prompt_too_long: max_len={cfg.max_len}"})
                continue
            row["input_ids"], row["n_prompt"] = chosen
            row["rejected_ids"] = rejected[0]
        elif task == "prm":
            from pipelines.reward_model import encode_steps

            prompt = render(tokenizer, e["question"], "numeric", cfg.prompt)
            ids, pos = encode_steps(tokenizer, prompt, e["steps"], cfg.separator(), cfg.max_len)
            targets = e["targets"][: len(pos)]
            if not pos or all(math.isnan(t) for t in targets):
                rejects.append({"row": e["sample_id"], "reason": f"no_labelled_step_within max_len={cfg.max_len}"})
                continue
            row["input_ids"], row["positions"], row["targets"] = ids, pos, targets
        else:
            from pipelines.reward_model import encode_outcome

            ids, _ = encode_outcome(tokenizer, e["prompt"], e["completion"], cfg.max_len)
            row["input_ids"], row["target"] = ids, float(e["target"])
        rows.append(row)
    return rows, rejects

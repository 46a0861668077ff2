"""Do the verifiers pay off? Each strategy of an evaluation against majority vote on the same problems and samples.

    python -m benchmarks.verifier_votes RUN [RUN ...] [--budget 8] [--base RUN] [--json out.json]

RUN is a `stepray evaluate` output folder (its traces.jsonl: one record per problem x strategy x budget, with the
candidates the choice was made among). For each run and each strategy at --budget it prints the accuracy with its
95% bootstrap interval over problems, the paired difference to majority@budget of the same run (the samples are
shared, so the difference is the verifier's choice alone) with its interval, and pass@budget: the share of problems
where some candidate of majority@budget is right (the ceiling of any choice among those samples); and for the
scored strategies the AUC of their solution scores for "this sample's answer is right" over all candidates. --base names the
run whose pass@budget the issue's bar is stated against ("best-of-8 or weighted@8 >= 0.8x the base model's pass@8");
by default each run's own. Nothing is re-run: this reads what the evaluation recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(run: str | Path) -> list[dict]:
    path = Path(run) / "traces.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} not found: give a `stepray evaluate` output folder (it writes traces.jsonl)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    problems = Path(run) / "problems.parquet"  # the evaluation's problems: each answer's kind, as it was graded
    if problems.exists():
        import pyarrow.parquet as pq

        kinds = dict(zip(*pq.read_table(problems, columns=["id", "kind"]).to_pydict().values()))
        for r in records:
            r.setdefault("kind", kinds.get(r["problem_id"]))
    return records


def _kind(r: dict) -> str:
    from pipelines.verify import parse_number

    if r.get("kind") in ("numeric", "math"):
        return r["kind"]
    return "numeric" if parse_number(str(r["gold"])) is not None else "math"  # no problems.parquet beside it


def pass_at(records: list[dict], budget: int) -> dict[str, bool]:
    """Per problem, whether some candidate of majority@budget states the gold answer."""
    from pipelines.verify import answers_equivalent

    out = {}
    for r in records:
        if r["strategy"] == "majority" and r["budget"] == budget:
            kind = _kind(r)
            out[r["problem_id"]] = any(c.get("answer") is not None and
                                       answers_equivalent(str(c["answer"]), str(r["gold"]), kind)
                                       for c in r.get("candidates") or [])
    return out


def outcome_auc(records: list[dict], strategy: str, budget: int) -> tuple[float, tuple[float, float]]:
    """AUC of the strategy's solution scores for "this sample's answer is right" over all its candidates (each
    candidate's score against its answer's verdict), with a 95% bootstrap interval over problems."""
    from pipelines.stats import bootstrap_ci
    from pipelines.train.metrics import auc
    from pipelines.verify import answers_equivalent

    by_problem: dict[str, list[tuple[float, bool]]] = {}
    for r in records:
        if r["strategy"] == strategy and r["budget"] == budget:
            kind = _kind(r)
            by_problem[r["problem_id"]] = [
                (float(c["score"]), c.get("answer") is not None and answers_equivalent(str(c["answer"]),
                                                                                      str(r["gold"]), kind))
                for c in r.get("candidates") or [] if c.get("score") is not None]

    def stat(ps):
        pairs = [x for p in ps for x in by_problem[p]]
        return auc([s for s, _ in pairs], [ok for _, ok in pairs])

    ids = sorted(by_problem)
    return stat(ids), bootstrap_ci(ids, stat)


def compare(records: list[dict], budget: int, base_pass: float | None = None) -> list[dict]:
    from pipelines.evaluate import hits_by_strategy
    from pipelines.stats import bootstrap_ci, paired_gain

    hits = {("greedy" if k == "greedy@1" else k): h for k, h in hits_by_strategy(records).items()
            if k == "greedy@1" or k.endswith(f"@{budget}")}
    majority = hits.get(f"majority@{budget}")
    oracle = pass_at(records, budget)
    ceiling = sum(oracle.values()) / len(oracle) if oracle else float("nan")
    rows = []
    for key, h in hits.items():
        ids = sorted(h)
        acc = sum(h.values()) / len(ids)
        row = {"strategy": key, "problems": len(ids), "accuracy": acc,
               "ci": bootstrap_ci(ids, lambda ps, h=h: sum(h[p] for p in ps) / len(ps)),
               f"pass@{budget}": ceiling}
        if majority and key != f"majority@{budget}":
            g = paired_gain(majority, h)
            row.update({"minus_majority": g["gain"], "minus_majority_ci": g["ci"],
                        "above_majority": g["ci"][0] > 0})
        strategy = key.rsplit("@", 1)[0]
        if strategy.split(":")[0] in ("best_of_n", "weighted"):  # candidates carry their solution scores
            row["outcome_auc"], row["outcome_auc_ci"] = outcome_auc(records, strategy, budget)
        ref = base_pass if base_pass is not None else ceiling
        row["of_pass"] = acc / ref if ref else float("nan")
        rows.append(row)
    return rows


def table(name: str, rows: list[dict], budget: int, base: str) -> str:
    lines = [f"{name}", "",
             f"| strategy | problems | accuracy [95% CI] | minus majority@{budget} [95% CI] | pass@{budget} | "
             f"accuracy / {base} pass@{budget} | AUC \"answer is right\" [95% CI] |", "|---|---:|---|---|---:|---:|---|"]
    for r in rows:
        diff = (f"{r['minus_majority']:+.3f} [{r['minus_majority_ci'][0]:+.3f}, {r['minus_majority_ci'][1]:+.3f}]"
                if "minus_majority" in r else "")
        lines.append(f"| {r['strategy']} | {r['problems']} | {r['accuracy']:.3f} [{r['ci'][0]:.3f}, "
                     f"{r['ci'][1]:.3f}] | {diff} | {r[f'pass@{budget}']:.3f} | {r['of_pass']:.2f} | "
                     + (f"{r['outcome_auc']:.3f} [{r['outcome_auc_ci'][0]:.3f}, {r['outcome_auc_ci'][1]:.3f}] |"
                        if "outcome_auc" in r else " |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="`stepray evaluate` output folders")
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--base", help="the run whose pass@budget the ratio column divides by (default: each run's own)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    base_pass = None
    if args.base:
        oracle = pass_at(load(args.base), args.budget)
        if not oracle:
            raise SystemExit(f"--base {args.base}: no majority@{args.budget} records to read pass@{args.budget} from")
        base_pass = sum(oracle.values()) / len(oracle)
    out = {}
    for run in args.runs:
        rows = compare(load(run), args.budget, base_pass)
        out[run] = rows
        print(table(run, rows, args.budget, "base" if args.base else "own") + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"budget": args.budget, "base": args.base, "base_pass": base_pass,
                                               "runs": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

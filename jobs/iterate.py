"""The self-improvement loop: rounds of generate -> verify -> annotate -> train (PRM, generator, ORM) -> evaluate.

    stepray iterate --config configs/cpu/iterate.yaml [key=value ...]
    python -m jobs.iterate --config ...                     (ray job submit --working-dir . -- python -m jobs.iterate ...)

Each stage is one of the project's jobs, run as its own process (it joins the same cluster through RAY_ADDRESS when
submitted as a Ray job). Everything a round makes lives under <out>/round_<r>/<stage>/; <out>/manifest.json records
what produced every artifact (generator, PRM, verifier, problems, config) and which stages are done. Kill it at any
point and run the same command again: finished stages are skipped, the interrupted one resumes its own partial
output. One MLflow run for the loop, with each stage's run nested under it. At the end: a table across rounds
(accuracy per strategy, labels, tokens, wall time) and a plot of accuracy by round (<out>/accuracy_by_round.png).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipelines import config as C
from pipelines.iterate import IterateConfig, Manifest, synthetic_overrides
from pipelines.runtime import PARENT_RUN_ENV, cli_main, mlflow_ui_command, mlflow_uri

PY = sys.executable


def parse_args(argv: list[str] | None) -> IterateConfig:
    ap = argparse.ArgumentParser(prog="stepray iterate", description=__doc__.split("\n\n")[0],
                                 epilog="config keys:\n" + C.describe(IterateConfig),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file with IterateConfig fields")
    ap.add_argument("--out", help="run folder (sets out=)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rounds=2 annotate_limit=80")
    args = ap.parse_args(argv)
    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    return C.load_config(IterateConfig, args.config, overrides)


def check_stage_configs(cfg: IterateConfig) -> None:
    """Fail before any work when a stage override names a key its job does not have."""
    from pipelines.annotate import AnnotateConfig
    from pipelines.evaluate import EvalConfig
    from pipelines.generate import GenerationConfig
    from pipelines.train import TrainConfig

    for name, cls, overrides in (("generate", GenerationConfig, cfg.generate), ("annotate", AnnotateConfig,
                                 cfg.annotate), ("sft", TrainConfig, ("task=sft", *cfg.sft)),
                                 ("prm", TrainConfig, ("task=prm", *cfg.prm)), ("orm", TrainConfig,
                                 ("task=orm", *cfg.orm)), ("evaluate", EvalConfig, cfg.evaluate)):
        try:
            C.load_config(cls, overrides=list(overrides))
        except C.ConfigError as e:
            raise C.ConfigError(f"{name}: {e}") from None


def run_stage(manifest: Manifest, key: str, cmd: list[str], lineage: dict, outputs: dict, log=print) -> None:
    if manifest.done(key):
        log(f"[iterate] {key}: done earlier, skipped")
        return
    resumed = manifest.stage(key).get("status") in ("running", "failed")
    log(f"[iterate] {key}: {'resuming' if resumed else 'starting'}: {' '.join(cmd[1:])}")
    manifest.start(key, cmd, lineage)
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    if rc != 0:
        manifest.fail(key, rc)
        raise SystemExit(f"[iterate] {key} failed with exit code {rc}; fix the cause and run the same command "
                         f"again to resume here")
    manifest.finish(key, time.time() - t0, outputs)
    log(f"[iterate] {key}: done in {time.time() - t0:.0f}s")


def count_verified(samples: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not samples.exists():
        return 0
    return int(pc.sum(pq.read_table(samples, columns=["correct"]).column("correct")).as_py() or 0)


def log_skip(manifest: Manifest, key: str, why: str, log=print) -> None:
    if manifest.stage(key).get("status") != "skipped":
        manifest.data["stages"][key] = {"status": "skipped", "why": why}
        manifest.save()
    log(f"[iterate] {key}: skipped: {why}")


def traces_to_training_rows(eval_dir: Path, out_dir: Path, prompt_model: str, cfg: IterateConfig) -> None:
    """Expert iteration: the searched solutions of the training problems as Sample rows (for annotation, ORM and
    SFT selection, which keeps only verified ones)."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipelines import schema
    from pipelines.generate import GenerationConfig
    from pipelines.models import resolve_model
    from pipelines.problems import load_problems
    from pipelines.prompts import render

    gen_cfg = C.load_config(GenerationConfig, overrides=list(cfg.generate))
    tok = AutoTokenizer.from_pretrained(str(resolve_model(prompt_model)))
    problems = {p["id"]: p for p in load_problems("synthetic", synthetic=cfg.train_problems).problems}
    rows = []
    for line in open(eval_dir / "traces.jsonl"):
        t = json.loads(line)
        p = problems.get(t["problem_id"])
        if p is None:
            continue
        rows.append({"problem_id": p["id"], "sample_id": f"{p['id']}/{t['strategy']}{t['budget']}", "sample_idx": 0,
                     "mode": t["strategy"], "prompt": render(tok, p["question"], p["kind"], gen_cfg.prompt),
                     "completion": t["completion"], "steps": t["steps"], "answer": t["answer"],
                     "answer_method": "", "gold": p["answer"], "kind": p["kind"], "correct": bool(t["correct"]),
                     "reason": t.get("reason", ""), "n_prompt_tokens": 0,
                     "n_completion_tokens": int(t["tokens_generated"]), "finish_reason": "stop",
                     "cum_logprob": float("nan"), "confidence": float("nan"),
                     "temperature": gen_cfg.sampling.temperature, "model": prompt_model, "error": ""})
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.to_table(rows, "sample"), out_dir / "samples" / "part-search.parquet")
    (out_dir / "config.json").write_text(json.dumps(C.to_dict(gen_cfg) | {
        "problems": "synthetic", "synthetic": C.to_dict(cfg.train_problems)}, indent=1))


def eval_rows(eval_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq

    from pipelines.evaluate import accuracy_table

    return accuracy_table(pq.read_table(eval_dir / "records.parquet").to_pylist())


@cli_main("stepray iterate")
def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    check_stage_configs(cfg)
    from pipelines.models import resolve_model

    base = str(resolve_model(cfg.base_model, prepare=cfg.base_model in ("smollm2", "tiny")))
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(C.to_dict(cfg), indent=1))
    manifest = Manifest(out / "manifest.json")
    t_start = time.time()

    import mlflow

    mlflow.set_tracking_uri(mlflow_uri())
    mlflow.set_experiment("stepray")
    resumed = bool(manifest.data["mlflow_run_id"])
    run = mlflow.start_run(run_id=manifest.data["mlflow_run_id"] or None,
                           run_name=None if resumed else f"iterate-{out.name}")
    manifest.data["mlflow_run_id"] = run.info.run_id
    config_now = C.to_dict(cfg)
    history = manifest.data.setdefault("configs", [])
    if not history or history[-1]["config"] != config_now:
        # A resumed run may carry a changed config (for stages not done yet): keep every version, in order.
        history.append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": config_now})
        if resumed:
            print("[iterate] the config differs from the one this run started with; stages done earlier keep their "
                  "outputs, the others use the new config (both are in manifest.json)")
            mlflow.log_dict(config_now, f"config_{len(history)}.json")
    manifest.save()
    os.environ[PARENT_RUN_ENV] = run.info.run_id
    if not resumed:  # MLflow params are write-once
        mlflow.log_params({k: str(v)[:250] for k, v in C.flatten(config_now).items()})

    verifier = "pipelines.verify.grade (numeric; math-verify for LaTeX)"
    generator, prm = base, ""
    eval_syn = synthetic_overrides("synthetic", cfg.eval_problems)
    for r in range(cfg.rounds):
        rd = out / f"round_{r}"
        problems = f"synthetic {cfg.train_problems.key()} (n={cfg.train_problems.n}, seed={cfg.train_problems.seed})"
        lineage = {"round": r, "generator": generator, "prm": prm, "verifier": verifier, "problems": problems}
        gen_dir = rd / "generate"
        if cfg.sampling.startswith("search:") and prm:
            strategy = cfg.sampling.split(":", 1)[1]
            run_stage(manifest, f"round_{r}/search", [
                PY, "-m", "jobs.evaluate_search", "--problems", "synthetic", "--model", generator, "--prm", prm,
                "--strategies", strategy, "--budgets", str(cfg.search_budget), "--out", str(rd / "search"),
                *synthetic_overrides("synthetic", cfg.train_problems), *cfg.evaluate],
                lineage, {"traces": str(rd / "search" / "traces.jsonl")})
            if not (gen_dir / "samples").exists():
                traces_to_training_rows(rd / "search", gen_dir, generator, cfg)
        else:
            run_stage(manifest, f"round_{r}/generate", [
                PY, "-m", "jobs.generate_samples", "--out", str(gen_dir), "problems=synthetic",
                f"engine.model={generator}", "greedy=false", *synthetic_overrides("synthetic", cfg.train_problems),
                *cfg.generate], lineage, {"samples": str(gen_dir / "samples")})
        run_stage(manifest, f"round_{r}/annotate", [
            PY, "-m", "jobs.annotate_steps", "--samples", str(gen_dir / "samples"), "--model", generator,
            "--limit", str(cfg.annotate_limit), "--out", str(rd / "annotate"), *cfg.annotate],
            lineage | {"samples": str(gen_dir / "samples")}, {"labels": str(rd / "annotate" / "labels")})
        run_stage(manifest, f"round_{r}/train_prm", [
            PY, "-m", "jobs.train_model", "prm", *synthetic_overrides("eval.truth_synthetic", cfg.train_problems),
            *cfg.prm, "--data", str(rd / "annotate" / "labels"), "--base", base, "--out", str(rd / "prm")],
            lineage | {"labels": str(rd / "annotate" / "labels")}, {"model": str(rd / "prm" / "model")})
        prm = str(rd / "prm" / "model")
        if cfg.train_orm:
            run_stage(manifest, f"round_{r}/train_orm", [
                PY, "-m", "jobs.train_model", "orm", *cfg.orm, "--data", str(gen_dir), "--base", base,
                "--out", str(rd / "orm")], lineage, {"model": str(rd / "orm" / "model")})
        # ReST-EM refits from the base model each round; STaR continues from the current generator (r > 0)
        star = cfg.round_mode == "star" and generator != base
        sft_init = generator if star else base
        verified = count_verified(gen_dir / "samples")
        if verified == 0:
            # Hard problems can yield no verified sample (methods.md): keep the generator, say so, go on.
            log_skip(manifest, f"round_{r}/train_sft", "no verified sample to fit on; the generator is unchanged")
        else:
            run_stage(manifest, f"round_{r}/train_sft", [
                PY, "-m", "jobs.train_model", "sft",
                *(["round_mode=star", f"previous={generator}"] if star else ["round_mode=rest_em"]), *cfg.sft,
                "--data", str(gen_dir), "--base", base, "--out", str(rd / "sft")],
                lineage | {"init": sft_init, "verified_samples": verified}, {"model": str(rd / "sft" / "model")})
        eval_cmd = [PY, "-m", "jobs.evaluate_search", "--problems", "synthetic", "--prm", prm,
                    "--strategies", cfg.eval_strategies, "--budgets", cfg.eval_budgets, *eval_syn, *cfg.evaluate]
        if r == 0 and cfg.eval_base:
            run_stage(manifest, "round_0/eval_base", eval_cmd + ["--model", base, "--out", str(rd / "eval_base")],
                      lineage | {"generator": base}, {"records": str(rd / "eval_base" / "records.parquet")})
        if manifest.done(f"round_{r}/train_sft"):
            generator = str(rd / "sft" / "model")
        run_stage(manifest, f"round_{r}/evaluate", eval_cmd + ["--model", generator, "--out", str(rd / "eval")],
                  lineage | {"generator": generator, "prm": prm}, {"records": str(rd / "eval" / "records.parquet")})

    # ------------------------------------------------------------------ summary across rounds, plot, MLflow
    table = []
    points = [("base", out / "round_0" / "eval_base", 0)] * cfg.eval_base + [
        (f"round {r + 1}", out / f"round_{r}" / "eval", r) for r in range(cfg.rounds)]
    for label, d, r in points:
        acc = {f"{row['strategy']}@{row['budget']}": row["accuracy"] for row in eval_rows(d)}
        ann = json.loads((out / f"round_{r}" / "annotate" / "summary.json").read_text())
        gen = out / f"round_{r}" / "generate" / "summary.json"
        gen_tokens = json.loads(gen.read_text()).get("completion_tokens", 0) if gen.exists() else 0
        wall = sum(s.get("wall_s", 0) for k, s in manifest.data["stages"].items() if k.startswith(f"round_{r}/"))
        table.append({"model": label, **acc, "labelled_steps": ann.get("labelled_steps", ann.get("steps", 0)),
                      "train_tokens": gen_tokens, "round_wall_s": round(wall)})
    keys = [k for k in table[0] if "@" in k]
    header = ["model", *keys, "labelled_steps", "train_tokens", "round_wall_s"]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        md.append("| " + " | ".join(f"{row.get(h, ''):.3f}" if isinstance(row.get(h), float) else
                                    str(row.get(h, "")) for h in header) + " |")
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps({"rounds": table, "wall_s": time.time() - t_start}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k in keys:
        ax.plot(range(len(table)), [row[k] for row in table], marker="o", label=k)
    ax.set_xticks(range(len(table)), [row["model"] for row in table])
    ax.set_ylabel("accuracy (held-out synthetic)")
    ax.set_title("accuracy by round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_round.png", dpi=120)
    plt.close(fig)
    for i, row in enumerate(table):
        mlflow.log_metrics({k.replace("@", "_at_"): row[k] for k in keys}, step=i)
    for f in ("summary.md", "summary.json", "accuracy_by_round.png", "manifest.json", "config.json"):
        mlflow.log_artifact(str(out / f))
    mlflow.end_run()
    print("\n" + "\n".join(md))
    print(f"\n[iterate] {cfg.rounds} round(s) in {time.time() - t_start:.0f}s this invocation; plot: "
          f"{out / 'accuracy_by_round.png'}; MLflow: {mlflow_ui_command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

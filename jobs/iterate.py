"""The self-improvement loop: rounds of generate -> verify -> annotate -> train (PRM, generator, ORM) -> evaluate.

    stepray iterate --config configs/cpu/iterate.yaml [key=value ...]
    python -m jobs.iterate --config ...                     (ray job submit --working-dir . -- python -m jobs.iterate ...)

Each stage is one of the project's jobs, run as its own process that joins one Ray cluster (the one RAY_ADDRESS
names when submitted as a Ray job or on a cluster node, else a local one the loop starts once for all its stages)
with the config file the loop writes from its section (<out>/round_<r>/configs/). Everything a round makes lives
under <out>/round_<r>/<stage>/; <out>/manifest.json records what produced every artifact (generator, PRM, verifier,
problems, config) and which stages are done. Kill it at any point and run the same command again: finished stages
are skipped, the interrupted one resumes its own partial output. One MLflow run for the loop, with each stage's run
nested under it. At the end: a table across rounds (accuracy per strategy, labels, tokens, wall time) and a plot of
accuracy by round (<out>/accuracy_by_round.png).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from pipelines import config as C
from pipelines.iterate import (IterateConfig, Manifest, count_verified, evaluation, gains_vs_base, log_skip,
                               open_loop_run, plot_rounds, rationalize, round_table, run_stage, stage_file,
                               traces_to_training_rows)
from pipelines.runtime import cli_main, cluster_for_stages, mlflow_ui_command

PY = sys.executable


def parse_args(argv: list[str] | None) -> tuple[IterateConfig, list[str]]:
    ap = argparse.ArgumentParser(prog="stepray iterate", description=__doc__.split("\n\n")[0],
                                 epilog="config keys:\n" + C.describe(IterateConfig),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file with IterateConfig fields")
    ap.add_argument("--out", help="run folder (sets out=)")
    ap.add_argument("--redo", default="", help="comma-separated stage keys of the run to do again, e.g. "
                    "round_0/train_sft,round_0/evaluate (after changing their config): each leaves the manifest and "
                    "its folder moves to <out>/replaced/; the other finished stages are skipped as always")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rounds=2 annotate_limit=80")
    args = ap.parse_args(argv)
    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    return C.load_config(IterateConfig, args.config, overrides), [k for k in args.redo.split(",") if k.strip()]


def run_rounds(cfg: IterateConfig, out: Path, manifest: Manifest, base: str) -> None:
    """Every round's stages, each a job process (run_stage); finished stages are skipped."""
    verifier = "pipelines.verify.grade (numeric; math-verify for LaTeX)"
    generator, prm = base, ""
    for r in range(cfg.rounds):
        rd = out / f"round_{r}"
        problems = f"synthetic {cfg.train_problems.key()} (n={cfg.train_problems.n}, seed={cfg.train_problems.seed})"
        lineage = {"round": r, "generator": generator, "prm": prm, "verifier": verifier, "problems": problems}
        gen_dir = rd / "generate"
        searched = bool(cfg.search_strategy and prm)  # round 0 has no PRM to search with yet: it samples
        if searched:
            # stream of search over the search's trees needs them recorded (step-level strategies have them)
            search = evaluation(cfg, generator, prm, rd / "search", cfg.train_problems,
                                strategies=(cfg.search_strategy,), budgets=(cfg.search_budget,),
                                search=replace(cfg.evaluate.search,
                                               record_tree=cfg.sft.select.stream_of_search > 0))
            run_stage(manifest, f"round_{r}/search", [PY, "-m", "jobs.evaluate_search", "--config",
                                                      stage_file(rd, "search", search)],
                      lineage, {"traces": str(rd / "search" / "traces.jsonl")})
            if not (gen_dir / "samples").exists():
                traces_to_training_rows(rd / "search", gen_dir, generator, cfg)
        else:
            gen = replace(cfg.generate, out=str(gen_dir), problems="synthetic", synthetic=cfg.train_problems,
                          greedy=False, engine=replace(cfg.generate.engine, model=generator))
            run_stage(manifest, f"round_{r}/generate", [PY, "-m", "jobs.generate_samples", "--config",
                                                        stage_file(rd, "generate", gen)],
                      lineage, {"samples": str(gen_dir / "samples")})
        # searched rows carry the strategy as their mode (traces_to_training_rows): label those
        modes = (cfg.search_strategy,) if searched else cfg.annotate.modes
        ann = replace(cfg.annotate, samples=str(gen_dir / "samples"), limit=cfg.annotate_limit,
                      out=str(rd / "annotate"), engine=replace(cfg.annotate.engine, model=generator), modes=modes)
        run_stage(manifest, f"round_{r}/annotate", [PY, "-m", "jobs.annotate_steps", "--config",
                                                    stage_file(rd, "annotate", ann)],
                  lineage | {"samples": str(gen_dir / "samples")}, {"labels": str(rd / "annotate" / "labels")})
        prm_cfg = replace(cfg.prm, task="prm", data=str(rd / "annotate" / "labels"), base=base, out=str(rd / "prm"),
                          eval=replace(cfg.prm.eval, truth_synthetic=cfg.train_problems))
        run_stage(manifest, f"round_{r}/train_prm", [PY, "-m", "jobs.train_model", "prm", "--config",
                                                     stage_file(rd, "train_prm", prm_cfg)],
                  lineage | {"labels": str(rd / "annotate" / "labels")}, {"model": str(rd / "prm" / "model")})
        prm = str(rd / "prm" / "model")
        if cfg.train_orm:
            orm_cfg = replace(cfg.orm, task="orm", data=str(gen_dir), base=base, out=str(rd / "orm"))
            run_stage(manifest, f"round_{r}/train_orm", [PY, "-m", "jobs.train_model", "orm", "--config",
                                                         stage_file(rd, "train_orm", orm_cfg)],
                      lineage, {"model": str(rd / "orm" / "model")})
        # STaR: the unsolved problems' rationalizations train beside the round's samples
        extra = rationalize(manifest, cfg, rd, gen_dir, generator, lineage) if cfg.round_mode == "star" else []
        if (gen_dir / "streams").is_dir():  # expert iteration's streams of search (trajectory rows)
            extra.append(str(gen_dir / "streams"))
        # ReST-EM and STaR refit from the base model each round; continue starts from the current generator
        cont = cfg.round_mode == "continue" and generator != base
        verified = count_verified(gen_dir / "samples") + sum(count_verified(Path(e) / "samples") for e in extra)
        need = cfg.sft.batch_size * cfg.sft.num_workers  # one optimizer step's rows (selection may keep fewer)
        if verified < need:
            # Hard problems can yield no verified sample (docs/methods.md): keep the generator, say so, go on.
            log_skip(manifest, f"round_{r}/train_sft", ("no verified sample to fit on" if not verified else
                     f"{verified} verified samples cannot fill one step of {need} rows") +
                     "; the generator is unchanged")
        else:
            sft = replace(cfg.sft, task="sft", data=str(gen_dir), extra_data=tuple(extra), base=base,
                          out=str(rd / "sft"), round_mode="continue" if cont else "rest_em",
                          previous=generator if cont else "")
            run_stage(manifest, f"round_{r}/train_sft", [PY, "-m", "jobs.train_model", "sft", "--config",
                                                         stage_file(rd, "train_sft", sft)],
                      lineage | {"init": sft.init_model(), "verified_samples": verified},
                      {"model": str(rd / "sft" / "model")})
        if r == 0 and cfg.eval_base:
            ev = evaluation(cfg, base, prm, rd / "eval_base", cfg.eval_problems)
            run_stage(manifest, "round_0/eval_base", [PY, "-m", "jobs.evaluate_search", "--config",
                                                      stage_file(rd, "eval_base", ev)],
                      lineage | {"generator": base}, {"records": str(rd / "eval_base" / "records.parquet")})
        if manifest.done(f"round_{r}/train_sft"):
            generator = str(rd / "sft" / "model")
        ev = evaluation(cfg, generator, prm, rd / "eval", cfg.eval_problems)
        run_stage(manifest, f"round_{r}/evaluate", [PY, "-m", "jobs.evaluate_search", "--config",
                                                    stage_file(rd, "evaluate", ev)],
                  lineage | {"generator": generator, "prm": prm}, {"records": str(rd / "eval" / "records.parquet")})


@cli_main("stepray iterate")
def main(argv: list[str] | None = None) -> int:
    cfg, redo = parse_args(argv)
    from pipelines.models import load_path

    base = load_path(cfg.base_model)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(C.to_dict(cfg), indent=1))
    manifest = Manifest(out / "manifest.json")
    if redo:
        manifest.forget(redo, out)
    t_start = time.time()

    import mlflow

    open_loop_run(manifest, cfg, out)

    with cluster_for_stages():
        run_rounds(cfg, out, manifest, base)

    # ------------------------------------------------------------------ summary across rounds, plot, MLflow
    table, md = round_table(out, cfg, manifest)
    gains, gains_md = gains_vs_base(out, cfg)
    md += f"\nAgainst the base model on the same problems:\n\n{gains_md}" if gains else ""
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps({"rounds": table, "gains": gains, "wall_s": time.time() - t_start},
                                                 indent=1))
    plot_rounds(table, out / "accuracy_by_round.png")
    for i, row in enumerate(table):
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in row.items() if "@" in k}, step=i)
    for f in ("summary.md", "summary.json", "accuracy_by_round.png", "manifest.json", "config.json"):
        mlflow.log_artifact(str(out / f))
    mlflow.end_run()
    print("\n" + md)
    print(f"\n[iterate] {cfg.rounds} round(s) in {time.time() - t_start:.0f}s this invocation; plot: "
          f"{out / 'accuracy_by_round.png'}; MLflow: {mlflow_ui_command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

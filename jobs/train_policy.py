"""Online RL against the verifier (GRPO): the generator samples with vLLM, Ray Train updates it, the new weights go
back into the running engines every step.

    stepray rl --base runs/sft/model --out runs/grpo [--steps 50] [key=value ...]
    stepray rl --base smollm2 reward=prm reward_model=runs/prm/model beta=0.04 group_size=8
    python -m jobs.train_policy ...              (the Ray job entrypoint: ray job submit -- python -m jobs.train_policy)

Each step every worker samples `group_size` solutions to `problems_per_step` training problems, rewards them (the
verifier's verdict by default; a PRM / ORM / V-STaR score with reward=prm|orm|vstar), normalises the rewards within
each problem's group, and takes one GRPO step (clipped policy gradient + KL to the reference); rank 0 then writes
the policy and the engines load it in place (pipelines/train/grpo.py says how and why). Greedy accuracy on held-out
problems is measured on the same engine before the first step and after the last, with its paired interval.

Writes under --out: config.json, model/ (the trained policy, a transformers folder), history.json (reward, verified
share, KL, loss, timings per step), reward_curve.png, loss_curve.png, summary.json, policy_weights/ (the folder the
engines read), ray_results/<run name>/checkpoint_step_*. Kill it and run the same command again: it resumes from the
latest checkpoint and the engines get the restored policy first. MLflow: params, per-step metrics, the curves.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from pipelines import config as C
from pipelines.runtime import cli_main, init_ray, mlflow_ui_command, mlflow_uri
from pipelines.train.grpo import LEARNED_REWARDS, REWARD_CURVE_FILE, GRPOConfig


def parse_args(argv: list[str] | None) -> GRPOConfig:
    ap = argparse.ArgumentParser(prog="stepray rl", description=__doc__.split("\n\n")[0],
                                 epilog="config keys (key=value overrides):\n" + C.describe(GRPOConfig),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file with GRPOConfig fields")
    ap.add_argument("--base", help="the policy to start from (sets base=)")
    ap.add_argument("--out", help="output folder (sets out=)")
    ap.add_argument("--steps", type=int, help="sets steps=")
    ap.add_argument("--reward", help="verifier | prm | orm | vstar | genrm | module:function (sets reward=)")
    ap.add_argument("--reward-model", help="sets reward_model=")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. group_size=8 beta=0.04")
    args = ap.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    for flag, key in (("base", "base"), ("out", "out"), ("steps", "steps"), ("reward", "reward"),
                      ("reward_model", "reward_model")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.no_mlflow:
        overrides.append("mlflow=false")
    return C.load_config(GRPOConfig, args.config, overrides)


def greedy_verdicts(engine, problems: list[dict], prompts: list[str], max_tokens: int) -> dict[str, bool]:
    """Problem id -> whether the engine's greedy solution is verified."""
    import ray

    from pipelines.verify import verify_row

    outs = ray.get(engine.generate.remote(prompts, {"n": 1, "temperature": 0.0, "max_tokens": max_tokens}))
    return {p["id"]: bool(not c[0]["error"] and verify_row({**p, "completion": c[0]["text"], "gold": p["answer"]})
                          .correct) for p, c in zip(problems, outs)}


@cli_main("stepray rl")
def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(cfg: GRPOConfig, log=print) -> int:
    t0 = time.time()
    from pipelines import inputs
    from pipelines.config import InputError
    from pipelines.models import load_path
    from pipelines.problems import load_problems, write_rejects
    from pipelines.stats import paired_gain
    from pipelines.train.grpo import load_reward_fn
    from pipelines.train.trainer import checkpoint_dtype, export_model, mlflow_run

    # --- inputs first: a mistake ends here, before Ray or an engine starts
    init_path, ref_path = load_path(cfg.base), load_path(cfg.reference or cfg.base)
    loaded = load_problems(cfg.problems, synthetic=cfg.synthetic, limit=cfg.limit or None)
    problems = loaded.problems
    if not problems:
        raise InputError(f"problems {cfg.problems!r}: no usable problem ({len(loaded.rejects)} set aside)")
    if cfg.reward in LEARNED_REWARDS:
        inputs.reward_model_folder(cfg.reward_model, "reward_model", cfg.reward)
    elif ":" in cfg.reward:
        load_reward_fn(cfg.reward)
    held = []
    if cfg.eval_problems:
        held = load_problems(cfg.eval_problems, synthetic=cfg.eval_synthetic, limit=cfg.eval_limit or None).problems
        train_questions = {p["question"] for p in problems}
        held = [p for p in held if p["question"] not in train_questions]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(C.to_dict(cfg), indent=1))
    write_rejects(loaded.rejects, out / "rejects.jsonl")
    log(f"[rl] {len(problems)} training problems ({cfg.problems}; {len(loaded.rejects)} set aside), "
        f"{len(held)} held out; policy {init_path}, reference {ref_path}, reward {cfg.reward}")

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    from actors.start import actor_options, engine_actor, scorer_actor, wait_ready
    from pipelines.prompts import PromptConfig, render
    from pipelines.train.config import MALLOC_ENV
    from pipelines.train.grpo import grpo_loop_per_worker
    from pipelines.train.trainer import latest_checkpoint_step

    init_ray()
    run_id = mlflow_run(cfg, out, {**C.flatten(C.to_dict(cfg)), "n_problems": len(problems),
                                   "init_path": init_path}, log) if cfg.mlflow else None
    resume = latest_checkpoint_step(cfg)
    # the engines start on the starting policy; a resumed run hands them the restored one before its first step
    engines = [engine_actor(cfg.engine, init_path, f"policy-{i}") for i in range(cfg.engine.min_engines)]
    scorer = None
    scorer_prompts: dict[str, str] = {}
    try:
        wait_ready(engines, "the sampling engines", actor_options(cfg.engine.num_cpus, cfg.engine.num_gpus))
        if cfg.reward in LEARNED_REWARDS:
            scorer, meta = scorer_actor(cfg.reward_model, cfg.reward, num_cpus=0.5)
            pcfg = PromptConfig(**meta["prompt"]) if meta.get("prompt") else cfg.prompt
            ptok = AutoTokenizer.from_pretrained(cfg.reward_model)
            scorer_prompts = {p["id"]: p["question"] if cfg.reward == "genrm" else  # GenRM wraps the question
                              render(ptok, p["question"], p["kind"], pcfg) for p in problems}
        tok = AutoTokenizer.from_pretrained(init_path)
        held_prompts = [render(tok, p["question"], p["kind"], cfg.prompt) for p in held]
        evaluation: dict = {}
        if held and not resume:
            t = time.time()
            evaluation["before"] = greedy_verdicts(engines[0], held, held_prompts, cfg.max_tokens)
            log(f"[rl] greedy accuracy before: {sum(evaluation['before'].values())}/{len(held)} "
                f"({time.time() - t:.0f}s)")
            (out / "eval_before.json").write_text(json.dumps(evaluation["before"]))
        elif held and (out / "eval_before.json").exists():
            evaluation["before"] = json.loads((out / "eval_before.json").read_text())
        trainer = TorchTrainer(
            grpo_loop_per_worker,
            train_loop_config={"cfg": C.to_dict(cfg), "init": init_path, "reference": ref_path,
                               "tokenizer": init_path, "engines": engines, "scorer": scorer, "problems": problems,
                               "scorer_prompts": scorer_prompts, "mlflow_uri": mlflow_uri() if run_id else None,
                               "mlflow_run_id": run_id, "save_dtype": checkpoint_dtype(init_path)},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=RunConfig(name=cfg.resolved_run_name(), storage_path=cfg.resolved_storage(),
                                 failure_config=FailureConfig(max_failures=cfg.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                                 worker_runtime_env={"env_vars": dict(MALLOC_ENV)} if cfg.tune_malloc else None))
        if resume:
            log(f"[rl] found checkpoint_step_{resume:06d} of run {cfg.resolved_run_name()}: resuming")
        t_fit = time.time()
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            log(f"[rl] training failed: {str(e).strip().splitlines()[-1][:300]}\n[rl] latest checkpoint: step "
                f"{latest_checkpoint_step(cfg)}; re-run the same command to resume from it")
            return 1
        train = export_model(result, out)
        with result.checkpoint.as_directory() as d:
            if (Path(d) / REWARD_CURVE_FILE).exists():
                shutil.copy(Path(d) / REWARD_CURVE_FILE, out / REWARD_CURVE_FILE)
        train["fit_s"] = time.time() - t_fit
        history = json.loads((out / "history.json").read_text())
        if held:  # the engines hold the final policy now (handed back after the last step)
            t = time.time()
            evaluation["after"] = greedy_verdicts(engines[0], held, held_prompts, cfg.max_tokens)
            log(f"[rl] greedy accuracy after: {sum(evaluation['after'].values())}/{len(held)} ({time.time() - t:.0f}s)")
    finally:
        for h in engines + ([scorer] if scorer is not None else []):
            ray.kill(h)
    gain = paired_gain(evaluation["before"], evaluation["after"]) if "before" in evaluation and "after" in evaluation \
        else None
    first, last = history[: max(1, len(history) // 5)], history[-max(1, len(history) // 5):]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    summary = {"base": init_path, "reference": ref_path, "reward": cfg.reward, "steps": train["steps"],
               "resumed_from": train["resumed_from"], "problems": len(problems), "heldout": len(held),
               "reward_first_fifth": mean(first, "reward"), "reward_last_fifth": mean(last, "reward"),
               "verified_first_fifth": mean(first, "accuracy"), "verified_last_fifth": mean(last, "accuracy"),
               "kl_last": history[-1]["kl"], "mean_step_s": mean(history, "step_s"),
               "mean_sync_s": mean(history, "sync_s"), "greedy": gain, "train": train, "wall_s": time.time() - t0,
               "mlflow_run_id": run_id}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    log(f"\n[rl] {train['steps']} GRPO steps (resumed from {train['resumed_from']}) in {train['fit_s']:.0f}s "
        f"({summary['mean_step_s']:.1f}s a step, of which weight hand-back {summary['mean_sync_s']:.1f}s)")
    log(f"[rl] training reward, first fifth -> last fifth of the steps: {summary['reward_first_fifth']:.3f} -> "
        f"{summary['reward_last_fifth']:.3f} (verified share {summary['verified_first_fifth']:.3f} -> "
        f"{summary['verified_last_fifth']:.3f}); KL to the reference at the end {summary['kl_last']:.4f}")
    if gain:
        log(f"[rl] held-out greedy accuracy ({gain['n']} problems): {gain['before']:.3f} -> {gain['after']:.3f} "
            f"({gain['gain']:+.3f} [{gain['ci'][0]:+.3f}, {gain['ci'][1]:+.3f}] paired 95%)")
    log(f"[rl] model: {out / 'model'}; curves: {out / REWARD_CURVE_FILE}")
    if run_id:
        import mlflow

        mlflow.set_tracking_uri(mlflow_uri())
        with mlflow.start_run(run_id=run_id):
            if gain:
                mlflow.log_metrics({"greedy_before": gain["before"], "greedy_after": gain["after"]})
            mlflow.log_artifact(str(out / "summary.json"))
        log(f"MLflow: {mlflow_ui_command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The self-improvement loop's plan and its manifest (pure: no Ray, no engines; jobs/iterate.py runs it).

A round is a list of stages, each one of the project's jobs run as its own process with explicit inputs:

    generate   jobs.generate_samples   sample the training problems with the current generator and verify
               (or, with sampling="search:<strategy>", jobs.evaluate_search with the current PRM: expert iteration)
    annotate   jobs.annotate_steps     Monte-Carlo step labels on a subset of the samples (current generator)
    train_prm  jobs.train_model prm    a PRM on those labels, from the base backbone
    train_orm  jobs.train_model orm    an ORM on the samples' verdicts (optional)
    rationalize jobs.generate_samples  star only: the problems no sample solved, with the answer as a hint
    train_sft  jobs.train_model sft    the generator on its verified samples (ReST-EM and STaR: from the base
                                       model; STaR adds the verified rationalizations; continue: from the current one)
    eval_base  jobs.evaluate_search    round 0 only: the base generator, with this round's PRM
    evaluate   jobs.evaluate_search    the new generator, with this round's PRM

The manifest (<out>/manifest.json) records, for every stage, its command, status, timings and lineage (which
generator, PRM, verifier, problems and config produced each artifact). A stage marked done is never run again; a
stage that was running when the loop died is run again with the same command, and every stage job resumes its own
partial output (generation parts, annotation parts, training checkpoints), so nothing is duplicated.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines import config as C
from pipelines.annotate import AnnotateConfig
from pipelines.config import ConfigError, help_field
from pipelines.evaluate import EvalConfig
from pipelines.generate import GenerationConfig
from pipelines.problems import SyntheticConfig
from pipelines.train.config import TrainConfig

# the folders of a round each stage writes (--redo moves them aside); search's traces become generate's samples
STAGE_DIRS = {"search": ("search", "generate"), "generate": ("generate",), "annotate": ("annotate",),
              "train_prm": ("prm",), "train_orm": ("orm",), "rationalize": ("rationalize", "unsolved"),
              "train_sft": ("sft",), "eval_base": ("eval_base",), "evaluate": ("eval",)}
TREE_SEARCHES = ("beam", "dvts", "mcts")  # the strategies whose recorded trees have branches (record_tree)
STAGES = ("generate", "annotate", "train_prm", "train_orm", "rationalize", "train_sft", "eval_base", "evaluate")


@dataclass(frozen=True)
class IterateConfig:
    out: str = help_field("runs/iterate", "run folder: one subfolder per round and stage, manifest.json, summary")
    rounds: int = help_field(1, "rounds of generate -> annotate -> train -> evaluate")
    base_model: str = help_field("smollm2", "the starting generator (and the PRM/ORM backbone)")
    round_mode: str = help_field("rest_em", "rest_em (ReST-EM): each round's SFT starts from the base model on the "
                                            "round's verified samples; star (STaR): the same, plus rationalizations "
                                            "of the problems no sample solved (sampled with the answer as a hint); "
                                            "continue: SFT starts from the previous round's generator")
    rationalize_hint: str = help_field("(Hint: the answer is {answer}.)", "star: what follows an unsolved question "
                                       "in rationalization ({answer} is filled in); the training rows omit it")
    rationalize: str = help_field("hint", "star: how an unsolved problem gets its rationalization: hint (the "
                                  "generator samples it with the answer as a hint, as in STaR) | reference (the "
                                  "problem's reference solution, written in the prompt format and graded like a "
                                  "sample: for a generator too weak to rationalize, e.g. the tiny test model)")
    sampling: str = help_field("sample", "how a round's training data is found: sample (plain sampling) | "
                                         "search:<strategy> (e.g. search:best_of_n, with the current PRM; expert "
                                         "iteration; round 0 has no PRM yet and samples)")
    train_problems: SyntheticConfig = help_field(SyntheticConfig(n=240, seed=0, max_steps=2),
                                                 "training problems (synthetic)")
    eval_problems: SyntheticConfig = help_field(SyntheticConfig(n=100, seed=1, max_steps=2),
                                                "held-out evaluation problems (synthetic, another seed)")
    annotate_limit: int = help_field(160, "samples labelled per round (MC rollouts cost the most)")
    train_orm: bool = help_field(False, "also train an ORM each round")
    eval_base: bool = help_field(True, "round 0 also evaluates the base generator (the 'before' of the table)")
    search_budget: int = help_field(4, "budget of the search when sampling=search:<strategy>")
    # The stage sections: each is the stage's own config, checked when this config loads. A section may be a mapping
    # (generate: {sampling: {n: 8}}) or a list of dotted overrides (generate: [sampling.n=8]). The loop sets what
    # wires the stages together (problems, models, data, out, the PRM of the round) and writes each stage's whole
    # config to <out>/round_<r>/configs/<stage>.yaml, the file the stage runs with.
    generate: GenerationConfig = help_field(GenerationConfig(), "the generate stage (stepray generate's config)")
    annotate: AnnotateConfig = help_field(AnnotateConfig(), "the annotate stage (stepray annotate's config)")
    sft: TrainConfig = help_field(TrainConfig(task="sft"), "the generator's training (stepray train sft)")
    prm: TrainConfig = help_field(TrainConfig(task="prm"), "the PRM's training (stepray train prm)")
    orm: TrainConfig = help_field(TrainConfig(task="orm"), "the ORM's training (stepray train orm)")
    evaluate: EvalConfig = help_field(EvalConfig(strategies=("greedy", "majority", "weighted"), budgets=(1, 4)),
                                      "the evaluations (stepray evaluate; its strategies and budgets)")

    @property
    def search_strategy(self) -> str:
        """The strategy of sampling=search:<strategy> (expert iteration), "" for plain sampling."""
        return self.sampling.split(":", 1)[1] if self.sampling.startswith("search:") else ""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.round_mode not in ("rest_em", "star", "continue"):
            raise ValueError(f"round_mode {self.round_mode!r} is not one of rest_em, star, continue")
        if self.rationalize not in ("hint", "reference"):
            raise ValueError(f"rationalize must be hint or reference, got {self.rationalize!r}")
        if self.round_mode == "star" and "{answer}" not in self.rationalize_hint:
            raise ValueError("rationalize_hint must contain {answer}: rationalization shows the right answer")
        if not (self.sampling == "sample" or self.sampling.startswith("search:")):
            raise ValueError(f"sampling {self.sampling!r}: use sample or search:<strategy>")
        if self.sampling.startswith("search:"):  # "search:" alone names no strategy: refused below
            from pipelines.search import STRATEGIES

            name = self.search_strategy
            if name not in STRATEGIES:
                raise ValueError(f"sampling {self.sampling!r}: {name!r} is not one of {sorted(STRATEGIES)}")


def stage_file(round_dir: Path, name: str, stage_cfg: Any) -> str:
    """Write one stage's whole config to <round>/configs/<name>.yaml (what the stage runs with); return its path."""
    import yaml

    def plain(x):
        return {k: plain(v) for k, v in x.items()} if isinstance(x, dict) else \
            [plain(v) for v in x] if isinstance(x, (list, tuple)) else x

    path = round_dir / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(plain(C.to_dict(stage_cfg)), sort_keys=False))
    return str(path)


def evaluation(cfg: IterateConfig, generator: str, prm: str, out: Path, problems: SyntheticConfig,
               **fields: Any) -> EvalConfig:
    """The evaluate section, pointed at one generator, the round's PRM, synthetic problems and an out folder."""
    return replace(cfg.evaluate, problems="synthetic", synthetic=problems, prm=prm, out=str(out),
                   engine=replace(cfg.evaluate.engine, model=generator), **fields)


class Manifest:
    """<out>/manifest.json: stage status and lineage; written atomically after every change."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": {}, "mlflow_run_id": ""}
        if self.path.exists():
            self.data = json.loads(self.path.read_text())

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def stage(self, key: str) -> dict:
        return self.data["stages"].get(key, {})

    def done(self, key: str) -> bool:
        return self.stage(key).get("status") == "done"

    def start(self, key: str, cmd: list[str], lineage: dict) -> None:
        entry = self.data["stages"].setdefault(key, {"attempts": 0})
        entry.update({"status": "running", "cmd": cmd, "lineage": lineage,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "attempts": entry.get("attempts", 0) + 1})
        entry.setdefault("first_started", time.time())
        self.save()

    def finish(self, key: str, wall_s: float, outputs: dict) -> None:
        entry = self.data["stages"][key]
        entry.update({"status": "done", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": wall_s,
                      "outputs": outputs})
        self.save()

    def fail(self, key: str, rc: int) -> None:
        self.data["stages"][key].update({"status": "failed", "exit_code": rc})
        self.save()

    def forget(self, keys: list[str], out: Path, log=print) -> None:
        """Run these stages again: each key (round_<r>/<stage>) leaves the manifest and its folders move to
        <out>/replaced/<time>/round_<r>/ (nothing is deleted), so the next run of the loop redoes it from scratch
        with the config it is given (a stage would otherwise resume its own partial output or be skipped)."""
        bad = [k for k in keys if not re.fullmatch(r"round_\d+/[a-z_]+", k) or k.split("/")[1] not in STAGE_DIRS]
        if bad:
            raise ConfigError(f"--redo {','.join(bad)}: give stage keys round_<r>/<stage>, <stage> one of "
                              f"{', '.join(STAGE_DIRS)} (manifest.json lists the run's keys)")
        dest = out / "replaced" / time.strftime("%Y%m%d-%H%M%S")
        for key in keys:
            rnd, stage = key.split("/")
            moved = []
            for d in STAGE_DIRS[stage]:
                if (out / rnd / d).exists():
                    (dest / rnd).mkdir(parents=True, exist_ok=True)
                    (out / rnd / d).rename(dest / rnd / d)
                    moved.append(d)
            self.data["stages"].pop(key, None)
            log(f"[iterate] {key}: will run again" + (f" (moved {', '.join(moved)} to {dest / rnd})" if moved else ""))
        self.save()


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


def unsolved_problems(gen_dir: Path) -> list[dict]:
    """The numeric and math problems of a generate run with no verified sample (STaR rationalizes these)."""
    import pyarrow.parquet as pq

    from pipelines import runs

    problems, _ = runs.run_problems(gen_dir)
    rows = pq.read_table(gen_dir / "samples", columns=["problem_id", "correct"]).to_pylist()
    solved = {r["problem_id"] for r in rows if r["correct"]}
    return [p for pid, p in problems.items() if pid not in solved and p["kind"] in ("numeric", "math")]


def log_skip(manifest: Manifest, key: str, why: str, log=print) -> None:
    if manifest.stage(key).get("status") != "skipped":
        manifest.data["stages"][key] = {"status": "skipped", "why": why}
        manifest.save()
    log(f"[iterate] {key}: skipped: {why}")


def traces_to_training_rows(eval_dir: Path, out_dir: Path, prompt_model: str, cfg: IterateConfig) -> None:
    """Expert iteration: the searched solutions of the training problems as Sample rows (for annotation, ORM and
    SFT selection, which keeps only verified ones) in <out_dir>/samples. With sft.select.stream_of_search > 0 and
    a step-level search that recorded its tree (the loop asks for it), also one stream-of-search row per verified
    search (`data.tree_stream`: its dead ends, backtracks and the verified path) as trajectory rows in
    <out_dir>/streams, which the round's SFT reads beside the samples."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipelines import runs, schema
    from pipelines.models import load_path
    from pipelines.prompts import render

    gen_cfg = cfg.generate
    tok = AutoTokenizer.from_pretrained(load_path(prompt_model))
    problems, _ = runs.run_problems(eval_dir)  # the search run's problems.parquet
    from pipelines.train.data import tree_stream

    rows, streams, why = [], [], {}
    k = cfg.sft.select.stream_of_search
    for line in open(eval_dir / "traces.jsonl"):
        t = json.loads(line)
        p = problems.get(t["problem_id"])
        if p is None:
            continue
        prompt = render(tok, p["question"], p["kind"], gen_cfg.prompt)
        tree = (t.get("meta") or {}).get("tree")
        if k and tree and t["correct"]:
            text, w = tree_stream(tree, t["meta"]["chosen_node"], p, k, cfg.evaluate.search.fmt)
            for key, v in w.items():
                why[key] = why.get(key, 0) + v
            if text is not None:
                streams.append({"problem_id": p["id"], "sample_id": f"{p['id']}/{t['strategy']}{t['budget']}/sos",
                                "prompt": prompt, "completion": text, "weight": 1.0})
        rows.append({"problem_id": p["id"], "sample_id": f"{p['id']}/{t['strategy']}{t['budget']}", "sample_idx": 0,
                     "mode": t["strategy"], "prompt": prompt,
                     "completion": t["completion"], "steps": t["steps"], "answer": t["answer"],
                     "answer_method": "", "gold": p["answer"], "kind": p["kind"], "correct": bool(t["correct"]),
                     "reason": t.get("reason", ""), "n_prompt_tokens": 0,
                     "n_completion_tokens": int(t["tokens_generated"]), "finish_reason": "stop",
                     "cum_logprob": float("nan"), "confidence": float("nan"),
                     "temperature": gen_cfg.sampling.temperature, "model": prompt_model, "error": ""})
    # the streams first: the loop takes <out_dir>/samples as the sign that this step is done
    if streams:
        (out_dir / "streams").mkdir(parents=True, exist_ok=True)
        pq.write_table(schema.to_table(streams, "trajectory"), out_dir / "streams" / "part-search.parquet")
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.to_table(rows, "sample"), out_dir / "samples" / "part-search.parquet")
    if k:
        strategy = cfg.search_strategy
        print(f"[iterate] stream of search: {len(streams)} rows from the search trees"
              + (f" (left out: {', '.join(f'{a} {b}' for a, b in sorted(why.items()))})" if why else "")
              + ("" if strategy in TREE_SEARCHES else f"; {strategy} records no step-level tree (beam, dvts and "
                 f"mcts do), so only the samples' own streams (select.stream_of_search) are made"))
    runs.write_problems(list(problems.values()), out_dir)
    (out_dir / "config.json").write_text(json.dumps(C.to_dict(gen_cfg) | {
        "problems": "synthetic", "synthetic": C.to_dict(cfg.train_problems)}, indent=1))


def rationalize(manifest: Manifest, cfg: IterateConfig, rd: Path, gen_dir: Path, generator: str,
                lineage: dict) -> list[str]:
    """STaR's rationalization stage of a round: the problems no sample solved, rationalized by the generator with the
    answer as a hint (a generate stage) or by their reference solutions (no engine); returns the run folders whose
    samples train beside the round's (empty when every problem was solved)."""
    import sys

    from pipelines.runs import write_problems

    key, out = f"{rd.name}/rationalize", rd / "rationalize"
    unsolved = unsolved_problems(gen_dir)
    if not unsolved:
        log_skip(manifest, key, "every problem has a verified sample")
        return []
    if cfg.rationalize == "reference":
        if not manifest.done(key):
            manifest.start(key, ["reference_rationalizations"], lineage | {"unsolved": len(unsolved)})
            t0 = time.time()
            verified = reference_rationalizations(unsolved, out, generator, cfg)
            manifest.finish(key, time.time() - t0, {"samples": str(out / "samples"), "verified": verified})
        return [str(out)]
    hinted = replace(cfg.generate, out=str(out), greedy=False, hint=cfg.rationalize_hint,
                     problems=str(write_problems(unsolved, rd / "unsolved")),
                     engine=replace(cfg.generate.engine, model=generator))
    run_stage(manifest, key, [sys.executable, "-m", "jobs.generate_samples", "--config",
                              stage_file(rd, "rationalize", hinted)],
              lineage | {"unsolved": len(unsolved)}, {"samples": str(out / "samples")})
    return [str(out)]


def reference_rationalizations(problems: list[dict], out_dir: Path, prompt_model: str, cfg: IterateConfig) -> int:
    """STaR with rationalize=reference: each unsolved problem's reference solution (ref_steps and answer, in the
    prompt format) as a Sample row, graded by the verifier like a generated one (a reference the grader refuses
    stays unverified and SFT selection drops it). Writes <out_dir>/samples, problems.parquet and config.json (the
    layout of a generate run, so training reads it as extra_data); returns the number of verified rows."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipelines import runs, schema
    from pipelines.models import load_path
    from pipelines.prompts import reference_completion, render, split_steps
    from pipelines.verify import verify_row

    fmt = cfg.generate.prompt.format
    tok = AutoTokenizer.from_pretrained(load_path(prompt_model))
    rows = []
    for p in problems:
        if not p.get("ref_steps"):
            continue  # no reference solution to show (a source without one): the problem stays unsolved
        completion = reference_completion(list(p["ref_steps"]), p["answer"], fmt)
        v = verify_row({"completion": completion, "gold": p["answer"], "kind": p["kind"]})
        rows.append({"problem_id": p["id"], "sample_id": f"{p['id']}/ref", "sample_idx": 0, "mode": "reference",
                     "prompt": render(tok, p["question"], p["kind"], cfg.generate.prompt), "completion": completion,
                     "steps": split_steps(completion, fmt, p["kind"]), "answer": v.answer,
                     "answer_method": v.method, "gold": p["answer"], "kind": p["kind"], "correct": bool(v.correct),
                     "reason": v.reason, "n_prompt_tokens": 0, "n_completion_tokens": 0, "finish_reason": "stop",
                     "cum_logprob": float("nan"), "confidence": float("nan"), "temperature": 0.0,
                     "model": "reference", "error": ""})
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.to_table(rows, "sample"), out_dir / "samples" / "part-reference.parquet")
    runs.write_problems(problems, out_dir)
    (out_dir / "config.json").write_text(json.dumps(C.to_dict(cfg.generate) | {"rationalize": "reference"}, indent=1))
    return sum(r["correct"] for r in rows)


def eval_rows(eval_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq

    from pipelines.evaluate import accuracy_table

    return accuracy_table(pq.read_table(eval_dir / "records.parquet").to_pylist())


def round_table(out: Path, cfg: IterateConfig, manifest: Manifest) -> tuple[list[dict], str]:
    """One row per evaluated model (the base, then each round's generator): accuracy per strategy@budget, labelled
    steps, generated training tokens and the round's wall time; and the same as a markdown table."""
    table = []
    points = [("base", out / "round_0" / "eval_base", 0)] * cfg.eval_base + [
        (f"round {r + 1}", out / f"round_{r}" / "eval", r) for r in range(cfg.rounds)]
    for label, d, r in points:
        acc = {f"{row['strategy']}@{row['budget']}": row["accuracy"] for row in eval_rows(d)}
        ann = json.loads((out / f"round_{r}" / "annotate" / "summary.json").read_text())
        # the tokens the round generated to find its training data: sampling's, or expert iteration's search
        gen, search = out / f"round_{r}" / "generate" / "summary.json", out / f"round_{r}" / "search" / "summary.json"
        gen_tokens = (json.loads(gen.read_text()).get("completion_tokens", 0) if gen.exists() else
                      json.loads(search.read_text()).get("engine_tokens", 0) if search.exists() else 0)
        wall = sum(s.get("wall_s", 0) for k, s in manifest.data["stages"].items() if k.startswith(f"round_{r}/"))
        table.append({"model": label, **acc, "labelled_steps": ann.get("labelled_steps", ann.get("steps", 0)),
                      "train_tokens": gen_tokens, "round_wall_s": round(wall)})
    keys = [k for k in table[0] if "@" in k]
    header = ["model", *keys, "labelled_steps", "train_tokens", "round_wall_s"]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        md.append("| " + " | ".join(f"{row.get(h, ''):.3f}" if isinstance(row.get(h), float) else
                                    str(row.get(h, "")) for h in header) + " |")
    return table, "\n".join(md) + "\n"


def gains_vs_base(out: Path, cfg: IterateConfig) -> tuple[list[dict], str]:
    """Each round's generator against the base on the same held-out problems: per strategy@budget the accuracy
    gain with its paired 95% bootstrap interval over problems (pipelines.stats); and the same as markdown.
    Empty without eval_base (nothing to pair with)."""
    import pyarrow.parquet as pq

    from pipelines.evaluate import hits_by_strategy
    from pipelines.stats import paired_gain

    if not cfg.eval_base:
        return [], ""

    def per_problem(d: Path) -> dict[str, dict[str, bool]]:
        return hits_by_strategy(pq.read_table(d / "records.parquet").to_pylist())

    base = per_problem(out / "round_0" / "eval_base")
    rows = []
    for r in range(cfg.rounds):
        after = per_problem(out / f"round_{r}" / "eval")
        for key in [k for k in base if k in after]:
            g = paired_gain(base[key], after[key])
            rows.append({"model": f"round {r + 1}", "strategy": key, **g})
    md = ["| model | strategy@budget | problems | base | after | gain [95% CI] |", "|---|---|---|---|---|---|"]
    md += [f"| {g['model']} | {g['strategy']} | {g['n']} | {g['before']:.3f} | {g['after']:.3f} | "
           f"{g['gain']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]{' *' if g['excludes_zero'] else ''} |"
           for g in rows]
    return rows, "\n".join(md) + "\n\n* the interval excludes zero (paired bootstrap over problems, 1000 resamples)\n"


def plot_rounds(table: list[dict], path: Path) -> None:
    """Accuracy by round, one line per strategy@budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k in [k for k in table[0] if "@" in k]:
        ax.plot(range(len(table)), [row[k] for row in table], marker="o", label=k)
    ax.set_xticks(range(len(table)), [row["model"] for row in table])
    ax.set_ylabel("accuracy (held-out synthetic)")
    ax.set_title("accuracy by round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def open_loop_run(manifest: Manifest, cfg: IterateConfig, out: Path) -> None:
    """Open (or, resuming, reopen) the loop's MLflow run, parent of every stage's run (PARENT_RUN_ENV), and keep
    each version of the config the run was invoked with in the manifest."""
    import mlflow

    from pipelines.runtime import PARENT_RUN_ENV, mlflow_uri

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

"""The self-improvement loop's plan and its manifest (pure: no Ray, no engines; jobs/iterate.py runs it).

A round is a list of stages, each one of the project's jobs run as its own process with explicit inputs:

    generate   jobs.generate_samples   sample the training problems with the current generator and verify
               (or, with sampling="search:<strategy>", jobs.evaluate_search with the current PRM: expert iteration)
    annotate   jobs.annotate_steps     Monte-Carlo step labels on a subset of the samples (current generator)
    train_prm  jobs.train_model prm    a PRM on those labels, from the base backbone
    train_orm  jobs.train_model orm    an ORM on the samples' verdicts (optional)
    train_sft  jobs.train_model sft    the generator on its verified samples (ReST-EM: from the base model;
                                       STaR: from the current one)
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import help_field
from pipelines.problems import SyntheticConfig

STAGES = ("generate", "annotate", "train_prm", "train_orm", "train_sft", "eval_base", "evaluate")


@dataclass(frozen=True)
class IterateConfig:
    out: str = help_field("runs/iterate", "run folder: one subfolder per round and stage, manifest.json, summary")
    rounds: int = help_field(1, "rounds of generate -> annotate -> train -> evaluate")
    base_model: str = help_field("smollm2", "the starting generator (and the PRM/ORM backbone)")
    round_mode: str = help_field("rest_em", "rest_em: each round's SFT starts from the base model; star: from "
                                            "the previous round's generator")
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
    eval_strategies: str = help_field("greedy,majority,weighted", "strategies evaluated (evaluate job syntax)")
    eval_budgets: str = help_field("1,4", "budgets evaluated")
    search_budget: int = help_field(4, "budget of the search when sampling=search:<strategy>")
    generate: tuple[str, ...] = help_field((), "overrides for jobs.generate_samples (dotted key=value)")
    annotate: tuple[str, ...] = help_field((), "overrides for jobs.annotate_steps")
    sft: tuple[str, ...] = help_field((), "overrides for jobs.train_model sft")
    prm: tuple[str, ...] = help_field((), "overrides for jobs.train_model prm")
    orm: tuple[str, ...] = help_field((), "overrides for jobs.train_model orm")
    evaluate: tuple[str, ...] = help_field((), "overrides for jobs.evaluate_search")

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.round_mode not in ("rest_em", "star"):
            raise ValueError(f"round_mode {self.round_mode!r} is not one of rest_em, star")
        if not (self.sampling == "sample" or self.sampling.startswith("search:")):
            raise ValueError(f"sampling {self.sampling!r}: use sample or search:<strategy>")
        if self.sampling.startswith("search:"):
            from pipelines.search import STRATEGIES

            name = self.sampling.split(":", 1)[1]
            if name not in STRATEGIES:
                raise ValueError(f"sampling {self.sampling!r}: {name!r} is not one of {sorted(STRATEGIES)}")


def synthetic_overrides(prefix: str, cfg: SyntheticConfig) -> list[str]:
    """A SyntheticConfig as dotted overrides of a stage's `synthetic` section."""
    return [f"{prefix}.n={cfg.n}", f"{prefix}.seed={cfg.seed}", f"{prefix}.min_steps={cfg.min_steps}",
            f"{prefix}.max_steps={cfg.max_steps}", f"{prefix}.ops={','.join(cfg.ops)}",
            f"{prefix}.max_start={cfg.max_start}", f"{prefix}.max_operand={cfg.max_operand}",
            f"{prefix}.max_factor={cfg.max_factor}", f"{prefix}.max_value={cfg.max_value}"]


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

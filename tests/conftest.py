"""Shared fixtures: the data folder, a session-wide local Ray, prepared models.

Ray and vLLM start once per session (or module) because each start costs tens of seconds on 2 cores.
RAY_AUTH_MODE=disabled is set for every process of the run so that the driver, workers and job clients agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    from pipelines.problems import data_root

    return data_root()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data()
    if not (d / "gsm8k").exists():
        pytest.skip(f"shared data not found at {d} (set STEPRAY_DATA to the folder with gsm8k/, math500/, ...)")
    return d


@pytest.fixture(scope="session")
def ray_session():
    from pipelines.runtime import init_ray

    ray = init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from pipelines.models import resolve_model

    return str(resolve_model("tiny", prepare=True))


@pytest.fixture(scope="session")
def smollm2() -> str:
    from pipelines.models import resolve_model

    return str(resolve_model("smollm2", prepare=True))


@pytest.fixture(scope="session")
def reward_models(tiny_model, tmp_path_factory):
    """Untrained verifier folders on the tiny model, one of each kind (PRM and ORM with random heads, V-STaR and
    GenRM verifiers that are the tiny model itself): real checkpoints for the scorers, for the plumbing, not for
    their scores."""
    from dataclasses import asdict

    import torch
    from transformers import AutoTokenizer

    from pipelines.prompts import PromptConfig
    from pipelines.reward_model import RewardModel

    tok = AutoTokenizer.from_pretrained(tiny_model)
    paths = {}
    for kind in ("prm", "orm"):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(kind)
        RewardModel.from_base(tiny_model, kind=kind, meta={"prompt": asdict(PromptConfig())}).save(path, tok)
        paths[kind] = str(path)
    # an untrained V-STaR verifier: the generator itself with the verifier file naming it as its own reference
    from transformers import AutoModelForCausalLM

    from actors.vstar_scorer import VERIFIER_FILE

    path = tmp_path_factory.mktemp("vstar")
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(path)
    tok.save_pretrained(path)
    (path / VERIFIER_FILE).write_text(json.dumps({"kind": "vstar", "reference": tiny_model, "beta": 0.1,
                                                  "prompt": asdict(PromptConfig())}))
    paths["vstar"] = str(path)
    # an untrained GenRM verifier: the generator itself, read as p(Yes) after the verification prompt
    path = tmp_path_factory.mktemp("genrm")
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(path)
    tok.save_pretrained(path)
    (path / VERIFIER_FILE).write_text(json.dumps({"kind": "genrm", "prompt": None}))
    paths["genrm"] = str(path)
    return paths

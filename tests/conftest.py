"""Shared fixtures: the data folder, a session-wide local Ray, prepared models.

Ray and vLLM start once per session (or module) because each start costs tens of seconds on 2 cores.
RAY_AUTH_MODE=disabled is set for every process of the run so that the driver, workers and job clients agree.
"""

from __future__ import annotations

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

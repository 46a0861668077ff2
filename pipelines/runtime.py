"""Where jobs meet the cluster: starting or joining Ray, and the MLflow store.

- `init_ray()` joins the cluster named by RAY_ADDRESS (set inside `ray job submit` jobs and on a cluster node),
  else starts a local one sized to this machine; `cluster_for_stages()` starts one that child job processes join.
  Workers get the same MLFLOW_TRACKING_URI / STEPRAY_* variables.
- `cli_main(prog)` is every job's one policy for user errors: a ConfigError / InputError (a bad key, a missing or
  wrong-kind input) ends as one line `prog: message` on stderr and exit 2; anything else is our bug and keeps its
  traceback.
- `mlflow_uri()` is MLFLOW_TRACKING_URI when set (any tracking server), else a local SQLite store under the
  current folder (`mlruns.db`, view it with `mlflow ui --backend-store-uri sqlite:///mlruns.db`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
import sys
from pathlib import Path

PASS_ENV = ("MLFLOW_TRACKING_URI", "STEPRAY_HOME", "STEPRAY_DATA", "HF_HUB_OFFLINE", "RAY_AUTH_MODE",
            "TOKENIZERS_PARALLELISM")


def init_ray(num_cpus: int | None = None, quiet: bool = True):
    """ray.init for jobs and tests: join RAY_ADDRESS if set, else a local cluster. Idempotent."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download weights at run time
    env_vars = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env_vars.setdefault("MLFLOW_TRACKING_URI", mlflow_uri())
    # Inside a submitted Ray job, Ray merges the job's runtime env with this one and refuses any env var both set
    # ("Failed to merge the Job's runtime env"): the job's own values stand, ours fill in the rest.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    env_vars = {k: v for k, v in env_vars.items() if k not in (job_env.get("env_vars") or {})}
    kwargs = {"runtime_env": {"env_vars": env_vars}, "ignore_reinit_error": True}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        # address="local": always a fresh local cluster, never a stray one left by `ray start` on this machine
        clear_stale_ray_address()
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 logging_level="WARNING" if quiet else "INFO", **kwargs)
    return ray


@contextlib.contextmanager
def cluster_for_stages(log=print):
    """One local Ray cluster for the job processes this process starts (the loop's stages): it starts here and
    RAY_ADDRESS names it in this process's environment, which every stage inherits, so `init_ray` there joins it.

    Why: a stage on its own starts and stops a local cluster, ~4 s to start and ~1.5 s to stop on 2 cores, and the
    loop runs 6-12 stages; joining takes ~0.3 s. Each stage is still its own Ray job: its actors and objects go with
    its driver when it ends or is killed. The cluster's processes share this process's fate (Ray's own rule for a
    cluster that `ray.init` starts), so a killed loop leaves none behind. Where RAY_ADDRESS is already set (a
    cluster node, a submitted job) the stages join that cluster, as before."""
    if os.environ.get("RAY_ADDRESS"):
        yield os.environ["RAY_ADDRESS"]
        return
    import ray

    started = not ray.is_initialized()  # a caller's own cluster (a test session's) is shared, never stopped here
    init_ray()
    address = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = address
    log(f"[ray] the stages join the local cluster at {address}")
    try:
        yield address
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        if started:
            ray.shutdown()


def ray_address_file() -> Path:
    """Where `ray start` records the address of the machine's current cluster (Ray's default temp dir)."""
    try:
        from ray._common.utils import get_ray_address_file  # Ray's own rule (RAY_TMPDIR, platform temp dir)

        return Path(get_ray_address_file(None))
    except ImportError:  # moved in another Ray version: the documented default
        return Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "ray_current_cluster"


def clear_stale_ray_address(log=print) -> bool:
    """Remove the address file of a `ray start` cluster that no longer runs (killed, not `ray stop`ped); True if
    removed.

    Why: Ray Train's placement-group cleaner (a detached actor of every `fit`) asks Ray's state API whether the
    controller is alive, and that API finds its cluster through this file before anything else. A dead address
    there makes each query wait for a GCS that never answers, and every training run then waits 12 s at its end
    for the cleaner to stop (measured: 46 s instead of 33 s for a two-step PRM run). `ray stop` removes the file;
    a cluster whose processes were killed leaves it behind. Removed only when the connection is refused: a live
    cluster, or a host that does not answer in time, keeps its file."""
    path = ray_address_file()
    try:
        host, port = path.read_text().strip().rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1.0):
            return False  # something answers there: a live cluster
    except (ConnectionRefusedError, ValueError):
        pass  # nothing listens there (or the file is not an address): the cluster is gone
    except OSError:
        return False  # no file, or a host that does not answer in time: not ours to judge
    try:
        path.unlink()
    except OSError:
        return False
    log(f"[ray] removed {path}: it named a Ray cluster that no longer runs (a killed `ray start`)")
    return True


def cli_main(prog: str):
    """Decorates a job's `main(argv) -> int`: user errors become one line on stderr and exit code 2."""
    from pipelines.config import ConfigError

    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return int(main(argv) or 0)
            except ConfigError as e:
                cause = getattr(e, "cause", None)  # a Ray task error wraps the user error raised in a worker
                message = " ".join(str(cause if isinstance(cause, ConfigError) else e).split())
                print(f"{prog}: {message}", file=sys.stderr)
                return 2
        return run
    return wrap


def mlflow_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def mlflow_ui_command() -> str:
    return f"mlflow ui --backend-store-uri {mlflow_uri()}"


PARENT_RUN_ENV = "STEPRAY_MLFLOW_PARENT_RUN_ID"


def mlflow_parent_tags() -> dict[str, str]:
    """Tags that nest a stage's MLflow run under the loop's run (`stepray iterate` sets the variable for its
    stages, which run as their own processes); empty for a stage run on its own."""
    parent = os.environ.get(PARENT_RUN_ENV)
    return {"mlflow.parentRunId": parent} if parent else {}


class Progress:
    """Periodic progress lines for long work: `[name] done/total unit, counters, rate, tokens/s, ETA`.

    `update` takes absolute counts; a line is printed at most every `every_s` seconds, and always at the end.
    """

    def __init__(self, name: str, total: int, unit: str = "rows", log=print, every_s: float = 10.0):
        import time

        self.name, self.total, self.unit, self.log, self.every_s = name, total, unit, log, every_s
        self._time = time.time
        self.t0 = self.last = time.time()

    def update(self, done: int, **counters: int) -> None:
        now = self._time()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        rate = done / el
        eta = (self.total - done) / rate if rate else float("nan")
        parts = [f"{done}/{self.total} {self.unit}"] + [f"{v} {k}" for k, v in counters.items()]
        parts.append(f"{rate:.2f} {self.unit}/s")
        if "tokens" in counters:
            parts.append(f"{counters['tokens'] / el:.1f} tokens/s")
        self.log(f"[{self.name}] " + ", ".join(parts) + f", ETA {eta:.0f}s")

    def elapsed(self) -> float:
        return self._time() - self.t0


def finite_json(x):
    """NaN (an undefined metric) as null, recursively, so summaries are standard JSON."""
    if isinstance(x, dict):
        return {str(k): finite_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_json(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def stage_run(stage: str, cfg):
    """Open the MLflow run of one stage: the tracking URI, experiment "stepray", a timestamped name, the parent tag
    when `stepray iterate` runs the stage, and the stage's config as flattened params. Use as a context manager;
    it returns the `mlflow` module's active run."""
    import time

    import mlflow

    from pipelines import config as C

    mlflow.set_tracking_uri(mlflow_uri())
    mlflow.set_experiment("stepray")
    run = mlflow.start_run(run_name=f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}", tags=mlflow_parent_tags())
    mlflow.log_params({k: str(v)[:250] for k, v in C.flatten(C.to_dict(cfg)).items()})
    return run


def finite_metrics(values: dict) -> dict[str, float]:
    """The finite numbers of a (nested) dict as MLflow metrics: keys flattened with dots, characters MLflow refuses
    in a metric name replaced by '_', booleans, None, NaN and text left out."""
    import re

    from pipelines import config as C

    return {re.sub(r"[^\w.\-/ ]", "_", k): float(v) for k, v in C.flatten(values).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def log_stage(stage: str, cfg, metrics: dict, artifacts=(), curves=(), log=print) -> None:
    """One stage's MLflow run (`stage_run`): its config as params, the finite numbers of `metrics`, `curves` as
    (key, value, step) points, and the files in `artifacts`."""
    import mlflow

    with stage_run(stage, cfg):
        for key, value, step in curves:
            mlflow.log_metric(key, value, step=step)
        mlflow.log_metrics(finite_metrics(metrics))
        for path in artifacts:
            mlflow.log_artifact(str(path))
    log(f"[{stage}] logged to MLflow ({mlflow_uri()}); view: {mlflow_ui_command()}")

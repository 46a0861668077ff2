"""Job submission for real: a local Ray head on loopback, a job submitted through the Jobs API, its output and logs.

The head is started with `ray start --head --block` in its own process group and stopped by signalling that group,
so the test never runs `ray stop` (which would stop every Ray cluster on the machine, the suite's own included).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    port, dash = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--include-dashboard=true", "--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats",
         # the agents' default ports are taken when another local cluster (the suite's own) runs on this machine,
         # and the head then never gets a job agent ("No available agent to submit job")
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    from ray.job_submission import JobSubmissionClient

    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    client = None
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}; see {log.name}")
        try:
            client = JobSubmissionClient(url)
            client.list_jobs()
            break
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail(f"the Jobs API at {url} did not come up in 120 s; see {log.name}")
    client.dashboard_url = url  # for the `ray job submit` CLI
    yield client
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=8)  # a graceful `ray start --block` stop took ~30 s; the group is ours alone to kill
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the head's raylet, GCS and agents are in the same group
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    log.close()
    # `ray start` wrote the head's address to Ray's address file and a killed head cannot remove it: left behind,
    # it would make every later Ray Train run on this machine wait 12 s (pipelines.runtime.clear_stale_ray_address)
    from pipelines.runtime import clear_stale_ray_address

    clear_stale_ray_address()


def _submit(client, **kwargs) -> str:
    """submit_job, retried while the head's job agent is still starting ("No available agent")."""
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def _runtime_env() -> dict:
    """configs/runtime_env.yaml (what users pass to `ray job submit --runtime-env`), rooted at the repository."""
    import yaml

    env = yaml.safe_load((REPO / "configs" / "runtime_env.yaml").read_text())
    return env | {"working_dir": str(REPO)}


def test_submit_a_job_and_read_its_output(head):
    from ray.job_submission import JobStatus

    sid = _submit(
        head, entrypoint=f"{sys.executable} -m jobs.list_problems --source synthetic --n 3 --steps 2 --seed 5",
        runtime_env=_runtime_env(), metadata={"test": "job_submission"})
    deadline = time.time() + 180
    while time.time() < deadline:
        status = head.get_job_status(sid)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = head.get_job_logs(sid)
    assert status == JobStatus.SUCCEEDED, logs[-2000:]
    assert "[problems] synthetic: 3 problems, 0 rejected" in logs
    lines = [ln for ln in logs.splitlines() if ln.startswith('{"')]
    assert len(lines) == 3 and all('"source": "synthetic"' in ln for ln in lines)
    info = head.get_job_info(sid)
    assert info.metadata["test"] == "job_submission" and info.entrypoint.endswith("--seed 5")


def test_a_failing_job_reports_failure_and_its_error(head):
    from ray.job_submission import JobStatus

    sid = _submit(head, entrypoint=f"{sys.executable} -m jobs.list_problems --source no_such_file.jsonl",
                  runtime_env=_runtime_env())
    deadline = time.time() + 120
    while time.time() < deadline and head.get_job_status(sid) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        time.sleep(1)
    assert head.get_job_status(sid) == JobStatus.FAILED
    assert "no_such_file.jsonl does not exist" in head.get_job_logs(sid)


def test_an_engine_job_through_the_ray_job_submit_cli(head, tiny_model, tmp_path):
    """What the README tells users to type: `ray job submit ... -- python -m jobs.<stage>`, here generation on the
    tiny model (a vLLM engine inside the submitted job, on the head's one CPU), waiting for it and its logs."""
    out = tmp_path / "gen"
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(
        [ray_cli, "job", "submit", "--address", head.dashboard_url, "--runtime-env",
         str(REPO / "configs" / "runtime_env.yaml"), "--working-dir", str(REPO), "--",
         "python", "-m", "jobs.generate_samples", "--out", str(out), "--no-mlflow", "problems=synthetic",
         "synthetic.n=2", "sampling.n=2", "sampling.max_tokens=8", "greedy=false", "engine.model=tiny",
         "engine.max_model_len=512", "engine.gpu_memory_utilization=0.05", "engine.num_cpus=0.5", "engine.threads=1"],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    rows = pq.read_table(out / "samples").to_pylist()
    assert len(rows) == 2 * 2 and all(r["n_completion_tokens"] > 0 and r["model"] == "tiny" for r in rows)
    assert json.loads((out / "summary.json").read_text())["samples"] == 4

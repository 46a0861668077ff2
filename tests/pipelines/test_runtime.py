"""pipelines.runtime: the address file a killed `ray start` leaves behind is cleared before a local cluster starts
(it made every Ray Train run wait 12 s at its end); a live cluster's file is kept. The loop's one cluster for its
stage processes."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from pipelines import runtime


def _point(monkeypatch, tmp_path, text: str):
    path = tmp_path / "ray_current_cluster"
    path.write_text(text)
    monkeypatch.setattr(runtime, "ray_address_file", lambda: path)
    return path


def test_a_dead_clusters_address_is_removed(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = _point(monkeypatch, tmp_path, f"127.0.0.1:{port}")
    said = []
    assert runtime.clear_stale_ray_address(log=said.append) is True
    assert not path.exists() and "no longer runs" in said[0]


def test_a_live_clusters_address_and_a_missing_file_are_left_alone(monkeypatch, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        path = _point(monkeypatch, tmp_path, f"127.0.0.1:{s.getsockname()[1]}")
        assert runtime.clear_stale_ray_address(log=lambda m: None) is False
        assert path.exists()
    path.unlink()
    assert runtime.clear_stale_ray_address(log=lambda m: None) is False


def test_the_file_is_where_ray_looks():
    import ray._common.utils as ray_utils

    assert str(runtime.ray_address_file()) == ray_utils.get_ray_address_file(None)


REPO = Path(__file__).resolve().parents[2]


def test_stage_processes_join_the_one_cluster_the_loop_starts_and_it_stops_after():
    """In a fresh process (this test session may hold its own Ray): a child job process's init_ray joins the
    cluster cluster_for_stages started (the same GCS address), and after the block RAY_ADDRESS is gone and Ray is
    down."""
    script = textwrap.dedent("""
        import os, subprocess, sys
        import ray
        from pipelines.runtime import cluster_for_stages
        with cluster_for_stages(log=lambda m: None) as address:
            assert os.environ["RAY_ADDRESS"] == address
            child = subprocess.run([sys.executable, "-c", "from pipelines.runtime import init_ray; "
                                    "ray = init_ray(); print(ray.get_runtime_context().gcs_address)"],
                                   capture_output=True, text=True, timeout=120)
            assert child.returncode == 0, child.stderr[-2000:]
            assert child.stdout.strip().splitlines()[-1] == address, (child.stdout, address)
        assert "RAY_ADDRESS" not in os.environ and not ray.is_initialized()
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


def test_a_named_cluster_is_joined_not_started(monkeypatch):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    was = ray.is_initialized()
    with runtime.cluster_for_stages(log=lambda m: None) as address:
        assert address == "10.0.0.1:6379"
    assert os.environ["RAY_ADDRESS"] == "10.0.0.1:6379" and ray.is_initialized() == was

"""pipelines.runtime: the address file a killed `ray start` leaves behind is cleared before a local cluster starts
(it made every Ray Train run wait 12 s at its end); a live cluster's file is kept."""

import socket

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

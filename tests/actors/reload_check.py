"""One check shared by the engine tests: a reload in place gives what a fresh engine on the new checkpoint gives."""

import math


def check_reload_matches_a_fresh_engine(engine, ray_session, tiny_model: str, tmp_path) -> None:
    """Another checkpoint of the same architecture loads into the running `engine` actor in place; the engine then
    computes what a fresh engine on that checkpoint computes (same greedy tokens, same log-probabilities); loading
    the first checkpoint back restores its output (the prefix cache is dropped)."""
    from actors.vllm_generator import VLLMGenerator
    from pipelines.models import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=5, log=lambda *_: None)
    prompt, greedy = "The list: apple, banana,", {"n": 1, "temperature": 0.0, "max_tokens": 8, "logprobs": 1}
    before = ray_session.get(engine.generate.remote([prompt], greedy))[0][0]
    assert ray_session.get(engine.reload_weights.remote(str(other)))["reload_s"] >= 0
    swapped = ray_session.get(engine.generate.remote([prompt], greedy))[0][0]
    fresh = ray_session.remote(num_cpus=1)(VLLMGenerator).remote(
        str(other), {"max_model_len": 256, "gpu_memory_utilization": 0.05}, {}, 1, "fresh")
    try:
        expected = ray_session.get(fresh.generate.remote([prompt], greedy))[0][0]
    finally:
        ray_session.kill(fresh)
    ray_session.get(engine.reload_weights.remote(tiny_model))
    back = ray_session.get(engine.generate.remote([prompt], greedy))[0][0]
    assert swapped["token_ids"] != before["token_ids"]
    assert swapped["token_ids"] == expected["token_ids"]
    assert math.isclose(swapped["cum_logprob"], expected["cum_logprob"], rel_tol=1e-4, abs_tol=1e-3)
    assert back["token_ids"] == before["token_ids"]

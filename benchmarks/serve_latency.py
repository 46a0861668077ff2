"""Serving overhead and a bounded load test: best-of-4 through the endpoint vs the same work done directly.

    python -m benchmarks.serve_latency [--model smollm2] [--prm PATH] [--requests 8] [--json out.json]

One run on this machine:
1-2. side by side, both started at once: direct (the endpoint's engine class and settings as a plain actor,
   actors/start.engine_actor, and a PRMScorer actor; `search_best_of_n` called from the driver over them, the PRM
   reading the same text the endpoint gives it) and the endpoint (the Serve app, pipelines/serve.py: Generator,
   PRM, SearchIngress, on 127.0.0.1, best-of-4 /v1/completions requests through the `openai` client). Each of R
   questions goes to both in turn (ABBA order) with the same `seed`, so both sides generate the same tokens; the
   ratio is endpoint time / direct time over the same requests (goal <= 1.10);
3. load test (loopback only, bounded by request count and a time limit): greedy and best-of-4 at concurrency
   1, 2, 4, plus a share of malformed requests, reporting throughput, p50/p99 latency and the 4xx/5xx counts.
Without --prm, an untrained reward head on the generator's backbone stands in as the PRM: the scores are
meaningless but the work (a forward pass of the 135M backbone per candidate) is the real cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

QUESTIONS = [
    "Tom has 12 apples. He buys 7 more apples. How many apples does Tom have now?",
    "Mia has 30 stickers. She gives away 9 stickers. How many stickers does Mia have now?",
    "Ravi has 6 books. His pile of books grows to 3 times its size. How many books does Ravi have now?",
    "Lena has 48 coins. She splits them into 4 equal groups and keeps one group. How many coins does she have?",
    "Omar starts with 15 cards. He wins 8 cards in a game. How many cards does Omar have now?",
    "Sofia has 40 shells. She loses 13 of them. How many shells does Sofia have now?",
    "Ken owns 9 stamps. He multiplies his stamps by 4. How many stamps does Ken have now?",
    "Ada has 27 pencils. She sells 11 pencils. How many pencils does Ada have now?",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prm", default="", help="a trained RewardModel folder (default: untrained head on the backbone)")
    ap.add_argument("--requests", type=int, default=8, help="questions in the latency comparison")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--load-requests", type=int, default=12, help="requests per (kind, concurrency) in the load test")
    ap.add_argument("--load-time-s", type=float, default=120, help="time limit per load-test cell")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import ray
    from transformers import AutoTokenizer

    from actors.prm_scorer import PRMScorer
    from actors.start import engine_actor
    from pipelines.generate import EngineConfig
    from pipelines.models import resolve_model
    from pipelines.prompts import PromptConfig, render
    from pipelines.reward_model import RewardModel
    from pipelines.runtime import init_ray
    from pipelines.search import SearchConfig, SearchProblem, engine_generate, search_best_of_n

    model_path = str(resolve_model(args.model, prepare=True))
    tok = AutoTokenizer.from_pretrained(model_path)
    tmp = tempfile.mkdtemp()
    prm_path = args.prm
    if not prm_path:
        prm_path = os.path.join(tmp, "prm")
        RewardModel.from_base(model_path, kind="prm").save(prm_path, tok)
    questions = (QUESTIONS * 10)[: args.requests]
    pcfg = PromptConfig()
    eng = EngineConfig(model=model_path, max_model_len=1024, threads=2)
    scfg = SearchConfig(max_tokens=args.max_tokens, fmt=pcfg.format, logprobs=0)
    ray_ = init_ray()

    # Both sides run at once, and each question goes to both, one after the other (ABBA order, so that drift of
    # the machine over the run falls on both), with the same sampling seed: the same tokens are generated on both
    # sides, and the ratio is of the same work. Run one side after the other with free sampling, the ratio moved
    # by +-0.5 between runs from the lengths of the samples and the first requests of a fresh engine alone.
    # direct: the endpoint's own engine class and settings (actors/start.engine_actor: AsyncVLLMGenerator for this
    # EngineConfig with the online batch sizes, as the Generator deployment) and scorer (PRMScorer with one thread,
    # as the PRM deployment)
    # Ray's CPU reservations are halved on both sides so that the two apps fit on 2 logical CPUs at once; the
    # threads (engine 2, PRM 1) are what they would be alone
    gen = engine_actor(replace(eng, num_cpus=0.5), model_path, "direct", offline=False)
    prm = ray.remote(num_cpus=0.25)(PRMScorer).remote(prm_path, threads=1)
    ray.get([gen.ready.remote(), prm.ready.remote()])
    meta = ray.get(prm.ready.remote())
    prm_cfg = PromptConfig(**meta["prompt"]) if meta.get("prompt") else pcfg

    def score(prompts, steps):
        return ray.get(prm.score.remote(prompts, steps))

    def problem(q: str) -> SearchProblem:
        # what the ingress does with a /v1/completions request: the prompt as given to the engine, and the PRM
        # reading that text rendered as the PRM's training rendered questions (pipelines/serve.SearchIngress._run)
        prompt = render(tok, q, "numeric", pcfg)
        return SearchProblem(prompt, render(tok, prompt, "numeric", prm_cfg))

    def direct_bo4(q: str, seed: int):
        return search_best_of_n(problem(q), engine_generate(gen, replace(scfg, seed=seed)), score, 4, scfg)

    # endpoint: the Serve app (Generator, PRM, SearchIngress) over HTTP
    from openai import OpenAI
    from ray import serve

    from pipelines.serve import build_app

    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"engine": {"model": eng.model, "max_model_len": eng.max_model_len, "threads": eng.threads},
                         "prm": prm_path,
                         "max_tokens": args.max_tokens, "max_total_tokens": 4 * args.max_tokens,
                         "search": {"max_tokens": args.max_tokens, "logprobs": 0},
                         "deployments": {"Generator": {"ray_actor_options": {"num_cpus": 0.5}},
                                         "PRM": {"ray_actor_options": {"num_cpus": 0.25}}}}),
              name="bench", route_prefix="/")
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)

    def bo4(q: str, seed: int | None = None):
        # /v1/completions with the very prompt the direct side used: the same work on both sides (a chat request
        # would get the chat template without the system prompt and few-shot turn, and longer answers)
        return client.completions.create(
            model="stepray", prompt=render(tok, q, "numeric", pcfg), max_tokens=args.max_tokens, seed=seed,
            extra_body={"search": {"strategy": "best_of_n", "n": 4}})

    for i in range(2):  # warm-up: the first requests of a fresh engine run new shapes
        direct_bo4(questions[i % len(questions)], 10 + i)
        bo4(questions[i % len(questions)], 10 + i)
    direct, direct_tokens, endpoint, endpoint_tokens = [], [], [], []
    for i, q in enumerate(questions):
        seed = 1000 * (i + 1)
        for side in (("d", "e") if i % 2 == 0 else ("e", "d")):
            t0 = time.time()
            if side == "d":
                r = direct_bo4(q, seed)
                direct.append(time.time() - t0)
                direct_tokens.append(r.tokens_generated)
            else:
                r = bo4(q, seed)
                endpoint.append(time.time() - t0)
                endpoint_tokens.append(r.usage.completion_tokens)
    ray.kill(gen)
    ray.kill(prm)
    tokens_equal = sum(a == b for a, b in zip(direct_tokens, endpoint_tokens))
    print(f"[bench] best-of-4 over {len(direct)} requests: direct median {statistics.median(direct):.2f}s, "
          f"endpoint median {statistics.median(endpoint):.2f}s; tokens equal on {tokens_equal} of {len(direct)}",
          flush=True)

    # 3. load test -----------------------------------------------------------------------------------------
    import httpx

    async def cell(kind: str, conc: int) -> dict:
        lat, codes = [], {"2xx": 0, "4xx": 0, "5xx": 0}
        deadline = time.time() + args.load_time_s
        sem = asyncio.Semaphore(conc)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            async def one(i: int):
                if time.time() > deadline:
                    return
                async with sem:
                    body = {"model": "stepray", "max_tokens": args.max_tokens,
                            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
                    if kind == "best_of_4":
                        body["search"] = {"strategy": "best_of_n", "n": 4}
                    if i % 6 == 5:  # a malformed request now and then: must be a 4xx, never a 5xx
                        body["search"] = {"strategy": "nope"}
                    t0 = time.time()
                    r = await http.post("/v1/chat/completions", json=body)
                    codes[f"{r.status_code // 100}xx"] = codes.get(f"{r.status_code // 100}xx", 0) + 1
                    if r.status_code == 200:
                        lat.append(time.time() - t0)
            t0 = time.time()
            await asyncio.gather(*(one(i) for i in range(args.load_requests)))
            wall = time.time() - t0
        return {"kind": kind, "concurrency": conc, "ok": len(lat), "rps": len(lat) / wall,
                "p50_s": _pct(lat, 0.5), "p99_s": _pct(lat, 0.99), **codes}

    load = []
    for kind in ("greedy", "best_of_4"):
        for conc in (1, 2, 4):
            load.append(asyncio.run(cell(kind, conc)))
            print(f"[load] {json.dumps(load[-1])}", flush=True)
    serve.shutdown()
    ray_.shutdown()

    result = {
        "model": args.model, "requests": len(questions), "max_tokens": args.max_tokens,
        "direct_median_s": statistics.median(direct), "endpoint_median_s": statistics.median(endpoint),
        "direct_mean_tokens": statistics.mean(direct_tokens), "endpoint_mean_tokens": statistics.mean(endpoint_tokens),
        "load": load,
    }
    # the ratio of total time over the same requests (the medians of two skewed sets can pair different requests)
    result["ratio"] = sum(endpoint) / sum(direct)
    result["per_request_ratio_median"] = statistics.median(e / d for e, d in zip(endpoint, direct))
    result["direct_s"], result["endpoint_s"] = [round(x, 3) for x in direct], [round(x, 3) for x in endpoint]
    result["tokens_equal"] = tokens_equal
    print(json.dumps(result, indent=1))
    print(f"\nbest-of-4 latency: endpoint {sum(endpoint):.1f}s vs direct {sum(direct):.1f}s over the same "
          f"{len(direct)} requests = {result['ratio']:.2f}x (goal <= 1.10; per request, median "
          f"{result['per_request_ratio_median']:.2f}x); medians {result['endpoint_median_s']:.2f}s vs "
          f"{result['direct_median_s']:.2f}s; tokens/request {result['endpoint_mean_tokens']:.0f} vs "
          f"{result['direct_mean_tokens']:.0f} (equal on {result['tokens_equal']} of {len(direct)})")
    print(f"{'kind':<11}{'conc':>5}{'ok':>5}{'req/s':>8}{'p50 s':>8}{'p99 s':>8}{'4xx':>5}{'5xx':>5}")
    for c in load:
        print(f"{c['kind']:<11}{c['concurrency']:>5}{c['ok']:>5}{c['rps']:>8.2f}{c['p50_s']:>8.2f}{c['p99_s']:>8.2f}"
              f"{c['4xx']:>5}{c['5xx']:>5}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

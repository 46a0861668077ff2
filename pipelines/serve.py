"""Ray Serve: an OpenAI-compatible endpoint whose requests choose the search strategy and its budget.

    serve run configs/serve/cpu.yaml            (the Serve config: import_path pipelines.serve:build_app)
    stepray serve --config configs/serve/cpu.yaml

Three deployments, each with its own autoscaling_config and resources in the config file's `deployments:`:
- Generator:     actors/vllm_async_generator.AsyncVLLMGenerator (concurrent calls; continuous batching across
                 concurrent requests);
- PRM:           the verifier of the scored strategies, only when `prm` is set: a PRM (actors/prm_scorer), or an
                 ORM, V-STaR or GenRM verifier scoring whole solutions (`PRMDeployment`);
- SearchIngress: FastAPI; validates requests, runs `pipelines.search.STRATEGIES[strategy]` over the two through
                 deployment handles, and answers in OpenAI's shapes.

API (works with the official `openai` client):
- POST /v1/chat/completions, POST /v1/completions: OpenAI bodies plus an optional `search` object
  {"strategy": greedy|majority|best_of_n|weighted|beam|dvts|mcts|reflection|revise, "n": budget, "beam_width": k,
   "max_steps": s, "prm": "default"|"confidence"|"checks"} ("checks": the arithmetic step checks as the verifier,
  no model; `search.StepChecksScorer`). The response carries the chosen solution as the message, and
  `search`: {strategy, budget, answer, steps, step_scores, score, tokens_generated, tokens_scored, candidates}.
  usage.completion_tokens counts every token the search generated (the compute the request spent); the chosen
  solution's own length is search.chosen_tokens.
  `seed` (OpenAI's field) seeds the search's sampling: the same request on the same engine samples the same
  candidates.
- `stream: true` streams server-sent events for the plain greedy strategy.
- GET /v1/models, GET /health.
Errors are OpenAI-style JSON {"error": {"message", "type", "param", "code"}}: 400 for malformed JSON, unknown or
out-of-range fields and over-long prompts (the message names the field), 401 without the API key when one is set
(config `api_key` or $STEPRAY_API_KEY), 404 for an unknown model, 504 when the request outlives
`request_timeout_s` (its engine requests are cancelled). No request can make a replica die: the search runs behind
these checks and its own exceptions become 500s with the reason.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from pipelines import config as C
from pipelines.config import help_field
from pipelines.generate import EngineConfig
from pipelines.prompts import PromptConfig, render
from pipelines.search import CHECKS, CONFIDENCE, SCORED, STRATEGIES, SearchConfig, SearchProblem


def _num(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig = help_field(
        EngineConfig(model="smollm2", max_model_len=1024, dtype="bfloat16", gpu_memory_utilization=0.15, threads=2),
        "the Generator's vLLM engine (model, max_model_len, dtype, seed, prefix caching, KV share, threads, extra); "
        "its resources and replicas are the `Generator` deployment's options, not engine.num_gpus & co.")
    model_name: str = help_field("stepray", "the model id clients name (GET /v1/models)")
    prm: str = help_field("", "the verifier of scored strategies: a PRM or ORM folder (`stepray train prm|orm`) or "
                              "a V-STaR or GenRM verifier (`stepray train dpo|genrm`); empty = Marco-o1 confidence "
                              "only")
    device: str = help_field("auto", "PRM device: auto (the GPU Ray gave the PRM replica, else the CPU) | cpu | cuda")
    prompt: PromptConfig = help_field(PromptConfig(), "step format of solutions (splitting, the step separator)")
    search: SearchConfig = help_field(SearchConfig(max_tokens=256), "search defaults; requests override some")
    max_n: int = help_field(16, "cap on search.n (the budget)")
    max_tokens: int = help_field(512, "cap on max_tokens per solution")
    max_total_tokens: int = help_field(8192, "cap on search.n x max_tokens (the most a request may generate)")
    max_prompt_tokens: int = help_field(768, "longest prompt accepted")
    request_timeout_s: float = help_field(120.0, "a request still running after this is cancelled (504)")
    api_key: str = help_field("", "bearer token required on every request; empty = $STEPRAY_API_KEY, else none")
    deployments: dict = help_field({}, "Serve options per deployment (Generator, PRM, SearchIngress: "
                                       "autoscaling_config, ray_actor_options, max_ongoing_requests) when the app is "
                                       "built in Python; a config file's `deployments:` section overrides them")

    def __post_init__(self) -> None:
        if self.max_prompt_tokens >= self.engine.max_model_len:
            raise ValueError("max_prompt_tokens must be below engine.max_model_len")
        # Serve sizes and scales the Generator itself (ray_actor_options, autoscaling_config), and a config file's
        # `deployments:` replaces ray_actor_options whole: engine.num_gpus beside it would be a second, silently
        # overridden place for the same GPU. So the engine's Ray Data pool fields stay at their defaults here.
        pool = [f"engine.{k}" for k in ("num_gpus", "num_cpus", "min_engines", "max_engines", "batch_size")
                if getattr(self.engine, k) != getattr(EngineConfig(), k)]
        if pool:
            raise ValueError(f"{', '.join(pool)}: not read by Serve (these fields size Ray Data engine pools); set "
                             "the Generator's resources and replicas in the `Generator` deployment's options "
                             "(ray_actor_options: {num_cpus, num_gpus}, autoscaling_config), see "
                             "configs/serve/gpu.yaml")
        if min(self.max_n, self.max_tokens, self.max_total_tokens) < 1 or self.request_timeout_s <= 0:
            raise ValueError("max_n, max_tokens, max_total_tokens and request_timeout_s must be positive")


# ---------------------------------------------------------------------------------------------- request bodies

class SearchParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: Literal["greedy", "majority", "best_of_n", "weighted", "beam", "dvts", "mcts", "reflection",
                      "revise"] = "greedy"
    n: int = Field(1, ge=1, description="the budget: samples, beam width x expansions, simulations")
    beam_width: int | None = Field(None, ge=1, description="beams kept per step (beam, dvts)")
    max_steps: int | None = Field(None, ge=1, le=64)
    prm: Literal["default", "confidence", "checks"] = Field(
        "default", description="the scored strategies' verifier: default (the deployed PRM/ORM/V-STaR/GenRM), "
                               "confidence (Marco-o1, from token logprobs) or checks (the arithmetic of each step "
                               "checked against the question's numbers; no model)")
    timeout_s: float | None = Field(None, gt=0, description="cancel the request after this (capped by the server's)")
    answer_kind: Literal["math", "numeric"] = Field(
        "math", description="how answers group in a vote: math (math-verify: \\frac{1}{2} = 0.5 = 1/2, LaTeX "
                            "expressions, sets) or numeric (GSM8K numbers: thousands commas, units)")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use (user, ...)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, description="sampling seed: the same request on the same engine samples "
                                                     "the same candidates")
    n: int = Field(1, ge=1, le=1, description="one choice per request; ask for more compute with search.n")
    stream: bool = False
    search: SearchParams | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": status}})


api = FastAPI(title="stepray", description=__doc__)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    e = exc.errors()[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return _error(400, f"malformed JSON body: {e.get('msg')}", None)
    param = ".".join(loc) or None
    return _error(400, f"{param or 'body'}: {e.get('msg')}" + (f" (got {e['input']!r})" if "input" in e and
                                                               not isinstance(e["input"], dict) else ""), param)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.param, exc.kind)


# ------------------------------------------------------------------------------------- handles as callables

class _Calls:
    """Sync callables over deployment handles for the search thread, cancellable from the event loop.

    Strategies are synchronous functions of `generate`/`score` (pipelines/search.py); they run in a worker thread
    and block on `.result()`. On timeout the event loop calls `cancel()`: in-flight responses are cancelled (Serve
    cancels the replica's coroutine, and the generator aborts its engine requests) and later calls raise.
    """

    def __init__(self, generator, prm, timeout_s: float):
        self.generator, self.prm, self.timeout_s = generator, prm, timeout_s
        self.pending: set = set()
        self.lock = threading.Lock()
        self.cancelled = False

    def _call(self, method, *args):
        with self.lock:
            if self.cancelled:
                raise TimeoutError("request cancelled")
            resp = method.remote(*args)
            self.pending.add(resp)
        try:
            return resp.result(timeout_s=self.timeout_s)
        finally:
            with self.lock:
                self.pending.discard(resp)

    def generate(self, prompts, sampling):  # the VLLMGenerator contract, for search.engine_generate
        return self._call(self.generator.generate, prompts, sampling)

    def score(self, prompts, step_lists):
        return self._call(self.prm.score, prompts, step_lists)

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            for r in self.pending:
                r.cancel()


@serve.deployment(name="SearchIngress", max_ongoing_requests=32)
@serve.ingress(api)
class SearchIngress:
    def __init__(self, cfg: dict, generator, prm=None):
        from transformers import AutoTokenizer

        from pipelines.models import load_path

        self.cfg: ServeConfig = C.load_config(ServeConfig, base=cfg)
        self.generator, self.prm = generator, prm
        self.tok = AutoTokenizer.from_pretrained(load_path(self.cfg.engine.model))
        self.api_key = self.cfg.api_key or os.environ.get("STEPRAY_API_KEY", "")
        self.prm_prompt: PromptConfig | None = None if prm is not None else self.cfg.prompt
        self.prm_kind = "prm"

    async def _scorer_prompt_cfg(self) -> PromptConfig:
        """How the verifier saw questions in training (its reward_model.json / verifier.json) and its kind, asked
        once from the PRM deployment."""
        if self.prm_prompt is None:
            meta = await self.prm.meta.remote()
            self.prm_prompt = PromptConfig(**meta["prompt"]) if meta.get("prompt") else self.cfg.prompt
            self.prm_kind = meta.get("kind") or "prm"
        return self.prm_prompt

    # ---------------------------------------------------------------------------------------------- checks
    def _auth(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           "authentication_error")

    def _check(self, body: _Common, n_prompt: int, param: str) -> tuple[SearchParams, int]:
        cfg = self.cfg
        if body.model not in (None, "", cfg.model_name):
            raise APIError(404, f"model {body.model!r} is not served here; GET /v1/models lists "
                                f"{cfg.model_name!r}", "model", "not_found_error")
        search = body.search or SearchParams()
        max_tokens = body.max_completion_tokens or body.max_tokens or cfg.search.max_tokens
        if max_tokens > cfg.max_tokens:
            raise APIError(400, f"max_tokens: {max_tokens} is above this server's cap of {cfg.max_tokens}",
                           "max_tokens")
        if search.n > cfg.max_n:
            raise APIError(400, f"search.n: {search.n} is above this server's cap of {cfg.max_n}", "search.n")
        if search.n * max_tokens > cfg.max_total_tokens:
            raise APIError(400, f"search.n x max_tokens = {search.n * max_tokens} is above this server's budget of "
                                f"{cfg.max_total_tokens} tokens per request", "search.n")
        if search.strategy == "greedy" and search.n != 1:
            raise APIError(400, "search.n: the greedy strategy has a budget of 1", "search.n")
        if search.beam_width is not None and search.beam_width > search.n:
            raise APIError(400, f"search.beam_width: {search.beam_width} is above search.n={search.n}",
                           "search.beam_width")
        if search.strategy in SCORED and search.prm == "default" and self.prm is None:
            raise APIError(400, f"search.prm: strategy {search.strategy!r} needs a PRM and none is deployed; "
                                "use search.prm='confidence' (Marco-o1 confidence) or deploy one", "search.prm")
        if n_prompt > cfg.max_prompt_tokens:
            raise APIError(400, f"{param}: the prompt has {n_prompt} tokens, above the limit of "
                                f"{cfg.max_prompt_tokens}", param)
        if body.stream and search.strategy != "greedy":
            raise APIError(400, "stream: streaming is available for the greedy strategy only", "stream")
        return search, max_tokens

    def _search_cfg(self, body: _Common, search: SearchParams, max_tokens: int) -> SearchConfig:
        s = replace(self.cfg.search, fmt=self.cfg.prompt.format, max_tokens=max_tokens)
        if body.temperature is not None:
            s = replace(s, temperature=body.temperature)
        if body.top_p is not None:
            s = replace(s, top_p=body.top_p)
        if body.seed is not None:
            s = replace(s, seed=body.seed)
        if search.max_steps is not None:
            s = replace(s, max_steps=search.max_steps)
        if search.beam_width is not None:
            s = replace(s, expansions=max(1, search.n // search.beam_width))
        if search.strategy in SCORED and search.prm == "confidence" and not s.logprobs:
            s = replace(s, logprobs=5)
        return s

    # ---------------------------------------------------------------------------------------------- running
    async def _run(self, prompt: str, question: str, body: _Common, param: str) -> dict:
        from pipelines.search import engine_generate

        n_prompt = len(self.tok.encode(prompt, add_special_tokens=False))
        search, max_tokens = self._check(body, n_prompt, param)
        scfg = self._search_cfg(body, search, max_tokens)
        timeout = min(search.timeout_s or self.cfg.request_timeout_s, self.cfg.request_timeout_s)
        calls = _Calls(self.generator, self.prm, timeout)
        generate = engine_generate(calls, scfg)
        score = None
        if search.strategy in SCORED:
            score = {"confidence": CONFIDENCE, "checks": CHECKS}.get(search.prm, calls.score)
        scorer_prompt = question if search.prm == "checks" else prompt  # the checks read the question's numbers
        if self.prm is not None and search.strategy in SCORED and search.prm == "default":
            pcfg = await self._scorer_prompt_cfg()
            # GenRM wraps the raw question in its own verification prompt; the others read it as in training
            scorer_prompt = question if self.prm_kind == "genrm" else render(self.tok, question, "numeric", pcfg)
        problem = SearchProblem(prompt=prompt, question=scorer_prompt, kind=search.answer_kind)
        fn = STRATEGIES[search.strategy]
        t0 = time.time()
        try:
            result = await asyncio.wait_for(asyncio.to_thread(fn, problem, generate, score, search.n, scfg),
                                            timeout=timeout)
        except asyncio.TimeoutError:
            calls.cancel()
            raise APIError(504, f"the request ran past {timeout:g}s and was cancelled "
                                "(its engine requests too); ask for a smaller search.n or max_tokens", None,
                           "timeout_error") from None
        except ValueError as e:  # a strategy refusing its inputs is the request's fault
            raise APIError(400, f"search: {e}", "search") from None
        chosen_tokens = len(self.tok.encode(result.completion, add_special_tokens=False))
        return {
            "completion": result.completion,
            "finish_reason": "length" if chosen_tokens >= max_tokens else "stop",
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": result.tokens_generated,
                      "total_tokens": n_prompt + result.tokens_generated},
            "search": {"strategy": search.strategy, "budget": search.n, "answer_kind": search.answer_kind,
                       "answer": result.answer,
                       "steps": result.steps, "step_scores": [_num(v) for v in result.step_scores],
                       "score": _num(result.score), "scorer": "none" if score is None else
                       search.prm if score in (CONFIDENCE, CHECKS) else self.prm_kind,
                       "tokens_generated": result.tokens_generated, "tokens_scored": result.tokens_scored,
                       "chosen_tokens": chosen_tokens, "sequences": result.sequences,
                       "candidates": [{k: _num(v) if isinstance(v, float) else v for k, v in c.items()}
                                      for c in result.candidates],
                       "wall_s": round(time.time() - t0, 3)},
        }

    async def _stream(self, prompt: str, body: _Common, param: str, chat: bool):
        n_prompt = len(self.tok.encode(prompt, add_special_tokens=False))
        search, max_tokens = self._check(body, n_prompt, param)
        sampling = {"n": 1, "temperature": 0.0, "max_tokens": max_tokens}
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        gen = self.generator.options(stream=True).stream.remote(prompt, sampling)

        async def events():
            if chat:
                yield _sse({"id": rid, "object": obj, "created": created, "model": self.cfg.model_name,
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]})
            try:
                async for piece in gen:
                    if piece.get("error"):
                        yield _sse({"error": {"message": piece["error"], "type": "server_error"}})
                        break
                    fin = piece["finish_reason"] or None
                    choice = ({"index": 0, "delta": {"content": piece["delta"]}, "finish_reason": fin} if chat
                              else {"index": 0, "text": piece["delta"], "finish_reason": fin})
                    yield _sse({"id": rid, "object": obj, "created": created, "model": self.cfg.model_name,
                                "choices": [choice]})
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:  # the client went away: stop the engine request
                gen.cancel()
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---------------------------------------------------------------------------------------------- routes
    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        self._auth(request)
        msgs = [m.model_dump(include={"role", "content"}) for m in body.messages]
        prompt = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        users = [m.content for m in body.messages if m.role == "user"]
        if body.stream:
            return await self._stream(prompt, body, "messages", chat=True)
        out = await self._run(prompt, users[-1] if users else msgs[-1]["content"], body, "messages")
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.cfg.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["completion"]},
                             "finish_reason": out["finish_reason"], "logprobs": None}],
                "usage": out["usage"], "search": out["search"]}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._auth(request)
        if body.stream:
            return await self._stream(body.prompt, body, "prompt", chat=False)
        out = await self._run(body.prompt, body.prompt, body, "prompt")
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.cfg.model_name,
                "choices": [{"index": 0, "text": out["completion"], "finish_reason": out["finish_reason"],
                             "logprobs": None}],
                "usage": out["usage"], "search": out["search"]}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "stepray"}]}

    @api.get("/health")
    async def health(self):
        return {"status": "ok", "model": self.cfg.model_name, "prm": bool(self.prm)}


def verifier_kind(path: str) -> str:
    """What a verifier folder holds: prm or orm (reward_model.json), vstar or genrm (verifier.json)."""
    from actors.vstar_scorer import VERIFIER_FILE
    from pipelines.reward_model import is_reward_model

    if (Path(path) / VERIFIER_FILE).is_file():
        return str(json.loads((Path(path) / VERIFIER_FILE).read_text()).get("kind", ""))
    if is_reward_model(path):
        return str(json.loads((Path(path) / "reward_model.json").read_text()).get("kind", "prm"))
    raise C.ConfigError(f"prm: {path} is neither a reward model folder (`stepray train prm|orm`) nor a verifier "
                        f"folder (`stepray train dpo|genrm`)")


class PRMDeployment:
    """The verifier behind the scored strategies, as the PRM deployment's body: a PRM (step scores), or an ORM, a
    V-STaR or a GenRM verifier (one score per solution, read as the last step's score, as `stepray evaluate` does),
    plus `meta()` (its kind and how its prompts were rendered in training; GenRM reads the raw question)."""

    def __init__(self, model_path: str, device: str = "auto", threads: int = 1):
        from actors.start import SCORER_CLASSES
        from pipelines.search import orm_as_step_scorer

        self.kind = verifier_kind(model_path)
        self.scorer = SCORER_CLASSES[self.kind]()(model_path, device=device, threads=threads)
        self._score = self.scorer.score if self.kind == "prm" else orm_as_step_scorer(self.scorer.score_outcome)

    def meta(self) -> dict:
        return {**self.scorer.ready(), "kind": self.kind}

    def score(self, prompts: list[str], steps: list[list[str]]) -> list[list[float]]:
        return self._score(prompts, steps)


def build_app(args: dict[str, Any]):
    """The Serve application (the config file's import_path is `pipelines.serve:build_app`, `args` its args)."""
    from actors.vllm_async_generator import AsyncVLLMGenerator
    from pipelines.models import load_path

    cfg = C.load_config(ServeConfig, base=dict(args))
    model_path = load_path(cfg.engine.model)
    unknown = set(cfg.deployments) - {"Generator", "PRM", "SearchIngress"}
    if unknown:
        raise C.ConfigError(f"deployments: {sorted(unknown)} is not a deployment of this app (Generator, PRM, "
                            f"SearchIngress)")

    def options(name: str, **defaults: Any) -> dict:
        return {**defaults, **cfg.deployments.get(name, {})}

    generator = serve.deployment(AsyncVLLMGenerator, name="Generator", **options(
        "Generator", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})).bind(
        model_path, cfg.engine.engine_kwargs(), {}, cfg.engine.threads, cfg.model_name, offline=False,
        scheduler=cfg.engine.scheduler)
    prm = None
    if cfg.prm:
        verifier_kind(cfg.prm)  # a folder that is no verifier is refused here, not in a replica that keeps restarting
        prm = serve.deployment(PRMDeployment, name="PRM", **options(
            "PRM", max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.5})).bind(cfg.prm, cfg.device, 1)
    return SearchIngress.options(**options("SearchIngress", ray_actor_options={"num_cpus": 0.1})).bind(
        C.to_dict(cfg), generator, prm)

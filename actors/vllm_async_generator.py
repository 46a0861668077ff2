"""AsyncVLLMGenerator: an engine that takes concurrent calls, behind the same contract as VLLMGenerator.

The engine is vLLM's async engine (AsyncLLM, its scheduler in a subprocess: the default on GPU) or vLLM's
in-process engine stepped by a thread of the actor (actors/engine_thread.ThreadedEngine: the default on CPU, where
the subprocess only takes cores from the model); `scheduler` chooses (EngineConfig.scheduler).

Same inputs and outputs as `VLLMGenerator.generate` (prompts or token ids, sampling dicts, n completions per prompt
with text, token ids, finish reason and logprobs), but each prompt is its own engine request, so concurrent callers
share the engine's continuous batching: a call's tail (its last long sequences) no longer leaves the engine part
idle, because other calls' requests fill it. Plus `stream()` for token streaming. A cancelled call (client gone,
request timeout) aborts its engine requests, so no work is left running for nobody.

Used three ways: the Serve generator deployment (pipelines/serve.py, its own autoscaling and resources); a Ray Data
async callable class (`async __call__`, the generation stage: an actor works on several batches at once, up to the
pool's max_concurrent_calls_per_actor); and an async Ray actor for drivers whose threads call `generate` at once
(the evaluation, actors/start.engine_actor).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any, AsyncIterator

from actors.vllm_generator import VLLMGenerator, batch_requests, completion_dicts, completions_table, engine_setup


SCHEDULERS = ("auto", "thread", "process")  # EngineConfig.scheduler's values


def scheduler_mode(scheduler: str) -> str:
    """Where the engine's scheduler runs: "thread" (in this process, ThreadedEngine) or "process" (AsyncLLM's
    subprocess). "auto": "thread" when vLLM runs its model in the caller's process (VLLM_ENABLE_V1_MULTIPROCESSING=0,
    which engine_setup sets on CPU: cpu_engine_in_process), else "process" (GPU: the subprocess overlaps the GPU's
    step with scheduling). Call after engine_setup."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"engine.scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if scheduler != "auto":
        return scheduler
    import vllm.envs as envs

    return "process" if envs.VLLM_ENABLE_V1_MULTIPROCESSING else "thread"


class AsyncVLLMGenerator(VLLMGenerator):
    def __init__(self, model: str, engine_kwargs: dict[str, Any] | None = None,
                 sampling: dict[str, Any] | None = None, threads: int = 0, model_name: str = "",
                 offline: bool = True, scheduler: str = "auto"):
        """As VLLMGenerator's; offline: vLLM's batch sizes for offline work (what `vllm.LLM` gets) rather than its
        online defaults (False: the Serve generator deployment, where a long prefill step delays every stream);
        scheduler: where vLLM's scheduler runs (scheduler_mode)."""
        kwargs = engine_setup(engine_kwargs, threads)
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.time()
        # vLLM sizes its scheduler's batch by who starts the engine: `vllm.LLM` (offline work) gets the larger sizes
        # (on CPU 256 sequences and 4,096 tokens a step; on an H100-class GPU 1,024 and 16,384), an AsyncLLM started
        # without a usage context vLLM's general defaults (128 and 2,048). The generation and evaluation pools are
        # offline work, so they ask for the offline sizes, as `vllm.LLM` and the synchronous engine get, and the
        # generation benchmark compares the same engine config on both sides (its ratio was 0.88x before and 0.87x
        # after on 96 x 8 x 128: the engine stayed full either way, docs/results/bench.md). The Serve deployment keeps
        # the defaults. `engine.extra` (max_num_seqs, max_num_batched_tokens) sets either.
        context = UsageContext.LLM_CLASS if offline else UsageContext.ENGINE_CONTEXT
        self.scheduler = scheduler_mode(scheduler)
        if self.scheduler == "thread":
            from actors.engine_thread import ThreadedEngine

            self.engine = ThreadedEngine(str(model), kwargs, context)
        else:
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(model), **kwargs),
                                                    usage_context=context)
        self.load_s = time.time() - t0
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        self.max_model_len = self.engine.model_config.max_model_len
        self.default_sampling = dict(sampling or {})
        self._check_sampling(self.default_sampling, "sampling")
        self.model_name = model_name or str(model)
        self._vllm = vllm

    async def _one(self, ids: list[int], params: dict) -> list[dict]:
        from vllm.sampling_params import RequestOutputKind

        request_id = uuid.uuid4().hex
        final = None
        # FINAL_ONLY: one output holding all n completions (streamed outputs of n>1 arrive child by child)
        sp = self._vllm.SamplingParams(**params, output_kind=RequestOutputKind.FINAL_ONLY)
        try:
            async for out in self.engine.generate(self._vllm.TokensPrompt(prompt_token_ids=ids), sp, request_id):
                final = out
        except asyncio.CancelledError:
            await self.engine.abort(request_id)
            raise
        return completion_dicts(final, len(ids), params.get("logprobs"))

    async def generate(self, prompts, sampling=None) -> list[list[dict]]:  # type: ignore[override]
        token_ids, params, results = self._prepare(prompts, sampling)
        todo = [i for i in range(len(prompts)) if results[i] is None]
        outs = await asyncio.gather(*(self._one(token_ids[i], params[i]) for i in todo), return_exceptions=True)
        for i, out in zip(todo, outs):
            if isinstance(out, BaseException):
                if isinstance(out, asyncio.CancelledError) or self._engine_dead(out):  # type: ignore[arg-type]
                    raise out
                out = self._errors(params[i], len(token_ids[i]), f"engine_error: {out!r}"[:500])
            results[i] = out
        return results

    async def reload_weights(self, path: str) -> dict:  # type: ignore[override]
        """As VLLMGenerator.reload_weights: new weights in place from a checkpoint folder, prefix cache dropped.
        Callers pause their own requests first (the RL loop samples, then updates, then reloads)."""
        t0 = time.time()
        await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        await self.engine.collective_rpc("refresh_tied_head")
        await self.engine.reset_prefix_cache()
        return {"reload_s": time.time() - t0}

    async def stream(self, prompt: str, sampling: dict | None = None) -> AsyncIterator[dict]:
        """Yield {"delta": text, "n_tokens": tokens so far, "finish_reason": ...} as tokens arrive (n must be 1)."""
        token_ids, params, results = self._prepare([prompt], sampling)
        if results[0] is not None:
            yield {"delta": "", "n_tokens": 0, "finish_reason": "error", "error": results[0][0]["error"],
                   "n_prompt_tokens": len(token_ids[0])}
            return
        if params[0].get("n", 1) != 1:
            raise ValueError("stream: n must be 1")
        request_id = uuid.uuid4().hex
        sent = 0
        try:
            async for out in self.engine.generate(self._vllm.TokensPrompt(prompt_token_ids=token_ids[0]),
                                                  self._vllm.SamplingParams(**params[0]), request_id):
                c = out.outputs[0]
                yield {"delta": c.text[sent:], "n_tokens": len(c.token_ids), "finish_reason": c.finish_reason or "",
                       "n_prompt_tokens": len(token_ids[0])}
                sent = len(c.text)
        except asyncio.CancelledError:
            await self.engine.abort(request_id)
            raise

    def check_health(self) -> None:
        """Ray Serve calls this on each replica: a dead engine fails it, so Serve replaces the replica."""
        if self.engine.errored:
            raise RuntimeError("the vLLM engine of this replica is dead")

    async def __call__(self, batch):  # type: ignore[override]
        """Ray Data entry point (batch_format="pyarrow"), as VLLMGenerator's; concurrent batches share the engine.

        A dead engine ends this process: Ray Data starts its map workers with max_restarts=-1 and
        max_task_retries=-1, so Ray restarts the actor (a fresh engine) and retries the blocks it held, where an
        exception would fail the whole dataset and a dead engine would fail every later block."""
        prompts, sampling = batch_requests(batch)
        try:
            results = await self.generate(prompts, sampling)
        except Exception as e:
            if self._engine_dead(e):
                print(f"[engine] the engine died ({e!r}); ending this actor so that Ray restarts it and retries "
                      f"its blocks", flush=True)
                os._exit(1)
            raise
        return completions_table(batch, results, self.model_name)

"""ThreadedEngine: vLLM's in-process engine (`LLMEngine`, what `vllm.LLM` runs) stepped by one thread of this
process, behind the part of AsyncLLM's interface that AsyncVLLMGenerator uses: `generate` (an async iterator of
RequestOutputs), `abort`, `collective_rpc`, `reset_prefix_cache`, `model_config`.

Why not AsyncLLM itself everywhere: AsyncLLM always runs its scheduler (EngineCore) in a subprocess and sends
every step's outputs over a socket to the caller's process. On a GPU that process boundary overlaps the model's
step with scheduling and output handling; on a small CPU machine the model's OpenMP threads already hold every
core, so the second process and its socket threads only take time from them. Measured on the project's 2-core
machine (SmolLM2, docs/results/bench.md): the generation pool with AsyncLLM ran at 0.83-0.88x raw `vllm.LLM` with
the engine full the whole time; the same engine stepped here, in the actor's own process, runs as fast as
`vllm.LLM.generate` (48 prompts x 4 x 96 tokens outside Ray: 836 and 861 tokens/s against 825 and 825).

Why write this rather than call `vllm.LLM.generate` from the actor: `generate` takes one batch and returns when
its last sequence ends, so the tail of each call idles the engine, and concurrent callers (Ray Data's calls in
flight, the evaluation's search threads, Serve's requests) cannot share its continuous batching. vLLM has no
async front end over the in-process engine, so this is the thin one: requests from any event loop go into a
queue, the engine thread adds them between steps, steps while anything is unfinished, and hands each output to
its caller's loop. Everything about generation (scheduling, sampling, stop strings, prefix caching, logprobs)
stays vLLM's.

One thread owns the engine: it builds it (so the model's OpenMP team is that thread's, the one that steps it) and
every call into it (adding, aborting, collective_rpc, resetting the prefix cache) runs there between steps. An
exception from a step kills the engine: every waiting caller and every later one gets vLLM's EngineDeadError, as
from a dead AsyncLLM, and the actor's owner restarts it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import Any, AsyncIterator, Callable


class ThreadedEngine:
    def __init__(self, model: str, kwargs: dict[str, Any], usage_context: Any):
        """Build `LLMEngine(EngineArgs(model, **kwargs), usage_context)` in the engine thread; returns when it is
        up, or raises what its start raised."""
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._dead: BaseException | None = None
        self._lock = threading.Lock()  # orders a caller's request against the engine's death
        self._start_error: BaseException | None = None
        self._up = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(model, kwargs, usage_context),
                                        name="vllm-engine", daemon=True)
        self._thread.start()
        self._up.wait()
        if self._start_error is not None:
            raise self._start_error
        self.model_config = self._engine.model_config

    # ---- the engine thread ----------------------------------------------------------------------------------

    def _run(self, model: str, kwargs: dict[str, Any], usage_context: Any) -> None:
        try:
            from vllm.engine.arg_utils import EngineArgs
            from vllm.v1.engine.llm_engine import LLMEngine

            # as vllm.LLM: no periodic stats logging unless asked for
            self._engine = LLMEngine.from_engine_args(
                EngineArgs(model=model, **{"disable_log_stats": True, **kwargs}), usage_context=usage_context)
        except BaseException as e:  # noqa: BLE001 - handed to the constructor's caller
            self._start_error = e
            self._up.set()
            return
        self._up.set()
        try:
            self._loop(self._engine)
        except BaseException as e:  # noqa: BLE001 - a failed step (or any fault here): every caller is told
            self._die(e)
            return
        self._die(None)  # shut down: requests still running, and any later call, get EngineDeadError

    def _loop(self, engine: Any) -> None:
        while True:
            try:
                # wait for work when idle; between steps take whatever arrived without waiting
                item = self._inbox.get() if not engine.has_unfinished_requests() else self._inbox.get_nowait()
                while True:
                    if item is None:
                        return
                    self._handle(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if engine.has_unfinished_requests():
                for out in engine.step():
                    self._deliver(out)

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "add":
            _, request_id, prompt, params, loop, q = item
            if request_id in self._streams:  # outputs are routed by id: a second request under it would take them
                self._call_soon(loop, q, ValueError(f"request id {request_id!r} is already running"))
                return
            try:
                self._engine.add_request(request_id, prompt, params)
            except Exception as e:  # noqa: BLE001 - a bad request fails its own caller only
                # vLLM registers a request (each of n children) before the engine core takes it: drop any part
                # registered, or it would count as unfinished forever
                self._engine.abort_request([request_id])
                self._call_soon(loop, q, e)
                return
            except BaseException as e:
                self._call_soon(loop, q, e)
                raise
            self._streams[request_id] = (loop, q)
        elif kind == "abort":
            if self._streams.pop(item[1], None) is not None:
                self._engine.abort_request([item[1]])
        else:  # "call": fn(engine) between steps, its result to a concurrent future
            _, fn, fut = item
            if not fut.set_running_or_notify_cancel():
                return  # its caller was cancelled before it ran: run nothing
            try:
                fut.set_result(fn(self._engine))
            except BaseException as e:  # noqa: BLE001 - the caller gets it; a fault beyond an error kills the engine
                fut.set_exception(e)
                if not isinstance(e, Exception):
                    raise

    def _deliver(self, out: Any) -> None:
        """A step's output to its caller (the last one also ends the request's stream)."""
        target = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
        if target is not None:
            self._call_soon(*target, out)

    @staticmethod
    def _call_soon(loop: asyncio.AbstractEventLoop, q: asyncio.Queue, item: Any) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            pass

    def _die(self, cause: BaseException | None) -> None:
        """Fail every waiting caller and every later one (cause None: shut down)."""
        from vllm.v1.engine.exceptions import EngineDeadError

        err = EngineDeadError("the in-process engine was shut down" if cause is None else
                              f"the in-process engine failed in a step: {cause!r}")
        err.__cause__ = cause
        cause = cause or err
        with self._lock:  # no caller can queue a request after the drain below: _send sees _dead first
            self._dead = cause
            for loop, q in self._streams.values():
                self._call_soon(loop, q, err)
            self._streams.clear()
            while True:  # calls queued behind the failed step
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    return
                if item is not None and item[0] == "add":
                    self._call_soon(item[4], item[5], err)
                elif item is not None and item[0] == "call" and item[2].set_running_or_notify_cancel():
                    item[2].set_exception(err)

    # ---- any thread / event loop ----------------------------------------------------------------------------

    def _send(self, item: tuple) -> None:
        with self._lock:
            if self._dead is not None:
                from vllm.v1.engine.exceptions import EngineDeadError

                raise EngineDeadError(f"the in-process engine failed earlier: {self._dead!r}")
            self._inbox.put(item)

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Any]:
        """The request's RequestOutputs as the engine makes them (one, at the end, with RequestOutputKind.FINAL_ONLY);
        leaving the loop early (a cancelled caller, a closed stream) aborts the request."""
        q: asyncio.Queue = asyncio.Queue()
        self._send(("add", request_id, prompt, params, asyncio.get_running_loop(), q))
        finished = False
        try:
            while not finished:
                out = await q.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        if self._dead is None:  # a dead engine holds no request
            self._inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """fn(the LLMEngine) in the engine thread, between steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("call", fn, fut))
        return await asyncio.wrap_future(fut)

    async def collective_rpc(self, method: str, kwargs: dict | None = None) -> list:
        return await self.call(lambda engine: engine.collective_rpc(method, kwargs=kwargs))

    async def reset_prefix_cache(self) -> bool:
        return await self.call(lambda engine: engine.reset_prefix_cache())

    @property
    def errored(self) -> bool:
        """Whether the engine is dead (as AsyncLLM.errored)."""
        return self._dead is not None

    def shutdown(self) -> None:
        """Stop the engine thread after the step it is in; requests still running and later calls get
        EngineDeadError."""
        self._inbox.put(None)
        self._thread.join(timeout=30)

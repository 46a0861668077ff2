"""Merging the calls of concurrent searches (pure Python, threads): what lets `pipelines.evaluate` keep many
searches in flight against one engine.

- CallBatcher: the search threads of one engine call `call(kind, items)`; one call per kind carries every pending
  request. `_BatchedEngine` puts VLLMGenerator's `generate(prompts, sampling)` on top of it; `_DirectEngine` sends
  each search's generate call straight to an engine that takes concurrent calls (the async engine), leaving the
  batcher the scorer calls.
- SharedSamples / SharedScores: per problem, one pool of full samples for every strategy and budget, and one score
  per distinct (prompt, steps).

Why a batcher and threads rather than Ray Data or concurrent calls into the actor, and what sharing samples means
for the records: `pipelines.evaluate`'s docstring.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable


@dataclass
class _Request:
    kind: str
    items: list
    t0: float
    result: list | None = None
    error: BaseException | None = None
    done: bool = False


class CallBatcher:
    """Merges the calls of concurrent search threads into one call per kind ("generate", "prm", ...).

    A thread registers with `member()` for the length of its search and calls `call(kind, items)`, which blocks.
    A flush happens when every registered thread is blocked here (nothing more can arrive) or `max_wait_s` after
    the oldest pending request; the thread that sees it runs one call per kind (kinds in parallel) with every
    pending item and hands each caller its slice. An exception in a call is raised in each of its callers.
    """

    def __init__(self, fns: dict[str, Callable[[list], list]], max_wait_s: float = 0.05):
        self.fns, self.max_wait_s = fns, max_wait_s
        self._cv = threading.Condition()
        self._pending: list[_Request] = []
        self._active = self._blocked = 0
        self._flushing = False
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(fns)), thread_name_prefix="batcher")
        self.calls: dict[str, int] = {k: 0 for k in fns}
        self.items: dict[str, int] = {k: 0 for k in fns}
        self.seconds: dict[str, float] = {k: 0.0 for k in fns}  # wall time inside each kind's calls

    @contextmanager
    def member(self):
        with self._cv:
            self._active += 1
        try:
            yield self
        finally:
            with self._cv:
                self._active -= 1
                self._cv.notify_all()  # the others may now all be waiting

    @contextmanager
    def waiting(self):
        """Count this member as blocked while it waits for another member's call (e.g. on a shared pool)."""
        with self._cv:
            self._blocked += 1
            self._cv.notify_all()
        try:
            yield
        finally:
            with self._cv:
                self._blocked -= 1

    def call(self, kind: str, items: list) -> list:
        if kind not in self.fns:
            raise KeyError(f"no {kind!r} function in this batcher (has {sorted(self.fns)})")
        req = _Request(kind, list(items), time.monotonic())
        with self._cv:
            self._pending.append(req)
            self._blocked += 1
            self._cv.notify_all()
            try:
                while not req.done:
                    due = self._pending and (self._blocked >= self._active or
                                             time.monotonic() - self._pending[0].t0 >= self.max_wait_s)
                    if due and not self._flushing:
                        batch, self._pending, self._flushing = self._pending, [], True
                        self._cv.release()
                        try:
                            self._run(batch)
                        finally:
                            self._cv.acquire()
                            self._flushing = False
                            self._cv.notify_all()
                    else:
                        self._cv.wait(timeout=self.max_wait_s or None)
            finally:
                self._blocked -= 1
        if req.error is not None:
            raise req.error
        return req.result  # type: ignore[return-value]

    def _run(self, batch: list[_Request]) -> None:
        by_kind: dict[str, list[_Request]] = {}
        for r in batch:
            by_kind.setdefault(r.kind, []).append(r)

        def run_kind(kind: str, reqs: list[_Request]) -> None:
            flat = [x for r in reqs for x in r.items]
            t0 = time.monotonic()
            try:
                out = self.fns[kind](flat)
                if len(out) != len(flat):
                    raise RuntimeError(f"{kind}: {len(out)} results for {len(flat)} items")
                i = 0
                for r in reqs:
                    r.result, i = list(out[i: i + len(r.items)]), i + len(r.items)
            except BaseException as e:  # noqa: BLE001 - handed to every caller of this call
                for r in reqs:
                    r.error = e
            self.calls[kind] += 1
            self.items[kind] += len(flat)
            self.seconds[kind] += time.monotonic() - t0

        futures = [self._pool.submit(run_kind, k, rs) for k, rs in by_kind.items()]
        for f in futures:
            f.result()
        with self._cv:
            for r in batch:
                r.done = True

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class _BatchedEngine:
    """VLLMGenerator's local interface (`generate(prompts, sampling)`) on top of a CallBatcher."""

    def __init__(self, batcher: CallBatcher):
        self.batcher = batcher

    def generate(self, prompts: list[str], sampling: dict | list[dict]) -> list[list[dict]]:
        per = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        return self.batcher.call("generate", list(zip(prompts, per)))


class _DirectEngine:
    """VLLMGenerator's local interface straight onto an engine that takes concurrent calls (an AsyncVLLMGenerator
    actor: its continuous batching merges the searches' requests as they arrive, with no flush to wait for and no
    call's tail holding the others back). The caller counts as blocked in the batcher while it waits, so the
    batcher's scorer calls do not wait for it."""

    def __init__(self, fn: Callable[[list, list], list], batcher: CallBatcher):
        self.fn, self.batcher = fn, batcher

    def generate(self, prompts: list[str], sampling: dict | list[dict]) -> list[list[dict]]:
        per = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        with self.batcher.waiting():
            return self.fn(list(prompts), per)


class SharedSamples:
    """One pool of full-solution samples of a problem's prompt, shared by every strategy and budget (see
    `pipelines.evaluate`'s docstring). The first search that needs samples generates `size` of them (the largest
    budget), holding the pool's lock; the others wait on the lock inside `waiting()` (the batcher counts them as
    blocked, so they do not delay its flush) and then take theirs from the pool."""

    def __init__(self, prompt: str, size: int = 0):
        self.prompt, self.size = prompt, size
        self.pools: dict[int, list] = {}
        self._lock = threading.Lock()

    def wrap(self, generate, waiting=nullcontext):
        def shared(prefixes, n, stop_at_step, max_tokens, greedy=False):
            if stop_at_step or greedy or list(prefixes) != [self.prompt]:
                return generate(prefixes, n, stop_at_step, max_tokens, greedy=greedy)
            with waiting():
                self._lock.acquire()
            try:
                pool = self.pools.setdefault(max_tokens, [])
                if len(pool) < n:
                    pool.extend(generate(prefixes, max(n, self.size) - len(pool), False, max_tokens)[0])
                return [list(pool[:n])]
            finally:
                self._lock.release()
        return shared


class SharedScores:
    """Scores of identical (prompt, steps) computed once per problem and scorer (the scorers are deterministic)."""

    def __init__(self):
        self.cache: dict[tuple, list[float]] = {}

    def wrap(self, score):
        def cached(prompts, step_lists):
            keys = [(p, tuple(s)) for p, s in zip(prompts, step_lists)]
            todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
            if todo:
                out = score([k[0] for k in todo], [list(k[1]) for k in todo])
                self.cache.update(zip(todo, out))
            return [self.cache[k] for k in keys]
        return cached


"""Math equivalence (`math_equal`) is math-verify (fractions, radicals, intervals, sets, matrices, units, \\text
wrappers, percent, numeric rounding), run in a persistent worker process (`_MathWorker`) under a hard time limit:
a SIGALRM inside the worker interrupts slow Python code and the worker answers "timeout"; C code that ignores
signals (a huge integer power inside sympy) is killed by the parent after a grace period and the worker restarted.
Why a process and not math-verify's own timeout: its signal.alarm works only in the main thread (Ray runs tasks
in worker threads too) and cannot interrupt C code, so it is neither safe nor hard. The cost is one pipe round
trip per check (~0.1 ms) next to the check itself (~1-10 ms), and one worker (~150 MB, sympy) per calling thread.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from pipelines.verify.latex import _UNESCAPED_DOLLAR_RE

MATH_OPTIONS = ("match_types", "boxed_match_priority", "float_rounding", "numeric_precision", "strict",
                "allow_set_relation_comp")


# Past timeout_s the worker's own alarm should have answered; the parent kills it only after this grace.
HARD_KILL_GRACE_S = 1.0
WORKER_START_TIMEOUT_S = 120.0


def math_equal(pred: str, gold: str, timeout_s: float = 5.0, **math_verify_options: Any) -> bool | None:
    """math-verify's verify(parse(gold), parse(pred)) under a hard time limit; None when it timed out.

    Options: match_types (("latex", "expr") by default; a list selects LatexExtractionConfig /
    ExprExtractionConfig), boxed_match_priority (50 = the library default; the library's tests use 0),
    float_rounding, numeric_precision, strict, allow_set_relation_comp (as in math_verify.verify).
    Raises RuntimeError when the worker fails for another reason (it is restarted for the next call).
    """
    return _math_check(pred, gold, timeout_s, **math_verify_options)["result"]


def _math_check(pred: str, gold: str, timeout_s: float = 5.0, **math_verify_options: Any) -> dict:
    unknown = set(math_verify_options) - set(MATH_OPTIONS)
    if unknown:
        raise TypeError(f"math_equal got unknown option(s) {sorted(unknown)}; known: {MATH_OPTIONS}")
    if not isinstance(pred, str) or not isinstance(gold, str):
        raise TypeError(f"math_equal needs str answers, got {type(pred).__name__} and {type(gold).__name__}")
    return _worker().check(pred, gold, dict(math_verify_options), timeout_s)


def _as_latex(answer: str) -> str:
    # Bare LaTeX is misread by math-verify ("2\sqrt{3}" -> 2), so an answer without delimiters is boxed.
    if _UNESCAPED_DOLLAR_RE.search(answer) or any(mark in answer for mark in ("\\boxed", "\\(", "\\[")):
        return answer  # already delimited ("\\$36" is a dollar sign, not a delimiter)
    return "\\boxed{" + answer + "}"


class _Deadline(BaseException):
    """Raised by the worker's SIGALRM handler; a BaseException so math-verify's `except Exception` lets it pass."""


def _math_worker_main() -> None:  # pragma: no cover - runs in the worker process
    """Worker loop: one JSON request per stdin line -> one JSON answer per line on the original stdout."""
    import functools
    import logging
    import signal

    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # stray prints from sympy must not corrupt the protocol
    logging.disable(logging.WARNING)  # math-verify logs every timeout / unparsable answer
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    @functools.lru_cache(maxsize=4096)  # the same gold is parsed once per problem, not once per sample
    def parsed(text: str, match_types: tuple[str, ...] | None, boxed_priority: int):
        if match_types is None:
            configs = [LatexExtractionConfig(boxed_match_priority=boxed_priority), ExprExtractionConfig()]
        else:
            configs = [LatexExtractionConfig(boxed_match_priority=boxed_priority) if m == "latex"
                       else ExprExtractionConfig() for m in match_types]
        return parse(text, configs, parsing_timeout=None)

    from sympy import Eq, Expr, FiniteSet

    def is_set(parsed_answer) -> bool:  # several different values, as math-verify read them
        return bool(parsed_answer) and isinstance(parsed_answer[0], FiniteSet) and len(parsed_answer[0]) > 1

    def is_single(parsed_answer) -> bool:  # one value ("7", "x + 1", "x = 7"): not a set, interval, tuple, matrix
        if not parsed_answer:
            return False
        value = parsed_answer[0].rhs if isinstance(parsed_answer[0], Eq) else parsed_answer[0]
        return isinstance(value, Expr) and not getattr(value, "is_Matrix", False)

    armed = [False]

    def on_alarm(signum, frame):
        if armed[0]:
            raise _Deadline()

    signal.signal(signal.SIGALRM, on_alarm)
    channel.write('{"ready": true}\n')
    for line in sys.stdin:
        req = json.loads(line)
        opts = req["options"]
        types = opts.get("match_types")
        types = tuple(types) if types is not None else None
        priority = int(opts.get("boxed_match_priority", 50))
        try:
            armed[0] = True
            signal.setitimer(signal.ITIMER_REAL, max(float(req["timeout_s"]), 0.001))
            pred = parsed(req["pred"], types, priority)
            result = verify(
                parsed(req["gold"], types, priority), pred,
                float_rounding=int(opts.get("float_rounding", 6)),
                numeric_precision=int(opts.get("numeric_precision", 15)),
                strict=bool(opts.get("strict", True)),
                allow_set_relation_comp=bool(opts.get("allow_set_relation_comp", False)),
                timeout_seconds=None,
            )
            answer = {"result": bool(result), "extracted": str(pred[-1]) if len(pred) > 1 else None,
                      "pred_set": is_set(pred), "gold_single": is_single(parsed(req["gold"], types, priority))}
        except _Deadline:
            answer = {"result": None, "extracted": None}
        except Exception as e:  # noqa: BLE001 - reported to the caller with its type
            answer = {"error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        channel.write(json.dumps(answer) + "\n")


class _MathWorker:
    """A persistent math-verify process owned by one thread; killed and restarted when a check overruns."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._pid = os.getpid()
        self._buf = b""
        self._ready = False

    def _start(self) -> None:
        repo = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from pipelines.verify.mathverify import _math_worker_main; _math_worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0,
            start_new_session=True,  # a Ctrl-C for the caller is not the worker's; it exits when stdin closes
        )
        os.set_blocking(self._proc.stdout.fileno(), False)
        os.set_blocking(self._proc.stdin.fileno(), False)
        self._buf, self._ready = b"", False
        self._pid = os.getpid()

    def close(self) -> None:
        if self._proc is not None and self._pid == os.getpid():
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                f.close()
        self._proc = None

    def __del__(self) -> None:  # the owning thread ended: its worker process goes with it
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _write(self, data: bytes, deadline: float) -> bool:
        """Send a request; False at the deadline (a stuck worker with a full pipe must not block us)."""
        fd = self._proc.stdin.fileno()
        view = memoryview(data)
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_WRITE)
            while view:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if sel.select(remaining):
                    try:
                        view = view[os.write(fd, view):]
                    except BlockingIOError:
                        continue
        return True

    def _readline(self, deadline: float) -> bytes | None:
        """One line from the worker, or None at the deadline; raises EOFError when the worker died."""
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if sel.select(remaining):
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        raise EOFError("the math-verify worker exited")
                    self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def check(self, pred: str, gold: str, options: dict, timeout_s: float) -> dict:
        """The worker's answer: {"result": bool | None (None: timed out), "extracted": what it read in pred,
        "pred_set": whether it read several different values in pred, "gold_single": one value in gold}."""
        if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
            self._start()  # after a fork the parent's worker belongs to the parent: start our own
        try:
            if not self._ready:  # start-up (imports, ~0.3 s) does not count against the check
                if self._readline(time.monotonic() + WORKER_START_TIMEOUT_S) is None:
                    raise RuntimeError("the math-verify worker did not start")
                self._ready = True
            req = {"pred": pred, "gold": gold, "options": options, "timeout_s": timeout_s}
            deadline = time.monotonic() + timeout_s + HARD_KILL_GRACE_S
            sent = self._write((json.dumps(req) + "\n").encode(), deadline)
            line = self._readline(deadline) if sent else None
        except (EOFError, BrokenPipeError, OSError) as e:
            self.close()
            raise RuntimeError(f"math-verify worker failed: {e}") from e
        if line is None:  # stuck in C code: kill, and start the replacement now so its imports overlap
            self.close()
            self._start()
            return {"result": None, "extracted": None}
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"math-verify raised {answer['error']}")
        return answer


_local = threading.local()  # one worker per thread; dropped (and its process killed) when the thread ends
_workers: weakref.WeakSet[_MathWorker] = weakref.WeakSet()
_workers_lock = threading.Lock()


def _worker() -> _MathWorker:
    worker = getattr(_local, "worker", None)
    if worker is None:
        worker = _local.worker = _MathWorker()
        with _workers_lock:
            _workers.add(worker)
    return worker


@atexit.register
def _close_workers() -> None:
    with _workers_lock:
        for worker in list(_workers):
            worker.close()

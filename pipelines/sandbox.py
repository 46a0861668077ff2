"""Run an untrusted candidate program against its tests in a separate, jailed process, with limits.

`run_code(program, tests, entry_point=None, timeout_s=10.0, memory_mb=512) -> Verdict` is the only entry point.
`tests` is either Python statements (MBPP-style asserts), run after the program with its names in scope, or,
when `entry_point` is given, HumanEval-style code that defines `check(candidate)`, called as
`check(<the program's entry_point>)`.

A program passes only when the harness saw the program load, the tests run to the end and at least one of the
tests' own `assert` statements execute, and then reported that through its private channel. Verdict reasons:

    passed          every test ran and passed (detail: how many assert statements ran)
    failed_test     an assert failed (detail: the failing line of the tests)
    error:<Type>    the program or the tests raised <Type> (SyntaxError, NameError, ...; detail: message)
    timeout         wall clock over timeout_s (+0.5 s set-up allowance), or the CPU-time limit
    memory          MemoryError: the address-space limit (memory_mb) was hit
    process_limit   fork/thread creation refused by the process limit (a fork bomb)
    early_exit      the process ended before the tests finished: sys.exit / SystemExit / os._exit
    no_tests_ran    empty tests, no check() for an entry_point, or no assert statement executed
    killed          ended by a signal other than the limits above (detail: the signal)
    sandbox_error   the jail itself could not be set up (an infrastructure problem, not the program's fault)

How it is built (Linux). The parent writes the job to a 0600 file in a fresh 0700 temporary directory and starts
the base interpreter as `python -I -S` on the harness (`_sandbox_main`, its source sent on stdin) with
`start_new_session=True` (own session and process group), a scrubbed environment (PATH, LANG, HOME, TMPDIR only)
and no inherited descriptors. `-I` ignores PYTHON* variables, the user site and the current directory; `-S` means
no site-packages: candidates get the standard library only (and no `exit()`/`quit()` helpers). The harness is
trusted code; it deletes the job file, sets PR_SET_PDEATHSIG (if the caller dies, the run dies) and jails itself
before any candidate code runs:

1. unshare(2) new mount, network, PID, IPC and UTS namespaces (plus a user namespace when not running as root):
   no network at all (only a down loopback), no view of other processes, no shared IPC.
2. Mount propagation is made private, a size-capped tmpfs (disk_mb, 4096 inodes) becomes the new root; /usr,
   /lib*, /bin, /sbin and the Python installation are bind-mounted read-only, /dev/null, /dev/zero and
   /dev/urandom are bound in; chroot(2) into it, cwd /work (fresh, empty, owned by the sandbox user). Nothing else
   of the host file system is visible: no /etc, /proc, /home, /root, /tmp of the host, no project files.
3. The first fork becomes PID 1 of the new PID namespace: a trusted reaper that forks the candidate's runner,
   waits for it and reports how it ended (exit status or signal, CPU seconds). When the reaper exits, the kernel
   kills every process left in the namespace (fork bombs, `setsid` escapes, daemons); it carries
   PR_SET_PDEATHSIG=SIGKILL, so the parent's wall-clock `killpg` of the harness takes everything down. (The
   candidate is not PID 1 itself, which would ignore every signal it has no handler for.)
4. rlimits: RLIMIT_AS = memory_mb, RLIMIT_CPU = ceil(timeout_s) (+1 s hard), RLIMIT_FSIZE = disk_mb,
   RLIMIT_NOFILE = 256, RLIMIT_CORE = 0, RLIMIT_NPROC = max_processes.
5. As root it drops to a fresh random uid/gid (see `_random_uid`; the candidate's process gets a second one)
   with no supplementary groups, which makes RLIMIT_NPROC count only this run's processes (root is exempt from RLIMIT_NPROC; a random uid is not),
   forbids signalling any other process on the host and denies host files that are not world-readable;
   PR_SET_NO_NEW_PRIVS stops set-uid binaries from regaining privileges.
6. The candidate's stdin/stdout/stderr are /dev/null; printed text never reaches the parent. The harness reports
   through a duplicate of its stdout pipe, one JSON line tagged with a per-run random nonce that the parent
   checks; a process that ends without that line (os._exit, a signal) fails.
Where a step is not allowed (no root and no user namespaces, a container without CAP_SYS_ADMIN) the harness skips
it and says so; `sandbox_mechanisms()` lists what this machine applies. Without a PID namespace, stragglers are
killed by process group and (as root) by a kill(-1) issued as the sandbox uid.

Two processes. The runner forks the candidate's process, which drops to a second fresh uid and execs a fresh
interpreter (`_candidate_main`): it holds no copy of the tests, the nonce or the report descriptor, and as
another uid it can neither signal nor trace the tests' process (which is also made non-dumpable). The program
runs there; the tests run in the runner and reach the program's top-level names through a pipe, one JSON request
and reply per call (`_codec`):
  - plain data crosses by value and is rebuilt from builtins on the tests' side (None, bool, int, float, complex,
    str, bytes, list, tuple, dict, set, frozenset, range, Fraction, Decimal; a subclass as its plain type, a
    Counter as its dict; an iterator as its items). So `assert f(x) == y` compares two genuine builtin values:
    an object whose __eq__ always says True, an int subclass that equals anything, a patched Counter.__eq__
    never reach the comparison. Anything else (a class, an instance, a function) is a handle (`Remote`) whose
    equality is identity and which forwards only calls, attributes, len, iteration, indexing, `in`, bool, str;
    arithmetic on it fails. An argument list/dict/set the program changes in place is written back.
  - the tests get their own import of a module the program imported, never the program's (patched) module
    object, and the program's names that would shadow a builtin or a standard-library module (abs, len,
    math, ...) are not given to the tests (except the entry point);
  - runs the tests after loading the program, so the tests' `check` and helpers win; counts the tests' own
    executed `assert` statements (AST instrumentation), so tests that ran nothing are not a pass; treats
    SystemExit anywhere as early_exit, a program process that ends mid-call by its exit status or signal (a
    CPU-limit signal is a timeout); ignores printed output, exit statuses and files.
The cost: ~15 ms to start the second interpreter and ~30 us per call (all 164 HumanEval reference solutions
pass). A limit: the tests cannot pass a function (a lambda, a callback) to the program; that is an error.

Threat model, honestly. This is process isolation, not a VM. It stops accidents and the common reward hacks
(objects that equal anything, patched builtins or modules, frame walking to read the tests or forge the report,
early exit, fake success output, exceptions, swallowed tests, resource exhaustion, reading host files, network,
signalling or tracing other processes, writing outside the sandbox). Without root (a user namespace maps one
uid) both processes share a uid, so the program could kill the tests' process: that ends in `killed`, never a
pass. HumanEval-style tests that call helpers from the prompt run the program's version of them, as the data set
intends. Kernel exploits are out of scope. The aggregate memory bound is max_processes * memory_mb per uid
(cgroups would make it exact; they need a delegated cgroup, which this code does not assume). For adversarial
use at scale, run this inside a VM-level sandbox (gVisor, Firecracker) as well.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from functools import lru_cache

from pipelines.verify import Verdict

# Wall-clock allowance for starting the interpreter and building the jail (measured ~0.1 s on 2 busy cores).
SETUP_ALLOWANCE_S = 0.5
# Statuses the harness reports besides "passed" and "error" (which carries the exception type).
_REPORTED = ("failed_test", "memory", "process_limit", "early_exit", "no_tests_ran", "timeout", "killed")
# Cap on what the parent reads back from the child's pipes; the report itself is a few hundred bytes.
MAX_OUTPUT_BYTES = 1 << 20


def run_code(
    program: str,
    tests: str,
    entry_point: str | None = None,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    *,
    max_processes: int = 16,
    disk_mb: int = 64,
) -> Verdict:
    """Run `program`, then `tests` (and `check(entry_point)` when given) in the sandbox; see the module docstring."""
    if not isinstance(program, str) or not isinstance(tests, str):
        raise TypeError(f"program and tests must be str, got {type(program).__name__} and {type(tests).__name__}")
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s} and {memory_mb}")
    cpu_s = max(1, math.ceil(timeout_s))
    start = time.monotonic()
    msgs, err, timed_out = _execute(program, tests, entry_point, timeout_s, cpu_s, memory_mb, max_processes, disk_mb)
    return _verdict(msgs, err, timed_out, time.monotonic() - start, timeout_s, cpu_s)


@lru_cache(maxsize=1)
def sandbox_mechanisms() -> tuple[str, ...]:
    """What the sandbox applies on this machine (namespaces, chroot, uid drop, rlimits), from a trivial run."""
    msgs, _, _ = _execute("", "assert True", None, 30.0, 5, 512, 16, 16)
    return next((tuple(m.get("mechanisms", ())) for m in msgs if m.get("kind") == "setup"), ())


def _execute(program: str, tests: str, entry_point: str | None, timeout_s: float, cpu_s: int, memory_mb: int,
             max_processes: int, disk_mb: int) -> tuple[list[dict], bytes, bool]:
    """Start the harness on a job and collect its messages (those carrying this run's nonce)."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="stepray-sbx-", ignore_cleanup_errors=True) as tmp:
        root = os.path.join(tmp, "root")  # the jail's mount point (an empty host directory)
        os.mkdir(root, 0o700)
        uid = _random_uid()
        job = {
            "nonce": nonce, "program": program, "tests": tests, "entry_point": entry_point, "root": root,
            "uid": uid, "candidate_uid": _random_uid(exclude=uid), "candidate_source": _candidate_source(),
            "cpu_s": cpu_s, "memory_bytes": int(memory_mb) << 20,
            "disk_bytes": int(disk_mb) << 20, "max_processes": int(max_processes), "binds": _python_binds(),
            "parent_pid": os.getpid(),
        }
        job_path = os.path.join(tmp, "job.json")
        fd = os.open(job_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(job, f)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/work", "TMPDIR": "/tmp"}
        started = time.monotonic()
        proc = subprocess.Popen(
            [_interpreter(), "-I", "-S", "-c", _BOOTSTRAP, job_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=tmp, env=env, start_new_session=True, close_fds=True,
        )
        try:  # ~12 kB: fits the pipe buffer, so this cannot block
            proc.stdin.write(_harness_source())
        except BrokenPipeError:
            pass
        proc.stdin.close()
        out, err, timed_out = _collect(proc, started + timeout_s + SETUP_ALLOWANCE_S)
    return _messages(out, nonce), err, timed_out


def _random_uid(exclude: int | None = None) -> int:
    # A fresh uid per run, from the OS's CSPRNG, in a range no distribution allocates to real users
    # (10,000,000-19,999,999), so two concurrent runs practically never share one and RLIMIT_NPROC counts one run.
    while True:
        uid = 10_000_000 + secrets.randbelow(10_000_000)
        if uid != exclude:
            return uid


@lru_cache(maxsize=1)
def _interpreter() -> str:
    # The base interpreter, not a venv launcher: inside the jail only the base installation is mounted.
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@lru_cache(maxsize=1)
def _python_binds() -> list[str]:
    # The Python installation must be visible at its own path inside the jail (e.g. a pyenv build under /root).
    paths = {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(_interpreter()))}
    system = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
    return sorted(p for p in paths if p != "/" and not any(p == s or p.startswith(s + "/") for s in system))


# The child reads the harness's source on stdin and runs only that (no project imports: it starts in ~10 ms with
# -I -S, and `ps` shows this short line rather than the whole harness).
_BOOTSTRAP = "import sys; exec(compile(sys.stdin.read(), '<stepray-sandbox>', 'exec')); _sandbox_main(sys.argv[1])"


@lru_cache(maxsize=1)
def _harness_source() -> bytes:
    return (inspect.getsource(_codec) + "\n\n" + inspect.getsource(_sandbox_main)).encode()


@lru_cache(maxsize=1)
def _candidate_source() -> str:
    # What the candidate's fresh interpreter runs (python -I -S -c SOURCE REQUEST_FD REPLY_FD).
    return (inspect.getsource(_codec) + "\n\n" + inspect.getsource(_candidate_main)
            + "\nimport sys\n_candidate_main(int(sys.argv[1]), int(sys.argv[2]))\n")


def _collect(proc: subprocess.Popen, deadline: float) -> tuple[bytes, bytes, bool]:
    """Read the child's stdout/stderr (capped) until both close or the deadline; then kill its process group."""
    sel = selectors.DefaultSelector()
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    for f in bufs:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    timed_out = False
    exited_at = None
    while sel.get_map():
        now = time.monotonic()
        if now >= deadline:
            timed_out = True
            break
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > 0.2:
            break  # the harness is gone; only a straggler outside a PID namespace can still hold the pipe
        for key, _ in sel.select(min(deadline - now, 0.05)):
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = bufs[key.fileobj]
            buf += chunk[: max(0, MAX_OUTPUT_BYTES - len(buf))]
    sel.close()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for f in bufs:
        f.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), timed_out


def _messages(out: bytes, nonce: str) -> list[dict]:
    msgs = []
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("nonce") == nonce:
            msgs.append(msg)
    return msgs


def _verdict(msgs: list[dict], err: bytes, timed_out: bool, wall: float, timeout_s: float, cpu_s: int) -> Verdict:
    report = next((m for m in msgs if m.get("kind") == "report"), None)
    exit_ = next((m for m in reversed(msgs) if m.get("kind") == "exit"), None)
    setup_error = next((m for m in msgs if m.get("kind") == "setup_error"), None)
    if report is not None:
        status = str(report.get("status"))
        detail = str(report.get("detail", ""))[:500]
        if status == "passed":
            return Verdict(True, "passed", detail=detail)
        if status == "error":
            name = "".join(c for c in str(report.get("type", "")) if c.isalnum() or c == "_")[:60] or "Exception"
            return Verdict(False, f"error:{name}", detail=detail)
        if status in _REPORTED:
            return Verdict(False, status, detail=detail)
        return Verdict(False, "sandbox_error", detail=f"unknown report status {status[:60]!r}")
    if timed_out:
        return Verdict(False, "timeout", detail=f"wall clock over {timeout_s:g}s (+{SETUP_ALLOWANCE_S}s set-up)")
    if setup_error is not None:
        return Verdict(False, "sandbox_error", detail=str(setup_error.get("detail", ""))[:500])
    if exit_ is None:
        tail = err[-300:].decode("utf-8", "replace").strip()
        return Verdict(False, "killed", detail=f"harness ended without a status after {wall:.2f}s {tail}".strip())
    sig = exit_.get("signal")
    if sig:
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and float(exit_.get("cpu_s", 0)) >= cpu_s - 0.05):
            return Verdict(False, "timeout", detail=f"CPU time limit {cpu_s}s")
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return Verdict(False, "killed", detail=f"signal {name}")
    return Verdict(False, "early_exit", detail=f"exit status {exit_.get('exit_code')} before the tests finished")


def _codec(to_ref, from_ref):  # pragma: no cover - shipped as source to the harness and the candidate
    """(encode, decode) between Python values and JSON for the requests and replies of the two processes.

    Plain data crosses by value and is rebuilt from builtins on the other side: None, bool, int, float, complex,
    str, bytes, bytearray, list, tuple, dict, set, frozenset, range, Fraction, Decimal; a subclass of one of them
    crosses as that plain type (a Counter as the dict it is); an iterator as the list of its items, rebuilt as an
    iterator. Anything else becomes `to_ref(value)`, a JSON object with "$": "ref" that `from_ref` turns back.
    Shipped as source with the harness and with the candidate: standard library only."""
    import decimal
    import fractions
    import itertools

    max_depth, max_items, inf = 100, 1_000_000, float("inf")

    def encode(v, depth=0):
        if depth > max_depth:
            raise ValueError("a value nested over 100 levels deep")
        t, d = type(v), depth + 1
        if v is None or t is bool or t is str:
            return v
        if t is int:
            return v if -(1 << 3000) < v < (1 << 3000) else {"$": "i", "v": hex(v)}
        if t is float:
            return v if v == v and v not in (inf, -inf) else {"$": "f", "v": repr(v)}
        if t is list:
            return [encode(x, d) for x in v]
        if t is tuple:
            return {"$": "t", "v": [encode(x, d) for x in v]}
        if t is dict:
            return {"$": "d", "v": [[encode(k, d), encode(x, d)] for k, x in v.items()]}
        if t is set or t is frozenset:
            return {"$": "s" if t is set else "fs", "v": [encode(x, d) for x in v]}
        if t is complex:
            return {"$": "c", "v": [encode(v.real, d), encode(v.imag, d)]}
        if t is bytes or t is bytearray:
            return {"$": "b" if t is bytes else "ba", "v": v.decode("latin-1")}
        if t is range:
            return {"$": "r", "v": [v.start, v.stop, v.step]}
        if t is fractions.Fraction:
            return {"$": "q", "v": [encode(v.numerator, d), encode(v.denominator, d)]}
        if t is decimal.Decimal:
            return {"$": "m", "v": str(v)}
        for base in (bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, frozenset, set):
            if isinstance(v, base):
                return encode(base(v), depth)
        if hasattr(type(v), "__next__") and hasattr(type(v), "__iter__"):
            items = list(itertools.islice(v, max_items + 1))
            if len(items) > max_items:
                raise ValueError("an iterator of over a million items")
            return {"$": "it", "v": [encode(x, d) for x in items]}
        return to_ref(v)

    def decode(v):
        if type(v) is list:
            return [decode(x) for x in v]
        if type(v) is not dict:
            return v  # None, bool, int, float, str as JSON gives them
        tag, body = v.get("$"), v.get("v")
        if tag == "t":
            return tuple(decode(x) for x in body)
        if tag == "d":
            return {decode(k): decode(x) for k, x in body}
        if tag == "s":
            return {decode(x) for x in body}
        if tag == "fs":
            return frozenset(decode(x) for x in body)
        if tag == "it":
            return iter([decode(x) for x in body])
        if tag == "i":
            return int(body, 16)
        if tag == "f":
            return float(body)
        if tag == "c":
            return complex(float(decode(body[0])), float(decode(body[1])))
        if tag == "b":
            return body.encode("latin-1")
        if tag == "ba":
            return bytearray(body.encode("latin-1"))
        if tag == "r":
            return range(int(body[0]), int(body[1]), int(body[2]))
        if tag == "q":
            return fractions.Fraction(int(decode(body[0])), int(decode(body[1])))
        if tag == "m":
            return decimal.Decimal(str(body))
        if tag in ("ref", "mod"):
            return from_ref(v)
        raise ValueError(f"unknown value tag {str(tag)[:20]!r}")

    return encode, decode


def _candidate_main(request_fd: int, reply_fd: int) -> None:  # pragma: no cover - the candidate's process
    """The candidate's side: load the program, then answer the tests' requests until they close the pipe.

    Runs in its own interpreter under its own uid. Nothing here is trusted by the tests: whatever this process
    does, what reaches them is JSON that they decode into plain values and handles (`Remote`)."""
    import json
    import os

    requests = os.fdopen(request_fd, "rb")
    main_pid = os.getpid()
    write, dumps, loads, _exit = os.write, json.dumps, json.loads, os._exit
    out_of_memory = b'{"raise": "MemoryError", "detail": "MemoryError"}\n'
    objects = {}

    def send(data):
        if os.getpid() != main_pid:  # a fork of the program must not answer for it
            _exit(0)
        while data:
            data = data[write(reply_fd, data):]

    def to_ref(value):
        objects[len(objects) + 1] = value
        return {"$": "ref", "id": len(objects), "type": type(value).__name__[:60], "callable": callable(value)}

    encode, decode = _codec(to_ref, lambda tag: objects[tag["id"]])
    namespace = {"__name__": "candidate"}
    import builtins

    saved_builtins = dict(builtins.__dict__)

    def restore_builtins():  # the program may patch abs/len/...; this loop and the codec must not see that
        for name in [k for k in builtins.__dict__ if k not in saved_builtins]:
            del builtins.__dict__[name]
        builtins.__dict__.update(saved_builtins)

    for line in requests:
        restore_builtins()
        args = ()
        try:
            req = loads(line)
            op = req["op"]
            if op == "load":
                exec(compile(req["program"], "<program>", "exec"), namespace)
                restore_builtins()
                names = []
                for name, v in list(namespace.items()):
                    if name.startswith("__"):
                        continue
                    if type(v) is type(os):
                        names.append([name, {"$": "mod", "name": v.__name__}])
                        continue
                    try:  # a global iterator stays one (a reference), it is not read out here
                        names.append([name, to_ref(v) if hasattr(type(v), "__next__") else encode(v)])
                    except ValueError:
                        names.append([name, to_ref(v)])
                reply = {"value": {"$": "d", "v": names}}
            else:
                target = objects[req["id"]]
                if op == "call":
                    args = decode(req["args"])
                    result = target(*args, **{k: decode(x) for k, x in req["kwargs"]})
                    restore_builtins()
                    after = [[i, encode(a)] for i, a in enumerate(args) if type(a) in (list, dict, set, bytearray)]
                    reply = {"value": encode(result), "after": after}
                elif op == "getattr":
                    reply = {"value": encode(getattr(target, req["name"]))}
                else:  # dunder
                    name, extra = req["name"], decode(req["args"])
                    if name == "len":
                        result = len(target)
                    elif name == "iter":
                        result = iter(list(target))
                    elif name == "getitem":
                        result = target[extra[0]]
                    elif name == "contains":
                        result = extra[0] in target
                    elif name == "bool":
                        result = bool(target)
                    else:
                        result = str(target)
                    reply = {"value": encode(result)}
            restore_builtins()  # a property or __len__ of the program ran too
            data = (dumps(reply) + "\n").encode()
        except SystemExit as e:
            data = (dumps({"exit": f"{e}"[:300]}) + "\n").encode()
        except MemoryError:
            namespace.clear()
            objects.clear()
            args = None
            data = out_of_memory
        except BaseException as e:
            restore_builtins()
            try:
                detail = str(e)[:300]
            except BaseException:
                detail = "<unprintable>"
            err = getattr(e, "errno", None)
            data = (dumps({"raise": type(e).__name__[:60], "detail": detail,
                           "errno": err if type(err) is int else None}) + "\n").encode()
        send(data)
    _exit(0)


def _sandbox_main(payload_path: str) -> None:  # pragma: no cover - runs in the sandboxed child
    """The harness. Shipped to the child as source: it may use only the standard library and its own locals.

    Runs as root (or the invoking user): builds the jail, forks the reaper (PID 1 of the new PID namespace),
    which forks the runner; the runner enters the jail, drops privileges and runs the candidate and the tests.
    Every message goes to the parent as a JSON line on the original stdout, tagged with the nonce.
    """
    import ast
    import builtins
    import ctypes
    import errno
    import json
    import os
    import resource
    import signal
    import sys

    with open(payload_path, encoding="utf-8") as f:
        job = json.load(f)
    os.unlink(payload_path)  # the nonce and the tests live only in this process from here on
    nonce = job["nonce"]

    def emit(fd, kind, **fields):
        os.write(fd, (json.dumps({"nonce": nonce, "kind": kind, **fields}) + "\n").encode())

    applied = []
    root = job["root"]
    uid = job["uid"]
    is_root = os.geteuid() == 0
    jail = False
    pid_ns = False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # if the caller dies, so does the whole run
        if os.getppid() != job["parent_pid"]:
            os._exit(4)  # it died before the line above

        def check(rc, what):
            if rc != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"{what}: {os.strerror(e)}")

        # 1. namespaces (a user namespace first when not root, which grants the rights for the rest inside it)
        CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
        CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
        flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET
        outer_uid, outer_gid = os.getuid(), os.getgid()
        namespaces = libc.unshare(flags | (0 if is_root else CLONE_NEWUSER)) == 0
        if namespaces:
            if not is_root:
                applied.append("user_ns")
                for name, text in (("setgroups", "deny"), ("uid_map", f"0 {outer_uid} 1"),
                                   ("gid_map", f"0 {outer_gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
            applied += ["mount_ns", "net_ns", "pid_ns", "ipc_ns", "uts_ns"]
            pid_ns = True
        # 2. the jail: private propagation first, or our mounts would appear on the host
        if namespaces:
            MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
            MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
            check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
            opts = f"size={job['disk_bytes']},nr_inodes=4096,mode=0755".encode()
            check(libc.mount(b"tmpfs", root.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts), "tmpfs root")
            applied.append("tmpfs_root")

            def bind(src, read_only):
                dst = root + src
                if os.path.islink(src):
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    os.symlink(os.readlink(src), dst)
                    return
                if os.path.isdir(src):
                    os.makedirs(dst, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    open(dst, "w").close()
                check(libc.mount(src.encode(), dst.encode(), None, MS_BIND | MS_REC, None), f"bind {src}")
                if read_only:  # in a user namespace the remount may be refused; host permissions still apply
                    rc = libc.mount(None, dst.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID, None)
                    if rc != 0 and is_root:
                        check(rc, f"read-only {src}")

            for src in ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"] + list(job["binds"]):
                if os.path.lexists(src) and not os.path.lexists(root + src):
                    bind(src, read_only=True)
            for src in ("/dev/null", "/dev/zero", "/dev/urandom"):
                bind(src, read_only=False)
            os.mkdir(root + "/work", 0o700)
            os.mkdir(root + "/tmp", 0o700)
            if is_root:  # the program's working space: the tests write nothing
                for d in ("/work", "/tmp"):
                    os.chown(root + d, job["candidate_uid"], job["candidate_uid"])
            jail = True
            applied.append("chroot_jail")
        elif is_root:  # no namespaces: at least a private working directory the sandbox user owns
            os.chmod(os.path.dirname(root), 0o711)
            os.chown(root, job["candidate_uid"], job["candidate_uid"])
    except OSError as e:
        emit(1, "setup_error", detail=f"{e} (applied so far: {applied})")
        os._exit(3)

    devnull = os.open("/dev/null", os.O_RDWR)
    if is_root:
        applied += [f"setuid:{uid}", "rlimit_nproc"]
    elif pid_ns:
        applied.append("rlimit_nproc")
    applied += ["rlimit_as", "rlimit_cpu", "rlimit_fsize", "rlimit_nofile", "no_new_privs", "pdeathsig"]
    emit(1, "setup", mechanisms=applied)

    if os.fork():  # the harness: its job is done once the reaper runs; the parent reads the reaper's report
        _, status = os.waitpid(-1, 0)
        os._exit(0)

    # ---- the reaper: PID 1 of the new PID namespace (when namespaces are on); trusted, runs no candidate code.
    # The candidate must not be PID 1 itself: PID 1 ignores every signal it has no handler for, so
    # os.kill(os.getpid(), SIGTERM), SIGXCPU from RLIMIT_CPU or a default SIGALRM would silently not apply.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the parent's killpg of the harness reaches us
    runner = os.fork()
    if runner:
        _, status, usage = os.wait4(runner, 0)
        cpu = usage.ru_utime + usage.ru_stime
        if os.WIFSIGNALED(status):
            emit(1, "exit", signal=os.WTERMSIG(status), cpu_s=cpu)
        else:
            emit(1, "exit", exit_code=os.WEXITSTATUS(status), cpu_s=cpu)
        for sandbox_uid in (uid, job["candidate_uid"]):
            if is_root and not pid_ns and os.fork() == 0:
                # No PID namespace to tear down: kill whatever the run left, as each sandbox uid, whose
                # kill(-1) reaches only processes of that (fresh) uid.
                os.setgid(sandbox_uid)
                os.setuid(sandbox_uid)
                os.kill(-1, signal.SIGKILL)
                os._exit(0)
        os._exit(0)  # as PID 1, this kills every process left in the namespace

    # ---- the runner: jails itself, starts the candidate's own process, then runs the tests against it
    try:
        if jail:
            os.chroot(root)
            os.chdir("/work")
        else:
            os.chdir(root)
        cpu_s = int(job["cpu_s"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["disk_bytes"], job["disk_bytes"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if is_root or pid_ns:
            resource.setrlimit(resource.RLIMIT_NPROC, (job["max_processes"], job["max_processes"]))
    except OSError as e:
        emit(1, "setup_error", detail=f"runner: {e}")
        os._exit(3)

    memory_bytes = job["memory_bytes"]

    def drop_privileges(to_uid):
        if is_root:
            os.setgroups([])
            os.setgid(to_uid)
            os.setuid(to_uid)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    report_fd = os.dup(1)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    to_candidate_r, to_candidate_w = os.pipe()
    from_candidate_r, from_candidate_w = os.pipe()
    candidate_pid = os.fork()
    if candidate_pid == 0:
        # The candidate: its own uid (it can neither signal nor trace the tests), a fresh interpreter (no copy of
        # the tests, the nonce or the report descriptor in its memory), the same jail and limits.
        try:
            for fd in (report_fd, to_candidate_w, from_candidate_r):
                os.close(fd)
            drop_privileges(job["candidate_uid"])
            os.set_inheritable(to_candidate_r, True)
            os.set_inheritable(from_candidate_w, True)
            python = sys.executable
            os.execv(python, [python, "-I", "-S", "-c", job["candidate_source"], str(to_candidate_r),
                              str(from_candidate_w)])
        finally:
            os._exit(5)
    os.close(to_candidate_r)
    os.close(from_candidate_w)
    try:
        drop_privileges(uid)
        PR_SET_DUMPABLE = 4
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no ptrace / process_vm_readv of the tests by a same-uid process
    except OSError as e:
        emit(report_fd, "setup_error", detail=f"runner: {e}")
        os._exit(3)

    # Bind what reporting needs before anything else runs.
    write, dumps, loads, getpid, _exit = os.write, json.dumps, json.loads, os.getpid, os._exit
    main_pid = getpid()
    program, tests, entry_point = job["program"], job["tests"], job["entry_point"]
    del job

    def report(status, **fields):
        if getpid() != main_pid:  # a forked copy of the runner must not speak for it
            _exit(0)
        try:
            line = dumps({"nonce": nonce, "kind": "report", "status": status, **fields}) + "\n"
        except Exception:
            line = dumps({"nonce": nonce, "kind": "report", "status": status}) + "\n"
        write(report_fd, line.encode())
        _exit(0)

    def describe(e):
        try:
            return str(e)[:300]
        except BaseException:
            return "<unprintable>"

    # ---- talking to the candidate: one JSON line per request and per reply (see _candidate_main)
    class Gone(BaseException):
        """The candidate's process ended (exit, signal, CPU limit) while the tests waited on it."""

    class Exited(BaseException):
        """The candidate raised SystemExit."""

    class Remote:
        """An object that lives in the candidate's process (a function, a class, an instance).

        Equality is identity of the remote object, whatever the object's own __eq__ says: only plain data that
        the candidate returns (decoded here into genuine builtins) can equal what the tests expect."""
        __slots__ = ("_id", "_type")

        def __init__(self, ref_id, type_name):
            self._id, self._type = ref_id, type_name

        def __call__(self, *args, **kwargs):
            return rpc({"op": "call", "id": self._id, "args": encode(list(args)),
                        "kwargs": [[k, encode(v)] for k, v in kwargs.items()]}, args)

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return rpc({"op": "getattr", "id": self._id, "name": name})

        def __eq__(self, other):
            return type(other) is Remote and other._id == self._id

        def __ne__(self, other):
            return not self.__eq__(other)

        def __hash__(self):
            return hash(("remote", self._id))

        def __repr__(self):
            return f"<{self._type} of the program>"

        def _op(self, name, *args):
            return rpc({"op": "dunder", "id": self._id, "name": name, "args": encode(list(args))})

        def __len__(self):
            return self._op("len")

        def __iter__(self):
            return self._op("iter")

        def __getitem__(self, key):
            return self._op("getitem", key)

        def __contains__(self, item):
            return self._op("contains", item)

        def __bool__(self):
            return self._op("bool")

        def __str__(self):
            return self._op("str")

    def to_ref(value):
        if type(value) is Remote:
            return {"$": "ref", "id": value._id}
        raise TypeError(f"the tests passed a {type(value).__name__} to the program; only data and the "
                        "program's own objects cross to its process")

    class ProgramModule:
        """A module the program imported: the tests get their own import of it (see below)."""
        __slots__ = ("name",)

        def __init__(self, name):
            self.name = name

    def from_ref(tag):
        if tag.get("$") == "mod":
            return ProgramModule(str(tag.get("name", "")))
        return Remote(tag["id"], str(tag.get("type", "object"))[:60])

    encode, decode = _codec(to_ref, from_ref)
    reader = os.fdopen(from_candidate_r, "rb")
    MAX_REPLY = 64 << 20

    def ended():
        """Why the candidate's process is gone, as the verdict the tests report."""
        try:
            _, status, usage = os.wait4(candidate_pid, 0)
        except ChildProcessError:
            return "early_exit", "the program's process ended"
        cpu = usage.ru_utime + usage.ru_stime
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_s - 0.05):
                return "timeout", f"CPU time limit {cpu_s}s"
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            return "killed", f"signal {name}"
        return "early_exit", f"the program's process exited with status {os.WEXITSTATUS(status)}"

    def rpc(request, call_args=()):
        data = (dumps(request) + "\n").encode()
        try:
            while data:
                data = data[write(to_candidate_w, data):]
        except BrokenPipeError:
            raise Gone() from None
        line = reader.readline(MAX_REPLY)
        if not line:
            raise Gone()
        if not line.endswith(b"\n"):
            raise ValueError("the program's reply is over 64 MB")
        reply = loads(line)
        if not isinstance(reply, dict):
            raise ValueError("malformed reply from the program's process")
        if "raise" in reply:
            name = "".join(c for c in str(reply["raise"]) if c.isalnum() or c == "_")[:60] or "Exception"
            detail = str(reply.get("detail", ""))[:300]
            cls = saved_builtins.get(name)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                cls = type(name, (Exception,), {})
            errno_ = reply.get("errno")
            try:
                if issubclass(cls, OSError) and type(errno_) is int:
                    exc = cls(errno_, detail.split("] ", 1)[-1] if detail.startswith("[Errno") else detail)
                else:
                    exc = cls(detail)
            except Exception:  # a type whose constructor wants more (UnicodeEncodeError): same name, our class
                exc = type(name, (Exception,), {})(detail)
            raise exc
        if "exit" in reply:
            raise Exited(str(reply["exit"])[:300])
        for index, value in reply.get("after", ()):  # a list/dict/set argument the program changed in place
            if type(index) is int and 0 <= index < len(call_args):
                target, new = call_args[index], decode(value)
                if type(target) is type(new) and type(target) in (list, bytearray):
                    target[:] = new
                elif type(target) is type(new) and type(target) in (dict, set):
                    target.clear()
                    target.update(new)
        return decode(reply.get("value"))

    hits = [0]

    def hit():
        hits[0] += 1

    class CountAsserts(ast.NodeTransformer):
        def visit_Assert(self, node):
            call = ast.Expr(ast.Call(ast.Name("__stepray_assert_hit__", ast.Load()), [], []))
            return [ast.copy_location(call, node), node]

    saved_builtins = dict(builtins.__dict__)
    stdlib = set(getattr(sys, "stdlib_module_names", ()))
    namespace = {"__name__": "candidate", "__builtins__": builtins}
    phase = "program"
    test_lines = tests.splitlines()
    try:
        names = rpc({"op": "load", "program": program})
        phase = "tests"
        for name, value in (names.items() if type(names) is dict else ()):
            if type(name) is not str or name.startswith("__"):
                continue
            if type(value) is ProgramModule:
                try:  # the tests get the real module, imported here, never the program's copy
                    namespace[name] = __import__(value.name, fromlist=["_"])
                except Exception:
                    pass
            elif (name in saved_builtins or name in stdlib) and name != entry_point:
                continue  # the program cannot redefine abs, len, math, ... for the tests
            else:
                namespace[name] = value
        tree = ast.parse(tests, "<tests>")
        if not tree.body:
            report("no_tests_ran", detail="the tests are empty")
        tree = ast.fix_missing_locations(CountAsserts().visit(tree))
        namespace["__stepray_assert_hit__"] = hit
        exec(compile(tree, "<tests>", "exec"), namespace)
        if entry_point:
            check_fn = namespace.get("check")
            if type(check_fn) is Remote or not callable(check_fn):
                report("no_tests_ran", detail=f"the tests define no check(candidate) for {entry_point!r}")
            if entry_point not in namespace:
                raise NameError(f"the program defines no {entry_point!r}")
            check_fn(namespace[entry_point])
        if hits[0] == 0:
            report("no_tests_ran", detail="no assert statement of the tests ran")
        report("passed", detail=f"{hits[0]} asserts")
    except Gone:
        status, detail = ended()
        report(status, detail=f"{detail} during {phase}")
    except Exited as e:
        report("early_exit", detail=f"SystemExit({describe(e)}) during {phase}")
    except AssertionError as e:
        tb, line = e.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<tests>":
                line = tb.tb_lineno
            tb = tb.tb_next
        if phase == "tests" and line is not None and 0 < line <= len(test_lines):
            report("failed_test", detail=f"line {line}: {test_lines[line - 1].strip()[:200]}")
        report("failed_test", detail=f"AssertionError during {phase}: {describe(e)}")
    except SystemExit as e:
        report("early_exit", detail=f"SystemExit({describe(e)}) during {phase}")
    except MemoryError:
        report("memory", detail=f"MemoryError during {phase}")
    except BlockingIOError as e:
        if e.errno == errno.EAGAIN:
            report("process_limit", detail=f"{describe(e)} during {phase}")
        report("error", type="BlockingIOError", detail=describe(e))
    except BaseException as e:
        name = "".join(c for c in type(e).__name__ if c.isalnum() or c == "_")[:60] or "Exception"
        report("error", type=name, detail=f"during {phase}: {describe(e)}")

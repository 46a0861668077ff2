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

from pipelines.sandbox_harness import _sandbox_main
from pipelines.sandbox_rpc import _candidate_main, _codec
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

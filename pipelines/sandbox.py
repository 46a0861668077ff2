"""Run an untrusted candidate program against its tests in a separate, jailed process, with limits.

`run_code(program, tests, entry_point=None, timeout_s=10.0, memory_mb=512) -> Verdict` is the only entry point.
`tests` is either Python statements (MBPP-style asserts), run after the program in the same namespace, or,
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
5. As root it drops to a fresh random uid/gid (see `_random_uid`) with no supplementary groups, which makes
   RLIMIT_NPROC count only this run's processes (root is exempt from RLIMIT_NPROC; a random uid is not),
   forbids signalling any other process on the host and denies host files that are not world-readable;
   PR_SET_NO_NEW_PRIVS stops set-uid binaries from regaining privileges.
6. The candidate's stdin/stdout/stderr are /dev/null; printed text never reaches the parent. The harness reports
   through a duplicate of its stdout pipe, one JSON line tagged with a per-run random nonce that the parent
   checks; a process that ends without that line (os._exit, a signal) fails.
Where a step is not allowed (no root and no user namespaces, a container without CAP_SYS_ADMIN) the harness skips
it and says so; `sandbox_mechanisms()` lists what this machine applies. Without a PID namespace, stragglers are
killed by process group and (as root) by a kill(-1) issued as the sandbox uid.

Against the program it tests, the harness also: runs the tests after the program, so a program's own
`check`/helpers are replaced by the tests' definitions; restores the `builtins` module and `__builtins__` after
the program loads, so a program cannot make `abs`/`len`/`print` lie to the tests; counts the tests' own executed
`assert` statements (AST instrumentation), so tests that ran nothing are not a pass; treats SystemExit anywhere
as early_exit; and ignores any exit status, printed output or files.

Threat model, honestly. This is process isolation, not a VM. It stops accidents and the common reward hacks
(early exit, fake success output, exceptions, swallowed tests, resource exhaustion, reading host files, network,
signalling other processes, writing outside the sandbox). It does not stop a program written to attack this
harness: the candidate runs in the harness's interpreter, so code that walks interpreter frames can find the
nonce and the report descriptor and forge a pass, and objects whose `__eq__` always returns True fool `assert
f(x) == y`. Kernel exploits are out of scope. The aggregate memory bound is max_processes * memory_mb (cgroups
would make it exact; they need a delegated cgroup, which this code does not assume). For adversarial use at
scale, run this inside a VM-level sandbox (gVisor, Firecracker) as well.
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
_REPORTED = ("failed_test", "memory", "process_limit", "early_exit", "no_tests_ran")
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
        job = {
            "nonce": nonce, "program": program, "tests": tests, "entry_point": entry_point, "root": root,
            "uid": _random_uid(), "cpu_s": cpu_s, "memory_bytes": int(memory_mb) << 20,
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


def _random_uid() -> int:
    # A fresh uid per run, from the OS's CSPRNG, in a range no distribution allocates to real users
    # (10,000,000-19,999,999), so two concurrent runs practically never share one and RLIMIT_NPROC counts one run.
    return 10_000_000 + secrets.randbelow(10_000_000)


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
    return inspect.getsource(_sandbox_main).encode()


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
            if is_root:
                for d in ("/work", "/tmp"):
                    os.chown(root + d, uid, uid)
            jail = True
            applied.append("chroot_jail")
        elif is_root:  # no namespaces: at least a private working directory the sandbox user owns
            os.chmod(os.path.dirname(root), 0o711)
            os.chown(root, uid, uid)
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
        if is_root and not pid_ns and os.fork() == 0:
            # No PID namespace to tear down: kill whatever the candidate left, as the sandbox uid, whose
            # kill(-1) reaches only processes of that (fresh) uid.
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
            os._exit(0)
        os._exit(0)  # as PID 1, this kills every process left in the namespace

    # ---- the runner: jails itself, then runs the candidate
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
        if is_root:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        resource.setrlimit(resource.RLIMIT_AS, (job["memory_bytes"], job["memory_bytes"]))
    except OSError as e:
        emit(1, "setup_error", detail=f"runner: {e}")
        os._exit(3)

    report_fd = os.dup(1)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    # Bind what reporting needs before candidate code can rebind module attributes.
    write, dumps, getpid, _exit = os.write, json.dumps, os.getpid, os._exit
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

    hits = [0]

    def hit():
        hits[0] += 1

    class CountAsserts(ast.NodeTransformer):
        def visit_Assert(self, node):
            call = ast.Expr(ast.Call(ast.Name("__stepray_assert_hit__", ast.Load()), [], []))
            return [ast.copy_location(call, node), node]

    saved_builtins = dict(builtins.__dict__)
    namespace = {"__name__": "candidate", "__builtins__": builtins}
    phase = "program"
    test_lines = tests.splitlines()
    try:
        exec(compile(program, "<program>", "exec"), namespace)
        phase = "tests"
        for name in [k for k in builtins.__dict__ if k not in saved_builtins]:
            del builtins.__dict__[name]
        builtins.__dict__.update(saved_builtins)
        namespace["__builtins__"] = builtins
        tree = ast.parse(tests, "<tests>")
        if not tree.body:
            report("no_tests_ran", detail="the tests are empty")
        tree = ast.fix_missing_locations(CountAsserts().visit(tree))
        namespace["__stepray_assert_hit__"] = hit
        exec(compile(tree, "<tests>", "exec"), namespace)
        if entry_point:
            check_fn = namespace.get("check")
            if not callable(check_fn):
                report("no_tests_ran", detail=f"the tests define no check(candidate) for {entry_point!r}")
            if entry_point not in namespace:
                raise NameError(f"the program defines no {entry_point!r}")
            check_fn(namespace[entry_point])
        if hits[0] == 0:
            report("no_tests_ran", detail="no assert statement of the tests ran")
        report("passed", detail=f"{hits[0]} asserts")
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

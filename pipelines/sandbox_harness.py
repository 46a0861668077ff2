"""The harness that runs inside the sandbox (see pipelines/sandbox.py): builds the jail, starts the reaper, the
candidate's process and runs the tests. Shipped as source with `_codec` (pipelines/sandbox_rpc.py) and run by
`python -I -S`: the standard library only.
"""

from __future__ import annotations

from pipelines.sandbox_rpc import _codec  # noqa: F401 - shipped beside _sandbox_main, which calls it


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

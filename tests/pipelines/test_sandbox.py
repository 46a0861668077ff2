"""Tests for pipelines/sandbox.py: verdict reasons, an adversarial table, and real HumanEval solutions passing.

Every hostile program below also leaves its own tests unmet, so the only way it could pass is the attack itself.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipelines.sandbox import SETUP_ALLOWANCE_S, run_code, sandbox_mechanisms

DATA = Path(os.environ.get("STEPRAY_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
MECHANISMS = sandbox_mechanisms()
JAILED = "chroot_jail" in MECHANISMS
needs_jail = pytest.mark.skipif(not JAILED, reason=f"no mount/net/pid namespaces here; applied: {MECHANISMS}")


def _sandbox_pids() -> list[int]:
    """Processes owned by a sandbox uid (10,000,000-19,999,999, see pipelines.sandbox._random_uid)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if 10_000_000 <= os.stat(f"/proc/{entry}").st_uid < 20_000_000:
                    pids.append(int(entry))
            except FileNotFoundError:
                pass
    return pids


def test_mechanisms_are_reported():
    assert {"rlimit_as", "rlimit_cpu"} <= set(MECHANISMS)
    if os.geteuid() == 0:
        assert any(m.startswith("setuid:") for m in MECHANISMS)


@pytest.mark.parametrize(
    "program, tests, entry_point, reason",
    [
        ("def f(x):\n    return x + 1", "assert f(1) == 2\nassert f(-1) == 0", None, "passed"),
        ("def f(x):\n    return x", "assert f(1) == 2", None, "failed_test"),
        ("def f(x):\n    return x + 1", "assert f(1) == 2\nassert f(2) == 4", None, "failed_test"),
        ("def f(x):\n    return x +", "assert f(1) == 2", None, "error:SyntaxError"),
        ("def g(x):\n    return x", "assert f(1) == 1", None, "error:NameError"),
        ("def f(x):\n    return 1 / x", "assert f(0) == 0", None, "error:ZeroDivisionError"),
        ("def f(x):\n    return f(x)", "assert f(1) == 1", None, "error:RecursionError"),
        ("def f(x):\n    return x", "", None, "no_tests_ran"),
        ("def f(x):\n    return x", "# only a comment\n", None, "no_tests_ran"),
        ("def f(x):\n    return x", "x = f(1)", None, "no_tests_ran"),  # no assert ran
        # HumanEval style: check(candidate) called on the entry point
        ("def add(a, b):\n    return a + b", "def check(candidate):\n    assert candidate(2, 3) == 5\n", "add",
         "passed"),
        ("def add(a, b):\n    return a - b", "def check(candidate):\n    assert candidate(2, 3) == 5\n", "add",
         "failed_test"),
        # the tests define check but nobody calls it: no entry_point given, nothing ran
        ("def add(a, b):\n    return a + b", "def check(candidate):\n    assert candidate(2, 3) == 5\n", None,
         "no_tests_ran"),
        ("def add(a, b):\n    return a + b", "assert add(2, 3) == 5", "add", "no_tests_ran"),  # no check()
        ("def plus(a, b):\n    return a + b", "def check(candidate):\n    assert candidate(2, 3) == 5\n", "add",
         "error:NameError"),
        # the failing line is named
        ("def f(x):\n    return 2 * x", "for i in range(3):\n    assert f(i) == 2 * i\nassert f(5) == 11", None,
         "failed_test"),
    ],
)
def test_verdicts(program, tests, entry_point, reason):
    v = run_code(program, tests, entry_point=entry_point, timeout_s=5)
    assert v.reason == reason, v
    assert v.correct == (reason == "passed")


def test_failure_detail_names_the_line():
    v = run_code("def f(x):\n    return 2 * x", "assert f(1) == 2\nassert f(5) == 11", timeout_s=5)
    assert v.detail == "line 2: assert f(5) == 11"
    assert run_code("def f(x):\n    return 2 * x", "assert f(1) == 2", timeout_s=5).detail == "1 asserts"


def _hostile_cases(tmp: Path, canary_pid: int, port: int) -> list[tuple[str, str, str, set[str], float]]:
    """(name, program, tests, allowed reasons, timeout_s). The tests need f(1) == 2, which no program provides."""
    secret = tmp / "secret.txt"
    t = "assert f(1) == 2"
    wrong = "\ndef f(x):\n    return 0\n"
    return [
        ("infinite loop", "while True:\n    pass", t, {"timeout"}, 1.0),
        ("infinite loop in the tested function", "def f(x):\n    while True:\n        pass", t, {"timeout"}, 1.0),
        ("sleep forever", "import time\ntime.sleep(3600)", t, {"timeout"}, 1.0),
        ("fork bomb", "import os\nwhile True:\n    os.fork()", t, {"process_limit", "timeout"}, 2.0),
        ("thread bomb", "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, "
                        "args=(60,)).start()", t, {"error:RuntimeError", "memory", "process_limit"}, 2.0),
        ("memory bomb", "x = bytearray(10 ** 11)", t, {"memory"}, 2.0),
        ("gradual memory bomb", "a = []\nwhile True:\n    a.append(bytearray(10 ** 7))", t, {"memory"}, 5.0),
        ("disk bomb", "with open('big', 'wb') as fh:\n    while True:\n        fh.write(b'0' * (1 << 20))", t,
         {"error:OSError"}, 5.0),
        ("sys.exit before the tests", "import sys\nsys.exit(0)", t, {"early_exit"}, 2.0),
        ("os._exit before the tests", "import os\nos._exit(0)", t, {"early_exit"}, 2.0),
        ("SystemExit inside the tested function", "def f(x):\n    raise SystemExit(0)", t, {"early_exit"}, 2.0),
        ("os._exit inside the tested function", "import os\ndef f(x):\n    os._exit(0)", t, {"early_exit"}, 2.0),
        ("exit() builtin (absent without site)", "exit(0)", t, {"error:NameError", "early_exit"}, 2.0),
        ("print a fake success and exit", "print('All tests passed!')\nprint('passed')\nimport os\nos._exit(0)",
         t, {"early_exit"}, 2.0),
        ("kill itself", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)" + wrong, t,
         {"killed", "failed_test"}, 2.0),
        ("segfault", "import ctypes\nctypes.string_at(0)", t, {"killed"}, 2.0),
        ("redefine check()", "def check(candidate):\n    pass\ndef add(a, b):\n    return 0",
         "def check(candidate):\n    assert candidate(1, 1) == 2\ncheck(add)\n", {"failed_test"}, 2.0),
        ("patch builtins to lie", "import builtins\nbuiltins.abs = lambda v: 0\nbuiltins.len = lambda v: 3" + wrong,
         "assert abs(f(1) - 2) < 1e-9\nassert len([f(1)]) == 1 and f(1) == 2", {"failed_test"}, 2.0),
        ("replace __builtins__", "__builtins__ = {'abs': lambda v: 0}" + wrong, "assert abs(f(1) - 2) == 0",
         {"failed_test"}, 2.0),
        ("swallow AssertionError via excepthook", "import sys\nsys.excepthook = lambda *a: None" + wrong, t,
         {"failed_test"}, 2.0),
        ("read a host file", f"open({str(secret)!r}).read()" + wrong, t,
         {"error:FileNotFoundError", "error:PermissionError"}, 2.0),
        ("read /etc/passwd", "open('/etc/passwd').read()" + wrong, t,
         {"error:FileNotFoundError", "error:PermissionError"}, 2.0),
        ("read the parent's environment", "open('/proc/1/environ').read()" + wrong, t,
         {"error:FileNotFoundError", "error:PermissionError"}, 2.0),
        ("list the project", "import os\nos.listdir('/work/main')" + wrong, t,
         {"error:FileNotFoundError", "error:PermissionError"}, 2.0),
        ("write a host file", f"open({str(tmp / 'escaped.txt')!r}, 'w').write('x')" + wrong, t,
         {"error:FileNotFoundError", "error:PermissionError"}, 2.0),
        ("write through ..", "open('../../../../../../tmp/stepray_escape_rel.txt', 'w').write('x')" + wrong, t,
         {"failed_test", "error:FileNotFoundError", "error:PermissionError"}, 2.0),
        ("network: internet", "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)" + wrong, t,
         {"error:OSError", "error:TimeoutError", "error:ConnectionRefusedError"}, 3.0),
        ("network: a host service", f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"
         + wrong, t, {"error:OSError", "error:ConnectionRefusedError", "error:TimeoutError"}, 3.0),
        ("kill the parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)" + wrong, t,
         {"failed_test", "error:PermissionError", "error:ProcessLookupError"}, 2.0),
        ("kill the process group", "import os, signal\nos.killpg(os.getpgid(0), signal.SIGKILL)" + wrong, t,
         {"failed_test", "killed", "error:PermissionError", "error:ProcessLookupError"}, 2.0),
        ("kill a host process", f"import os, signal\nos.kill({canary_pid}, signal.SIGKILL)" + wrong, t,
         {"error:PermissionError", "error:ProcessLookupError"}, 2.0),
        ("kill the test runner", f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)" + wrong, t,
         {"error:PermissionError", "error:ProcessLookupError"}, 2.0),
        ("a setsid daemon that outlives the program", "import os, time\nif os.fork() == 0:\n    os.setsid()\n"
         "    time.sleep(60)\n    os._exit(0)" + wrong, t, {"failed_test"}, 2.0),
    ]


@pytest.fixture(scope="module")
def hostile_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "secret.txt").write_text("top secret")
    os.chmod(tmp / "secret.txt", 0o600)
    canary = subprocess.Popen(["sleep", "120"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0)
    yield tmp, canary, listener
    canary.kill()
    canary.wait()
    listener.close()


@needs_jail
@pytest.mark.parametrize("index", range(33))
def test_hostile_programs_fail_within_limits(hostile_env, index):
    tmp, canary, listener = hostile_env
    cases = _hostile_cases(tmp, canary.pid, listener.getsockname()[1])
    name, program, tests, reasons, timeout_s = cases[index]
    start = time.monotonic()
    v = run_code(program, tests, timeout_s=timeout_s, memory_mb=256)
    elapsed = time.monotonic() - start
    assert not v.correct, (name, v)
    assert v.reason in reasons, (name, v)
    assert elapsed < timeout_s + SETUP_ALLOWANCE_S + 1.5, (name, elapsed)
    # nothing escaped: the canary and the host service are untouched, no file appeared, no process survived
    assert canary.poll() is None, name
    with pytest.raises(BlockingIOError):
        listener.accept()
    assert not (tmp / "escaped.txt").exists()
    assert not Path("/tmp/stepray_escape_rel.txt").exists()
    deadline = time.monotonic() + 2
    while _sandbox_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_pids() == [], name


def test_case_table_size_matches_parametrize(tmp_path):
    assert len(_hostile_cases(tmp_path, 1, 1)) == 33


# Programs that pass without doing the work (reward hacks): every one leaves its tests unmet, so a pass could only
# come from the hack. The tests run in their own process, the program in another (its own uid and interpreter);
# only plain data crosses back, rebuilt from builtins, so no object of the program's can take part in a comparison.
T = "assert f(1) == 2\nassert f(2) == 4"
REWARD_HACKS = [
 ("always-equal object", "class A:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\ndef f(x):\n    return A()", T),
 ("int subclass that equals anything", "class I(int):\n    def __eq__(self, o): return True\n    __hash__ = int.__hash__\ndef f(x):\n    return I(0)", T),
 ("str subclass that equals anything", "class S(str):\n    def __eq__(self, o): return True\n    __hash__ = str.__hash__\ndef f(x):\n    return S('')", "assert f(1) == 'a'\nassert f(2) == 'b'"),
 ("list subclass that equals anything", "class L(list):\n    def __eq__(self, o): return True\ndef f(x):\n    return L()", "assert f(1) == [1]\nassert f(2) == [2]"),
 ("object with a lying __ne__ under assert not !=", "class A:\n    def __ne__(self, o): return False\n    def __eq__(self, o): return True\ndef f(x):\n    return A()", "assert not (f(1) != 2)\nassert not (f(2) != 4)"),
 ("HumanEval check with always-equal", "class A:\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    return A()", "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\ncheck(add)\n"),
 ("float close to anything", "class F(float):\n    def __sub__(self, o): return 0.0\n    def __rsub__(self, o): return 0.0\ndef f(x):\n    return F(0)", "assert abs(f(1) - 2) < 1e-9\nassert abs(f(2) - 4) < 1e-9"),
 ("object whose arithmetic is always small", "class A:\n    def __sub__(self, o): return 0\n    def __abs__(self): return 0\ndef f(x):\n    return A()", "assert abs(f(1) - 2) < 1e-9\nassert abs(f(2) - 4) < 1e-9"),
 ("patch math.isclose", "import math\nmath.isclose = lambda *a, **k: True\ndef f(x):\n    return 0", "import math\nassert math.isclose(f(1), 2)\nassert math.isclose(f(2), 4)"),
 ("program's math used by the tests, patched", "import math\nmath.isclose = lambda *a, **k: True\ndef f(x):\n    return 0", "assert math.isclose(f(1), 2)\nassert math.isclose(f(2), 4)"),
 ("fake math module class", "class math:\n    isclose = staticmethod(lambda *a, **k: True)\ndef f(x):\n    return 0", "assert math.isclose(f(1), 2)"),
 ("shadow abs for the tests", "abs = lambda v: 0\ndef f(x):\n    return 0", "assert abs(f(1) - 2) < 1e-9"),
 ("shadow isinstance and len", "isinstance = lambda *a: True\nlen = lambda v: 1\ndef f(x):\n    return None", "assert isinstance(f(1), list) and len(f(1)) == 1 and f(1) == [2]"),
 ("read the expected value from the caller's frame", "import sys\ndef f(x):\n    fr = sys._getframe(1)\n    return next(c for c in fr.f_code.co_consts if isinstance(c, int) and c not in (x, None))", T),
 ("read the tests from the harness's memory", "import gc\ndef f(x):\n    for o in gc.get_objects():\n        if isinstance(o, dict) and 'tests' in o and isinstance(o['tests'], str):\n            import re\n            return int(re.findall(r'f\\(%d\\) == (\\d+)' % x, o['tests'])[0])\n    return 0", T),
 ("walk frames to forge the report", "import sys\ndef f(x):\n    fr = sys._getframe()\n    while fr:\n        if 'report' in fr.f_locals:\n            fr.f_locals['report']('passed')\n        fr = fr.f_back\n    return 0", T),
 ("patch AssertionError", "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\ndef f(x):\n    return 0", T),
 ("exception that claims to be an AssertionError of the harness", "def f(x):\n    raise SystemExit(0)", T),
 ("returns a generator that compares equal", "class G:\n    def __iter__(self): return self\n    def __next__(self): raise StopIteration\n    def __eq__(self, o): return True\ndef f(x):\n    return G()", T),
 ("kill the tests' process", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef f(x):\n    return 0", T),
 ("ptrace the tests", "import ctypes, os\nlibc = ctypes.CDLL(None)\nlibc.ptrace(16, os.getppid(), 0, 0)\ndef f(x):\n    return 0", T),
 ("stdout claims success", "print('passed')\nimport sys\nsys.stdout.write('{\"kind\": \"report\", \"status\": \"passed\"}\\n')\ndef f(x):\n    return 0", T),
 ("__class__ spoofing int", "class A:\n    __class__ = int\n    def __eq__(self, o): return True\ndef f(x):\n    return A()", T),
 ("bool truthiness used as equality", "class A:\n    def __bool__(self): return True\n    def __eq__(self, o): return self\ndef f(x):\n    return A()", T),
 ("__eq__ returning a truthy object", "class T:\n    def __bool__(self): return True\nclass A:\n    def __eq__(self, o): return T()\ndef f(x):\n    return A()", T),
 ("Counter subclass patched", "import collections\ncollections.Counter.__eq__ = lambda s, o: True\ndef f(x):\n    return collections.Counter()", "assert f(1) == {1: 2}\nassert f(2) == {2: 4}"),
 ("fraction subclass", "from fractions import Fraction\nclass Q(Fraction):\n    def __eq__(self, o): return True\ndef f(x):\n    return Q(0)", T),
 ("nested hostile object in a list", "class A:\n    __eq__ = lambda s, o: True\ndef f(x):\n    return [A()]", "assert f(1) == [2]\nassert f(2) == [4]"),
 ("hostile dict key", "class A:\n    __eq__ = lambda s, o: True\n    __hash__ = lambda s: hash(2)\ndef f(x):\n    return {A(): 1}", "assert f(1) == {2: 1}"),
]


@pytest.mark.parametrize("name, program, tests", REWARD_HACKS, ids=[h[0] for h in REWARD_HACKS])
def test_reward_hacks_do_not_pass(name, program, tests):
    v = run_code(program, tests, timeout_s=3)
    assert not v.correct and v.reason != "passed", (name, v)
    assert v.reason != "sandbox_error", (name, v)


# What MBPP / HumanEval reference solutions do that must keep passing with the program in its own process.
REFERENCE_STYLE = [
 ("a class the tests build (MBPP 601)", "class Pair(object):\n    def __init__(self, a, b):\n        self.a = a\n        self.b = b\ndef max_chain_length(arr, n):\n    mcl = [1] * n\n    for i in range(n):\n        for j in range(i):\n            if arr[i].a > arr[j].b and mcl[i] < mcl[j] + 1:\n                mcl[i] = mcl[j] + 1\n    return max(mcl)", "assert max_chain_length([Pair(5, 24), Pair(15, 25), Pair(27, 40), Pair(50, 60)], 4) == 3\nassert Pair(1, 2).a == 1", None),
 ("an argument changed in place", "def sort_in_place(a):\n    a.sort()", "x = [3, 1, 2]\nsort_in_place(x)\nassert x == [1, 2, 3]", None),
 ("a Counter compared with a dict", "from collections import Counter\ndef freq(xs):\n    return Counter(xs)", "assert freq([1, 1, 2]) == {1: 2, 2: 1}", None),
 ("a generator read by the tests", "def evens(n):\n    return (i for i in range(n) if i % 2 == 0)", "assert list(evens(5)) == [0, 2, 4]", None),
 ("a namedtuple compared with a tuple", "from collections import namedtuple\nP = namedtuple('P', 'x y')\ndef f():\n    return P(1, 2)", "assert f() == (1, 2)", None),
 ("the program's import used by the tests", "import math\ndef volume_sphere(r):\n    return 4 / 3 * math.pi * r ** 3", "assert math.isclose(volume_sphere(10), 4188.790204786391, rel_tol=0.001)", None),
 ("sets, None, bools, floats, bytes, complex", "def f():\n    return [{1, 2}, frozenset({3}), None, True, 0.5, b'x', 1j, (1,)]", "assert f() == [{1, 2}, frozenset({3}), None, True, 0.5, b'x', 1j, (1,)]", None),
 ("an exception the tests expect", "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x + 1", "try:\n    f(-1)\nexcept ValueError:\n    pass\nelse:\n    assert False\nassert f(1) == 2", None),
 ("keyword arguments and methods of the result", "def f(s, upper=False):\n    return s.upper() if upper else s", "assert f('ab', upper=True).lower() == 'ab' and f(s='x') == 'x'", None),
 ("a type check of the result", "def f():\n    return (1, 'a')", "assert isinstance(f(), tuple) and type(f()[1]) is str", None),
 ("a big integer", "def f(n):\n    return 2 ** n", "assert f(20000) == 2 ** 20000", None),
 ("HumanEval helper from the prompt used by the tests", "def encode(s):\n    return s[::-1]\ndef decode(s):\n    return s[::-1]", "def check(candidate):\n    for w in ['abc', 'xyz']:\n        assert candidate(encode(w)) == w\n", "decode"),
]



@pytest.mark.parametrize("name, program, tests, entry_point", REFERENCE_STYLE, ids=[c[0] for c in REFERENCE_STYLE])
def test_reference_style_programs_still_pass(name, program, tests, entry_point):
    v = run_code(program, tests, entry_point=entry_point, timeout_s=5)
    assert v.reason == "passed", (name, v)


def test_the_tests_cannot_hand_the_program_a_function():
    # Only data and the program's own objects cross to its process; a lambda from the tests is refused.
    v = run_code("def apply(g, x):\n    return g(x)", "assert apply(lambda v: v + 1, 1) == 2", timeout_s=5)
    assert v.reason == "error:TypeError" and "only data" in v.detail, v


def test_cpu_limit_reports_timeout():
    # A CPU-bound loop with a generous wall clock ends on RLIMIT_CPU (ceil(timeout_s) s) and still says timeout.
    v = run_code("while True:\n    pass", "assert True", timeout_s=1.0)
    assert v.reason == "timeout"


@pytest.mark.data
def test_humaneval_canonical_solutions_pass():
    path = DATA / "code" / "HumanEval.jsonl"
    if not path.exists():
        pytest.skip(f"HumanEval not found at {path} (set STEPRAY_DATA to the shared data folder)")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 164
    with ThreadPoolExecutor(2) as pool:  # all 164 (~12 s on 2 cores)
        verdicts = list(pool.map(lambda r: run_code(r["prompt"] + r["canonical_solution"], r["test"],
                                                    entry_point=r["entry_point"], timeout_s=10), rows))
    failed = {row["task_id"]: v for row, v in zip(rows, verdicts) if v.reason != "passed"}
    assert failed == {}
    sample = rows[::8]
    # and a broken solution of the same problems fails
    row = sample[0]
    v = run_code(row["prompt"] + "    return None\n", row["test"], entry_point=row["entry_point"], timeout_s=10)
    assert v.reason in {"failed_test", "error:TypeError"}, v


def test_bad_arguments_name_the_input():
    with pytest.raises(TypeError, match="program and tests must be str"):
        run_code(None, "assert True")
    with pytest.raises(ValueError, match="timeout_s and memory_mb must be positive"):
        run_code("", "assert True", timeout_s=0)


def test_parent_signal_state_is_untouched():
    # run_code must not install handlers or leave children behind in the calling process
    before = signal.getsignal(signal.SIGALRM), signal.getsignal(signal.SIGCHLD)
    run_code("pass", "assert True", timeout_s=2)
    assert (signal.getsignal(signal.SIGALRM), signal.getsignal(signal.SIGCHLD)) == before
    try:  # no unreaped child of ours is left (other live children, e.g. a fixture's, may exist)
        assert os.waitpid(-1, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        pass


@needs_jail
def test_a_dying_caller_takes_its_run_down(tmp_path):
    # PR_SET_PDEATHSIG chain: caller -> harness -> reaper (PID 1) -> namespace. Kill the caller mid-run.
    code = ("from pipelines.sandbox import run_code\n"
            "run_code('import time\\ntime.sleep(1000)', 'assert True', timeout_s=300)\n")
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the killed caller cannot remove its temporary directory
    caller = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], env=env)
    deadline = time.monotonic() + 20
    while not _sandbox_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_pids(), "the sandboxed program never started"
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 5
    while _sandbox_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_pids() == []

"""Code reward sandbox: correct programs pass, every hostile program scores 0 with the right
reason, in bounded time, and leaves the machine as it was.

The machine is shared: every test that runs a candidate does so under a watchdog (a thread
scanning /proc) that SIGKILLs any process of the reward's slot uids that outlives its
deadline or outnumbers the process cap, even if the sandbox's own limits failed; a test
fails if the watchdog ever had to act. The hostile tests only run after the uid-drop probe
showed that candidates are not root (root ignores RLIMIT_NPROC)."""
import os
import signal
import socket
import sys
import threading
import time

import pytest

from score_fast.rewards import CodeReward, CodeRewardConfig, make_reward
from score_fast.rewards.code import build_program, extract_code, live_processes

pytestmark = pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0,
                                reason="the code sandbox needs Linux and root")

CFG = dict(workers=2, wall_s=3.0, cpu_s=2, memory_mb=512, nproc=8)
MBPP = {"test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
GOOD = "def add(a, b):\n    return a + b\n"
HUMANEVAL = {
    "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n',
    "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n"
            "    assert abs(candidate([0.5, 0.25]) - 0.75) < 1e-9\n",
    "entry_point": "total",
}


def _slot_procs(uids: range) -> list[tuple[int, int]]:
    """(pid, rss_kb) of every live process whose real uid is one of the sandbox's."""
    return live_processes(uids)


class Watchdog:
    """Kills the candidates' processes if they live past `deadline_s`, number more than
    `max_procs` or hold more than `max_rss_gb` together. `fired` says whether it had to."""

    def __init__(self, uids: range, deadline_s: float, max_procs: int = 40, max_rss_gb: float = 4):
        self.uids, self.deadline_s, self.max_procs = uids, deadline_s, max_procs
        self.max_rss_kb = max_rss_gb * 2**20
        self.fired, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = time.monotonic()
        while not self._stop.wait(0.05):
            procs = _slot_procs(self.uids)
            late = time.monotonic() - t0 > self.deadline_s
            if procs and (late or len(procs) > self.max_procs
                          or sum(r for _, r in procs) > self.max_rss_kb):
                self.fired.append((round(time.monotonic() - t0, 2), len(procs)))
                for pid, _ in procs:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def reward():
    with CodeReward(CodeRewardConfig(**CFG)) as r:
        yield r


def _uids(r: CodeReward) -> range:
    return range(r._uid0, r._uid0 + 1024)  # candidates' uids, then the checkers'


def run(r: CodeReward, src: str, row=MBPP, deadline_s: float = 15):
    """Score one candidate under the watchdog; assert the machine is left as it was."""
    mounts = open("/proc/self/mounts").read()
    with Watchdog(_uids(r), deadline_s) as dog:
        t0 = time.monotonic()
        result = r.evaluate([src], [row])
        elapsed = time.monotonic() - t0
    assert not dog.fired, f"the watchdog had to kill candidates: {dog.fired}"
    assert _slot_procs(_uids(r)) == [], "candidate processes survived"
    assert open("/proc/self/mounts").read() == mounts, "a sandbox mount leaked to the host"
    return result.scores[0], result.reasons[0], elapsed


@pytest.fixture(scope="module")
def unprivileged(reward):
    """Gate for the hostile tests: candidates run without root, groups or environment."""
    probe = ("import os\n"
             "def add(a, b):\n"
             "    assert os.getuid() != 0 and os.getgid() != 0 and os.getgroups() == []\n"
             "    assert dict(os.environ) == {}\n"
             "    return a + b\n")
    assert run(reward, probe)[:2] == (1.0, "ok")


# ---------------------------------------------------------------- correct programs


def test_correct_programs_score_1(reward):
    assert run(reward, GOOD)[:2] == (1.0, "ok")
    fenced = f"Here you go:\n```python\n{GOOD}```\nand a demo:\n```\nprint(add(1, 2))\n```"
    assert run(reward, fenced)[:2] == (1.0, "ok")
    # HumanEval: a completion of the prompt, and a full rewrite without the prompt's imports
    assert run(reward, "    return sum(xs)\n", HUMANEVAL)[:2] == (1.0, "ok")
    full = "def total(xs: List[int]) -> int:\n    return sum(xs)\n"
    assert run(reward, full, HUMANEVAL)[:2] == (1.0, "ok")
    # its own directory is writable, stdlib imports work, a __main__ demo block does not run
    own_dir = ("import math, collections, os\n"
               "def add(a, b):\n"
               "    with open('scratch.txt', 'w') as f: f.write(str(a + b))\n"
               "    os.makedirs('sub/dir', exist_ok=True); open('sub/dir/x', 'w').close()\n"
               "    return int(open('scratch.txt').read()) + int(math.floor(0.5))\n"
               "if __name__ == '__main__':\n    input()\n")
    assert run(reward, own_dir)[:2] == (1.0, "ok")


def test_wrong_programs_and_their_reasons(reward):
    assert run(reward, "def add(a, b):\n    return a - b\n")[:2] == (0.0, "wrong_answer")
    assert run(reward, "def add(a, b:\n")[:2] == (0.0, "syntax_error")
    assert run(reward, "def add(a, b):\n    return [][1]\n")[:2] == (0.0, "crash")
    assert run(reward, "import numpy\n" + GOOD)[:2] == (0.0, "crash")  # no site-packages
    assert reward.evaluate(["", "```python\n```"], [MBPP, MBPP]).reasons == ["no_code", "no_code"]


def test_32_concurrent_correct_programs_and_a_bad_neighbour():
    """32 at once all pass; a CPU hog and a memory hog in the same batch change nothing."""
    bad = ["while True:\n    pass\n", "x = bytearray(2**40)\n"]
    with CodeReward(CodeRewardConfig(**{**CFG, "workers": 32})) as r:
        with Watchdog(_uids(r), 60, max_procs=32 * 8 + 8) as dog:
            result = r.evaluate([GOOD] * 32 + bad, [MBPP] * 34)
        assert not dog.fired, dog.fired
        assert result.scores == [1.0] * 32 + [0.0, 0.0]
        assert result.reasons[32] in ("cpu_time", "timeout") and result.reasons[33] == "memory"
        assert _slot_procs(_uids(r)) == []


# ---------------------------------------------------------------- hostile programs


def test_infinite_loop(reward, unprivileged):
    # 2 s of CPU hits RLIMIT_CPU (SIGXCPU) before the 3 s wall clock, unless the box is busy
    score, why, dt = run(reward, "while True:\n    pass\n")
    assert (score, why) == (0.0, "cpu_time") or (score, why) == (0.0, "timeout")
    assert dt < CFG["wall_s"] + 2
    # asleep it burns no CPU: the wall clock ends it
    score, why, dt = run(reward, "import time\nwhile True:\n    time.sleep(1)\n")
    assert (score, why) == (0.0, "timeout") and dt < CFG["wall_s"] + 2


def test_fork_50_is_capped(reward, unprivileged):
    """Mild version first: 50 forks meet RLIMIT_NPROC (8, the candidate included)."""
    src = ("import os, time\n"
           "def add(a, b):\n"
           "    n = 0\n"
           "    try:\n"
           "        for _ in range(50):\n"
           "            if os.fork() == 0:\n"
           "                time.sleep(60)\n"
           "                os._exit(0)\n"
           "            n += 1\n"
           "    except OSError:\n"
           "        pass\n"
           "    assert n < 8, n\n"
           "    return a + b\n")
    # passes (the cap held), and the sleeping children are killed after it returned
    assert run(reward, src)[:2] == (1.0, "ok")


def test_fork_bomb(reward, unprivileged):
    src = ("import os\n"
           "while True:\n"
           "    try:\n"
           "        os.fork()\n"
           "    except OSError:\n"
           "        pass\n")
    score, why, dt = run(reward, src)
    assert score == 0.0 and why in ("timeout", "cpu_time") and dt < CFG["wall_s"] + 2


def test_setsid_escape_is_swept(reward, unprivileged):
    """A child in its own session and process group outlives killpg; the uid sweep gets it."""
    src = ("import os, time\n"
           "if os.fork() == 0:\n"
           "    os.setsid()\n"
           "    if os.fork() == 0:\n"
           "        time.sleep(300)\n"
           "    os._exit(0)\n"
           + GOOD)
    assert run(reward, src)[:2] == (1.0, "ok")  # the tests did pass; nothing survives (run())


def test_mild_memory_then_50gb(reward, unprivileged):
    assert run(reward, "x = bytearray(2 * 2**30)\n" + GOOD)[:2] == (0.0, "memory")
    growing = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 2**20))\n"
    assert run(reward, growing)[:2] == (0.0, "memory")
    assert run(reward, "x = bytearray(50 * 2**30)\n" + GOOD)[:2] == (0.0, "memory")


def test_10gb_file(reward, unprivileged):
    src = ("with open('big', 'wb') as f:\n"
           "    for _ in range(10 * 1024):\n"
           "        f.write(b'x' * 2**20)\n" + GOOD)
    score, why, dt = run(reward, src)
    assert (score, why) == (0.0, "file_size") and dt < CFG["wall_s"]
    # many files under the per-file limit fill the private tmpfs instead (64 MB)
    many = ("for i in range(10 * 1024):\n"
            "    with open(f'f{i}', 'wb') as f:\n"
            "        f.write(b'x' * 8 * 2**20)\n" + GOOD)
    assert run(reward, many)[:2] == (0.0, "file_size")


def test_write_and_read_outside_its_directory(reward, unprivileged, tmp_path):
    os.chmod(tmp_path, 0o777)  # even a world-writable directory
    target = tmp_path / "pwned"
    for path in [target, "/dev/shm/score_fast_pwned", "/var/tmp/score_fast_pwned"]:
        score, why, _ = run(reward, f"open({str(path)!r}, 'w').write('x')\n" + GOOD)
        assert (score, why) == (0.0, "crash")  # PermissionError
        assert not os.path.exists(path)
    # /tmp is its own tmpfs, in its own mount namespace: writable, and gone with it
    assert run(reward, "open('/tmp/score_fast_pwned', 'w').write('x')\n" + GOOD)[:2] == (1.0, "ok")
    assert not os.path.exists("/tmp/score_fast_pwned")
    # world-readable files outside are not readable either (Landlock), nor listable
    for path in ["/etc/passwd", os.path.abspath(__file__)]:
        assert run(reward, f"open({path!r}).read()\n" + GOOD)[:2] == (0.0, "crash")
    assert run(reward, "import os\nos.listdir('/')\n" + GOOD)[:2] == (0.0, "crash")
    assert run(reward, "import os\nos.execv('/bin/sh', ['sh', '-c', 'true'])\n" + GOOD)[:2] == (
        0.0, "crash")


def test_no_network(reward, unprivileged):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    src = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n" + GOOD
    try:
        assert run(reward, src)[:2] == (0.0, "crash")
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever arrived
    finally:
        server.close()
    udp = "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('1.1.1.1', 53))\n"
    assert run(reward, udp + GOOD)[:2] == (0.0, "crash")  # ENETUNREACH: no route at all


def test_parent_environment_secrets(reward, unprivileged, monkeypatch):
    monkeypatch.setenv("SCORE_FAST_TEST_SECRET", "hunter2")
    with CodeReward(CodeRewardConfig(**CFG)) as r:  # zygotes started with the secret set
        src = ("import os, gc\n"
               "def add(a, b):\n"
               "    seen = str(dict(os.environ))\n"
               "    for p in ('/proc/self/environ', f'/proc/{os.getppid()}/environ',\n"
               "              '/proc/1/environ'):\n"
               "        try:\n"
               "            seen += open(p).read()\n"
               "        except OSError:\n"
               "            pass\n"
               "    seen += ' '.join(str(o) for o in gc.get_objects() if isinstance(o, dict))\n"
               "    secret = 'hunter' + '2'  # not one literal: the source itself is in memory\n"
               "    return a + b if secret in seen else -1\n")
        assert run(r, src)[:2] == (0.0, "wrong_answer")


def test_early_exits_and_fake_success(reward, unprivileged):
    for early in ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n",
                  "print('ok')\nprint('PASSED')\nimport sys\nsys.exit(0)\n",
                  "raise SystemExit\n"]:
        assert run(reward, early + GOOD.replace("a + b", "a - b"))[:2] == (0.0, "exited_early")
    # exit inside the function, mid-tests
    assert run(reward, "import os\ndef add(a, b):\n    os._exit(0)\n")[:2] == (0.0, "exited_early")
    # guessing the result channel: write nonce-looking bytes to every fd, then leave
    forge = ("import os\n"
             "for fd in range(3, 64):\n"
             "    try:\n"
             "        os.write(fd, b'0' * 32)\n"
             "    except OSError:\n"
             "        pass\n"
             "os._exit(0)\n")
    assert run(reward, forge)[:2] == (0.0, "exited_early")


def test_monkey_patching_the_checker(reward, unprivileged):
    wrong = "def add(a, b):\n    return 0\n"
    # its own check() is replaced by the test's (HumanEval), asserts cannot be redefined
    own_check = "def total(xs):\n    return 0\ndef check(candidate):\n    return True\n"
    assert run(reward, own_check, HUMANEVAL)[:2] == (0.0, "wrong_answer")
    patch_assert = "import builtins\nbuiltins.AssertionError = type('E', (Exception,), {})\n"
    assert run(reward, patch_assert + wrong)[:2] == (0.0, "wrong_answer")
    # patched builtins the tests use (abs below) are not the ones the tests see
    patch_abs = ("import builtins\nbuiltins.abs = lambda x: 0\n"
                 "def total(xs):\n    return 3 if xs == [1, 2] else 99\n")
    assert run(reward, patch_abs, HUMANEVAL)[:2] == (0.0, "wrong_answer")
    # an object equal to everything comes back as a handle, equal only to itself
    always = "class Eq:\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return Eq()\n"
    assert run(reward, always)[:2] == (0.0, "wrong_answer")
    # ... also when it first replaces the builtins or the harness's helpers it could reach
    for patch in ["import builtins\nbuiltins.type = lambda o: int\nbuiltins.callable = lambda o: False\n",
                  "import __main__\n__main__._guard = lambda f: f\n__main__._plain = lambda v: True\n"]:
        assert run(reward, patch + always)[:2] == (0.0, "wrong_answer")
    sub = "class I(int):\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return I(0)\n"
    assert run(reward, sub)[:2] == (0.0, "wrong_answer")
    # a trace function that would jump over the assert lines is removed before the tests
    trace = ("import sys\n"
             "def tr(frame, event, arg):\n"
             "    return tr\n"
             "sys.settrace(tr)\n" + wrong)
    assert run(reward, trace)[:2] == (0.0, "wrong_answer")


# ---------------------------------------------------------------- forged passes
# The tests run in a checker process that never runs candidate code; the candidate's process
# only answers calls with plain data. None of these may score 1.

WRONG = "def add(a, b):\n    return a - b\n"


def test_forged_pass_tokens(reward, unprivileged):
    """Copying a token between fds (the old pass signal), at top level, inside the tested
    function, in a HumanEval completion: no fd of the candidate reaches the verdict."""
    copy = "import os\nos.write(3, os.read(4, 64)); os._exit(0)\n"
    assert run(reward, copy)[0] == 0.0
    assert run(reward, "import os\ndef add(a, b):\n    os.write(3, os.read(4, 64)); os._exit(0)\n")[0] == 0.0
    assert run(reward, "    import os\n    os.write(3, os.read(4, 64)); os._exit(0)\n", HUMANEVAL)[0] == 0.0
    # every fd 0..255 gets every payload: raw bytes, a "pass" byte, framed protocol messages
    # (a made-up success reason, a fake ready + answers), then it exits, or answers wrongly
    spray = ("import os, json, struct\n"
             "def frame(o):\n"
             "    d = json.dumps(o).encode()\n"
             "    return struct.pack('>I', len(d)) + d\n"
             "payloads = [b'0' * 32, b'P', b'E:ok', b'\\x00' * 4096, frame({'err': 'ok'}),\n"
             "            frame({'ready': {}}), frame({'v': 1}) * 8, frame({'P': 1})]\n"
             "for p in payloads:\n"
             "    for fd in range(256):\n"
             "        try:\n"
             "            os.write(fd, p)\n"
             "        except OSError:\n"
             "            pass\n")
    for tail in ["import os\nos._exit(0)\n", WRONG, "import sys\nsys.exit(0)\n"]:
        score, why, _ = run(reward, spray + tail)
        assert score == 0.0, why
    # pre-written answers are just answers: wrong ones fail like any wrong answer
    ahead = ("import os, json, struct\n"
             "def frame(o):\n"
             "    d = json.dumps(o).encode()\n"
             "    return struct.pack('>I', len(d)) + d\n"
             "os.write(4, frame({'ready': {'add': 'f'}}) + frame({'v': 7}) * 2)\n" + WRONG)
    assert run(reward, ahead)[0] == 0.0


def test_harness_objects_out_of_reach(reward, unprivileged):
    """Walking frames, gc and every module finds no test code (its expected answers) and no
    pass token: the tests never enter the candidate's process, not even its zygote's memory."""
    snoop = ("import gc, sys\n"
             "def collect():\n"
             "    seen = []\n"
             "    f = sys._getframe()\n"
             "    while f is not None:\n"
             "        seen += [repr(f.f_locals), repr(f.f_globals)]\n"
             "        f = f.f_back\n"
             "    for o in gc.get_objects():\n"
             "        try:\n"
             "            seen.append(o.decode('latin-1') if isinstance(o, (bytes, bytearray))\n"
             "                        else repr(o)[:100000])\n"
             "        except Exception:\n"
             "            pass\n"
             "    for m in list(sys.modules.values()):\n"
             "        seen.append(repr(getattr(m, '__dict__', '')))\n"
             "    return '\\n'.join(seen)\n"
             "def add(a, b):\n"
             "    text = collect()\n"
             "    # built after the search, from reversed literals: not in this source\n"
             "    found = [m for m in ('(dda tressa', ' == )1 ,1-(dda', 'ecnon')\n"
             "             if ''.join(reversed(m)) in text]\n"
             "    return a + b if not found else -1\n")
    assert run(reward, snoop)[:2] == (1.0, "ok")
    # the same search used to cheat: parse answers out of whatever test text it can find
    cheat = ("import gc, re\n"
             "def add(a, b):\n"
             "    for o in gc.get_objects():\n"
             "        if isinstance(o, str) and 'assert' in o:\n"
             "            for x, y, z in re.findall(r'add\\(([-\\d]+), ([-\\d]+)\\) == ([-\\d]+)', o):\n"
             "                if (int(x), int(y)) == (a, b):\n"
             "                    return int(z)\n"
             "    return 999\n")
    assert run(reward, cheat)[:2] == (0.0, "wrong_answer")


def test_patching_its_own_process_changes_nothing(reward, unprivileged):
    patches = [
        "import builtins\nbuiltins.AssertionError = type('E', (Exception,), {})\n",
        "import os\nos.write = lambda fd, b: len(b)\nos._exit = lambda c: None\n",
        "import builtins\nbuiltins.__import__ = None\nbuiltins.isinstance = lambda a, b: True\n",
        "import json\njson.loads = lambda *a, **k: {'v': 3}\njson.dumps = lambda *a, **k: '{\"v\": 3}'\n",
        "import sys\nsys.modules['__main__'].__dict__.clear()\n",
    ]
    for patch in patches:
        score, why, _ = run(reward, patch + WRONG)
        assert score == 0.0, (patch, why)


def test_ctypes_tricks(reward, unprivileged):
    """Rewriting its own interpreter's memory only changes what its process sends."""
    # the small int 3 made to read as -1 in its process: add(1, 2) is sent as whatever it is
    small = ("import ctypes\n"
             "def add(a, b):\n"
             "    ctypes.c_long.from_address(id(0) + 24).value = 7\n"
             "    return a - b\n")
    assert run(reward, small)[0] == 0.0
    # an object always equal, disguised as an int by rewriting its type pointer
    disguise = ("import ctypes\n"
                "class Eq:\n"
                "    def __eq__(self, o):\n"
                "        return True\n"
                "def add(a, b):\n"
                "    o = Eq()\n"
                "    ctypes.c_void_p.from_address(id(o) + 8).value = id(int)\n"
                "    return o\n")
    assert run(reward, disguise)[0] == 0.0


def test_equal_to_everything(reward, unprivileged):
    always = "class Eq:\n    def __eq__(self, o):\n        return True\n    __ne__ = lambda s, o: False\n"
    # its objects stay in its process: the checker holds handles, equal only to themselves
    assert run(reward, always + "def add(a, b):\n    return Eq()\n")[:2] == (0.0, "wrong_answer")
    assert run(reward, always + "def total(xs):\n    return [Eq()]\n", HUMANEVAL)[:2] == (
        0.0, "wrong_answer")
    assert run(reward, always + "def add(a, b):\n    return Eq().__eq__\n")[:2] == (
        0.0, "wrong_answer")
    # a protocol failure (here an answer over the pipe's 16 MB) swallowed by the test's own
    # bare except is still a failure
    lenient = {**HUMANEVAL, "test": "def check(candidate):\n    try:\n        assert candidate([1, 2]) == 3\n"
                                    "    except:\n        pass\n"}
    assert run(reward, "def total(xs):\n    return 'x' * (20 << 20)\n", lenient)[:2] == (
        0.0, "bad_return_type")
    # a candidate class (MBPP rows that build one) is an opaque handle: equal only to itself
    pair = {"test_list": ["assert Pair(1, 2) == (1, 2)"]}
    assert run(reward, always.replace("class Eq:", "class Pair:\n    def __init__(s, a, b): pass")
               , pair)[:2] == (0.0, "wrong_answer")


def test_checker_out_of_reach(reward, unprivileged):
    """Signals and ptrace to every process near its own pid (the checker is forked right
    after it), to its parent and to -1 all fail: the checker runs as another uid, outside
    the candidate's PID namespace."""
    attack = ("import os, signal, ctypes\n"
              "def attack():\n"
              "    libc = ctypes.CDLL(None, use_errno=True)\n"
              "    me, hit = os.getpid(), []\n"
              "    for pid in [os.getppid()] + list(range(max(2, me - 200), me + 200)):\n"
              "        if pid == me or pid <= 0:  # getppid() is 0 in its PID namespace\n"
              "            continue\n"
              "        try:\n"
              "            os.kill(pid, signal.SIGKILL)\n"
              "            hit.append(pid)\n"
              "        except OSError:\n"
              "            pass\n"
              "        if libc.ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH\n"
              "            hit.append(pid)\n"
              "    try:\n"
              "        os.kill(-1, signal.SIGKILL)  # spares the caller; it has no children\n"
              "    except OSError:  # ESRCH: nothing it may signal in its PID namespace\n"
              "        pass\n"
              "    return hit\n")
    # at call time, from inside the tested function: the checker still gets its answers
    assert run(reward, attack + "def add(a, b):\n    return a + b if attack() == [] else -1\n")[:2] == (
        1.0, "ok")
    # at import time, with a wrong function: the checker is alive and says so
    assert run(reward, attack + "attack()\n" + WRONG)[:2] == (0.0, "wrong_answer")


def test_checker_semantics():
    """What crosses the pipe: plain data of every kind, exceptions as their builtin type
    (tests that expect one still pass), the prompt's helpers, candidate classes by handle."""
    with CodeReward(CodeRewardConfig(**CFG)) as r:
        value = "({1: (2, 3)}, {4}, frozenset(), b'x', bytearray(b'y'), 2**100, -2**70, float('inf'), [1.5, None, True, 'é\\ud800'], 1j, range(3))"
        rows = [
            {"test_list": [f"assert f() == {value}", "assert math.isnan(g())",
                           "assert type(f()[5]) is int and type(f()[8][1]) is type(None)",
                           "assert h(1, k=[2]) == collections.Counter('aab')"],
             "test_imports": ["import math", "import collections"]},
            {**HUMANEVAL, "test": "def check(candidate):\n    try:\n        candidate([-1])\n"
                                  "        assert False\n    except ValueError as e:\n"
                                  "        assert 'neg' in str(e)\n    assert candidate([1, 2]) == 3\n"},
            {"prompt": "def double(x):\n    return 2 * x\n\n\ndef quad(x):\n    \"\"\"4x\"\"\"\n",
             "test": "def check(candidate):\n    assert candidate(3) == double(double(3))\n",
             "entry_point": "quad"},
            {"test_list": ["assert max_chain([Pair(5, 24), Pair(15, 25), Pair(27, 40)], 3) == 3"]},
            {"test_list": ["assert sum(f([1, 2])) == 3"]},  # builtins stay the tests' own
        ]
        srcs = [
            f"import math, collections\ndef f():\n    return {value}\ndef g():\n    return float('nan')\n"
            "def h(a, k):\n    return collections.Counter('aab')\n",
            "class Neg(ValueError):\n    pass\n"
            "def total(xs):\n    if min(xs) < 0:\n        raise Neg('negative')\n    return sum(xs)\n",
            "    return double(double(x))\n",
            "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
            "def max_chain(ps, n):\n    return len(ps) if all(type(p) is Pair for p in ps) else 0\n",
            "def sum(xs):\n    return 3\ndef f(xs):\n    return [0]\n",
        ]
        with Watchdog(_uids(r), 30) as dog:
            result = r.evaluate(srcs, rows)
        assert not dog.fired, dog.fired
        assert list(zip(result.scores, result.reasons)) == [
            (1.0, "ok"), (1.0, "ok"), (1.0, "ok"), (1.0, "ok"), (0.0, "wrong_answer")]
        assert _slot_procs(_uids(r)) == []


def test_build_program_and_factory():
    assert extract_code("x\n```py\nprint(1)\n```\n```python\ndef f():\n  pass\n```\n```\nf()\n```") == (
        "def f():\n  pass")
    p = build_program("```python\ndef f(x):\n    return x\n```", {"test_list": ["assert f(1) == 1"],
                                                                   "test_imports": ["import math"]})
    assert p["entries"] == ["f"] and p["tests"].startswith("import math")
    with pytest.raises(ValueError, match="test_list"):
        build_program("x", {"question": "?"})
    r = make_reward({"kind": "code", "wall_s": 1.0, "workers": 1})
    assert isinstance(r, CodeReward) and r.config.wall_s == 1.0
    r.close()


# ---------------------------------------------------------------- one-process semantics
NODE_SETUP = ("class Node:\n    def __init__(self, data, left=None, right=None):\n"
              "        self.data, self.left, self.right = data, left, right\n"
              "root = Node(1, Node(2, Node(4)), Node(3))\n")
# (row, candidate, expected reason): each once scored the wrong way (issue 18)
SEMANTICS = [
    # wrong code that scored 1
    ({"test_list": ["assert all(map(lambda t: add(*t[0]) == t[1], [((1, 2), 3), ((2, 2), 4)]))"]},
     "def add(a, b):\n    raise StopIteration\n", "crash"),
    ({"test_list": ["assert all(add(*t[0]) == t[1] for t in [((1, 2), 3)])"]},
     "def add(a, b):\n    raise StopIteration\n", "crash"),
    ({"test_list": ["assert pow(2, 3) == 8", "assert pow(3, 2) == 9"],
      "code": "def pow(a, b):\n    return a ** b\n"},
     "def pow(a, b):\n    return 0\n", "wrong_answer"),
    ({"test_list": ["assert pow(2, 3) == 8"]},  # no reference code: the asserts' own call
     "def pow(a, b):\n    return 0\n", "wrong_answer"),
    ({"test_list": ["assert all([add(1, 2) == 4])"]},  # a builtin the tests use is theirs
     "def add(a, b):\n    return 0\ndef all(x):\n    return True\n", "wrong_answer"),
    # correct code that scored 0
    ({"test_list": ["assert pow(2, 3) == 8"], "code": "def pow(a, b):\n    return a ** b\n"},
     "def pow(a, b):\n    r = 1\n    for _ in range(b):\n        r *= a\n    return r\n", "ok"),
    ({"test_list": ["x = [3, 1, 2]\nsort_in_place(x)\nassert x == [1, 2, 3]",
                    "d = {}\nfill(d)\nassert d == {'a': 1}"]},
     "def sort_in_place(xs):\n    xs.sort()\ndef fill(d):\n    d['a'] = 1\n", "ok"),
    ({"test_list": ["assert list(gen(3)) == [0, 1, 2]", "assert next(gen(3)) == 0",
                    "assert sum(x for x in gen(4)) == 6"]},
     "def gen(n):\n    yield from range(n)\n", "ok"),
    ({"test_list": ["assert adder(2)(3) == 5", "f = adder(1)\nassert [f(i) for i in range(3)] == [1, 2, 3]"]},
     "def adder(a):\n    return lambda b: a + b\n", "ok"),
    ({"test_list": ["assert make(3).value == 3", "assert make(3).double() == 6"]},
     "class Box:\n    def __init__(self, v):\n        self.value = v\n"
     "    def double(self):\n        return 2 * self.value\n"
     "def make(v):\n    return Box(v)\n", "ok"),
    ({"test_list": ["assert list(map(square, [1, 2])) == [1, 4]",
                    "assert sorted([3, -4], key=square) == [3, -4]"]},
     "def square(x):\n    return x * x\n", "ok"),
    ({"test_list": ["assert height(root) == 3", "assert height(Node(7)) == 1"],
      "test_setup_code": NODE_SETUP},
     "def height(n):\n    return 0 if n is None else 1 + max(height(n.left), height(n.right))\n",
     "ok"),
    ({"test_list": ["assert qsize(3) == 3"]},  # stdlib beyond the preloaded modules
     "import queue, zlib, pickle, threading\n"
     "def qsize(n):\n    q = queue.Queue()\n    for i in range(n):\n        q.put(i)\n"
     "    return q.qsize() + len(zlib.compress(b'')) * 0\n", "ok"),
]


def test_one_process_semantics():
    """The checker never runs candidate code, yet the tests see what they would in one
    process: exceptions cannot end their loops, a builtin-named target is the candidate's,
    arguments change in place, generators, closures and objects come back by handle,
    functions pass by name, objects built by the setup code are the candidate's own."""
    with CodeReward(CodeRewardConfig(**{**CFG, "wall_s": 10.0})) as r:
        with Watchdog(_uids(r), 120) as dog:
            result = r.evaluate([s for _, s, _ in SEMANTICS], [row for row, _, _ in SEMANTICS])
        assert not dog.fired, dog.fired
        got = list(zip(range(len(SEMANTICS)), result.reasons))
        assert got == [(i, want) for i, (_, _, want) in enumerate(SEMANTICS)]
        assert _slot_procs(_uids(r)) == []


# ---------------------------------------------------------------- per-candidate accounting
def test_memfd_pages_count_against_the_candidate(reward, unprivileged):
    """memfd pages lie outside RLIMIT_AS: 768 MB of them once scored 1 under memory_mb=512.
    The slot's memory cgroup (memory_mb + disk_mb for the whole candidate) stops them."""
    hog = ("import os\n"
           "chunk = b'x' * (16 << 20)\n"
           "fds = [os.memfd_create('m') for _ in range(48)]\n"
           "for fd in fds:\n"
           "    os.write(fd, chunk)\n" + GOOD)
    score, why, _ = run(reward, hog)
    if why != "memory" and reward._warned:  # the reward logged that it has no cgroup here
        pytest.skip("no memory cgroup can be made on this machine: RLIMIT_AS only")
    assert score == 0.0 and why == "memory", why


def test_memory_is_counted_over_all_of_a_candidates_processes(reward, unprivileged):
    """4 processes of 250 MB each stay under RLIMIT_AS (512 MB a process) but not under the
    candidate's cgroup (memory_mb + disk_mb = 576 MB for all of them). Whichever process
    the kernel kills, the candidate went over its memory: 0, even with a right answer."""
    spread = ("import os, time\n"
              "kids = []\n"
              "for _ in range(3):\n"
              "    pid = os.fork()\n"
              "    if pid == 0:\n"
              "        x = bytearray(250 << 20)\n"
              "        time.sleep(60)\n"
              "    kids.append(pid)\n"
              "x = bytearray(250 << 20)\n"
              "time.sleep(0.5)\n" + GOOD)
    score, why, _ = run(reward, spread)
    if why != "memory" and reward._warned:
        pytest.skip("no memory cgroup can be made on this machine: RLIMIT_AS only")
    assert (score, why) == (0.0, "memory")


def test_a_process_group_escape_is_killed_on_time(reward, unprivileged):
    """A candidate that forks, moves itself into its child's process group and hangs once
    held evaluate() for wall_s + 30 s and left its child alive: now both go at wall_s."""
    escape = ("import os, time\n"
              "child = os.fork()\n"
              "if child == 0:\n"
              "    os.setpgid(0, 0)\n"
              "    time.sleep(600)\n"
              "time.sleep(0.2)\n"
              "os.setpgid(0, child)\n"
              "time.sleep(600)\n" + GOOD)
    score, why, elapsed = run(reward, escape)
    assert (score, why) == (0.0, "timeout") and elapsed < CFG["wall_s"] + 5


def test_nothing_outlives_a_killed_trainer(tmp_path):
    """SIGKILL the process scoring a candidate whose forked child sleeps: every process of
    the slot's uids goes (the zygote's death takes the candidate, whose PID namespace takes
    the child) and no directory of it stays in /tmp."""
    import subprocess
    script = tmp_path / "score.py"
    script.write_text(
        "import sys\n"
        "from score_fast.rewards import CodeReward, CodeRewardConfig\n"
        "r = CodeReward(CodeRewardConfig(workers=1, wall_s=60.0))\n"
        "print(r._uid0, flush=True)\n"
        "r.evaluate(['import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n"
        "    time.sleep(600)\\ntime.sleep(600)\\n'], [{'test_list': ['assert f() == 1']}])\n")
    before = set(os.listdir("/tmp"))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    uid0 = int(p.stdout.readline())
    uids = range(uid0, uid0 + 1024)
    deadline = time.monotonic() + 30
    while len(_slot_procs(uids)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # the candidate and its child are up
    assert len(_slot_procs(uids)) >= 2
    p.kill()
    p.wait()
    deadline = time.monotonic() + 10
    while _slot_procs(uids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _slot_procs(uids) == []
    assert not [d for d in set(os.listdir("/tmp")) - before if d.startswith("score_fast_code_")]

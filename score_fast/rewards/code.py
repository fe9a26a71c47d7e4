"""Code reward: 1 if the candidate program passes every test, run in a sandbox.

Rows are HumanEval style (`prompt`, `test` defining check(candidate), `entry_point`) or MBPP
style (`test_list` of assert lines, optional `test_setup_code` / `test_imports`). The program
is the last fenced code block of the response that defines a function (else the last block,
else the whole response); HumanEval completions that do not define the entry point are
appended to the prompt, as in the original harness.

The candidate is written by a model optimised to get reward, so it runs in a sandbox (see
sandbox/zygote.py for each limit and how it is enforced): a pool of `workers` zygote processes,
each owning two unprivileged uids, forks per candidate one confined process that runs the
candidate's code and a checker process that runs the tests and alone decides pass/fail,
calling the candidate's functions through a pipe that carries plain data only. The test code
never reaches the candidate's process. Needs Linux and root (uid drop, network and mount
namespaces); the CI and GPU machines run as root."""
from __future__ import annotations

import ast
import builtins
import json
import logging
import os
import random
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Mapping

from score_fast.rewards.sandbox.pool import WorkerPool
from score_fast.rewards.base import Reward, RewardResult

log = logging.getLogger("score_fast")

_SANDBOX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox", "zygote.py")
# Imported once per zygote, before the uid drop: the dropped uid may not be able to read the
# stdlib (here it lives under /root, mode 0700), so a module not listed may fail to import.
PRELOAD = ("math", "cmath", "re", "string", "collections", "itertools", "functools", "heapq",
           "bisect", "operator", "copy", "typing", "random", "statistics", "fractions",
           "decimal", "datetime", "json", "hashlib", "array", "numbers", "dataclasses", "enum",
           "textwrap", "unicodedata", "time", "abc", "sys", "os",
           "socket")  # socket: so a connect() meets the network namespace, not an ImportError


@dataclass
class CodeRewardConfig:
    """Per-candidate limits. A slot's memory cgroup holds the candidate's whole tree to
    memory_mb + disk_mb, memfd and tmpfs pages included (where no cgroup can be made, only
    RLIMIT_AS per process: workers x (nproc x memory_mb + disk_mb) at worst); a well-behaved
    candidate uses ~10 MiB. Its processes live in their own PID namespace: none outlives
    the candidate, evaluate(), close() or a SIGKILLed trainer."""
    kind: str = "code"
    workers: int = 0  # 0: os.cpu_count(); candidates run at once, one zygote (~25 MB) each
    wall_s: float = 10.0  # wall clock per candidate (HumanEval's harness uses 3 s per problem)
    cpu_s: int = 10  # RLIMIT_CPU seconds: SIGXCPU, SIGKILL a second later
    memory_mb: int = 1024  # RLIMIT_AS per process; CPython + stdlib maps ~40 MB of it
    nproc: int = 8  # RLIMIT_NPROC of the slot's uid: processes + threads, the candidate included
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file it may write
    disk_mb: int = 64  # size of its private tmpfs working directory (RAM-backed)
    open_files: int = 64  # RLIMIT_NOFILE
    # Slot uids are uid_base + 1024 * block + slot (candidates) and + 512 + slot (checkers)
    # with a random block per reward object, so two trainers on one machine never share a
    # uid (a sweep kills every process of a uid).
    # 2^30 + 2^29 stays below 2^31, which some tools misread as negative.
    uid_base: int = 1 << 30
    preload: tuple[str, ...] = field(default=PRELOAD)


_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.S)
_IMPORT = re.compile(r"^(?:from\s+\S+\s+import\s+.+|import\s+.+)$", re.M)


def extract_code(response: str) -> str:
    blocks = _FENCE.findall(response)
    with_def = [b for b in blocks if re.search(r"^\s*(?:def|class)\s", b, re.M)]
    return (with_def or blocks or [response])[-1].lstrip("\r\n").rstrip()  # keep the indent


def build_program(response: str, row: Mapping) -> dict | None:
    """{"src": candidate, "tests": test code, "entries": functions the tests call,
    "override": entries that are the candidate's even where the test code defines them,
    "setup": trusted code the checker runs first}, or None when the response holds no code.

    The sandbox runs "src" in one process and "setup" + "tests" in another, where each entry
    the candidate defines is a proxy to it (MBPP: unless it is a builtin or bound by the test
    code itself). HumanEval's prompt is the setup: checks use its helpers (poly,
    encode_cyclic, ...), and its stub of the entry point gives way to the candidate's."""
    code = extract_code(response)
    if not code.strip():
        return None
    if "entry_point" in row:
        entry = row["entry_point"]
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
            # a full rewrite: keep the prompt's imports (typing.List, math, ...)
            code = "\n".join(_IMPORT.findall(row["prompt"]) + [code])
        else:
            code = row["prompt"] + code
        return {"src": code, "tests": f"{row['test']}\n\ncheck({entry})\n", "entries": [entry],
                "override": [entry], "setup": row["prompt"]}
    if "test_list" in row:
        imports = row.get("test_imports") or []
        tests = "\n".join([*imports, *row["test_list"]])
        setup = row.get("test_setup_code") or ""
        try:
            # every name the tests read: called, or passed by name (map(f, xs), key=f)
            used = sorted({n.id for n in ast.walk(ast.parse(tests))
                           if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)})
            setup_names = _top_level_names(setup)
        except SyntaxError:
            used, setup_names = [], []
        # MBPP's test_setup_code (classes, and objects of them that the asserts pass to the
        # candidate, e.g. a tree of Node) runs after the candidate's code in its namespace,
        # as in one process; the checker gets what it binds as handles
        return {"src": code, "tests": tests, "entries": used, "override": [], "setup": "",
                "targets": _targets(row), "setup_src": setup, "setup_names": setup_names}
    raise ValueError("code reward rows need HumanEval fields (prompt, test, entry_point) "
                     f"or an MBPP test_list; got {sorted(row)}")


def _top_level_names(src: str) -> list[str]:
    names = set()
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        else:
            names |= {n.id for n in ast.walk(node)
                      if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return sorted(names)


_LIB_DIRS = [d for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64") if os.path.isdir(d)]


def live_processes(uids: range, pids=()) -> list[tuple[int, int]]:
    """(pid, resident KiB) of every live (not zombie) process whose real uid is in `uids`
    (a reward's slots: CodeReward.uids) or whose pid is in `pids`: what a sandbox has
    running, for watchdogs and load measurements."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if (int(status["Uid"].split()[0]) in uids or int(pid) in pids) and \
                "Z" not in status["State"]:
            out.append((int(pid), int(status.get("VmRSS", "0 kB").split()[0])))
    return out


def _targets(row: Mapping) -> list[str]:
    """The functions an MBPP row tests: the reference solution's top-level definitions
    (`code`), else in each assert the first call of a name that is not a builtin, or the
    outermost call when all are. A candidate's definition of one of these is used even
    where it shadows a builtin (`def pow`); a builtin the tests merely use (all, set, ...)
    stays the tests' own whatever the candidate defines."""
    try:
        tree = ast.parse(row.get("code") or "")
        defined = [n.name for n in tree.body
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    except SyntaxError:
        defined = []
    if defined:
        return defined
    out = []
    for test in row["test_list"]:
        try:
            calls = [n.func.id for n in ast.walk(ast.parse(test))  # breadth first: outer first
                     if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
        except SyntaxError:
            continue
        own = [c for c in calls if not hasattr(builtins, c)]
        if own or calls:
            out.append((own or calls)[0])
    return sorted(set(out))


def _request(program: dict) -> bytes:
    """The zygote's framing: it reads the header (what the candidate process gets) and passes
    the test part on to the checker without ever holding it, see sandbox/zygote.py."""
    header = json.dumps({"setup_src": program.get("setup_src", ""),
                         **{k: program.get(k, []) for k in ("src", "entries", "override",
                                                            "targets", "setup_names")}}).encode()
    tests = json.dumps({k: program[k] for k in ("setup", "tests")}).encode()
    return b"%d %d\n" % (len(header), len(tests)) + header + tests


class CodeReward(Reward):
    def __init__(self, config: CodeRewardConfig | None = None):
        if sys.platform != "linux" or os.geteuid() != 0:
            raise RuntimeError("the code sandbox needs Linux and root: it drops each "
                               "candidate to its own uid in new network/mount namespaces")
        self.config = config or CodeRewardConfig()
        self._pool: WorkerPool | None = None
        self._warned = False
        # uid0 + slot runs the candidates of a slot, uid0 + 512 + slot their checkers
        self._uid0 = self.config.uid_base + 1024 * random.randrange(1 << 19)

    def _spawn(self, slot: int):
        c = self.config
        # the candidate's tmpfs is mounted over /tmp inside its own mount namespace: no
        # directory of it exists on the host, so none can outlive it (a SIGKILLed trainer)
        workdir = "/tmp"
        paths = sysconfig.get_paths()
        cfg = dict(uid=self._uid0 + slot, checker_uid=self._uid0 + 512 + slot, workdir=workdir,
                   wall_s=c.wall_s, cpu_s=c.cpu_s,
                   memory_mb=c.memory_mb, nproc=c.nproc, file_size_mb=c.file_size_mb,
                   disk_mb=c.disk_mb, open_files=c.open_files, preload=list(c.preload),
                   # the stdlib, and the system's shared libraries its C modules link
                   # (zlib -> libz.so.1): public files, read-only
                   read_dirs=sorted({paths["stdlib"], paths["platstdlib"], *_LIB_DIRS}))
        # -I: no PYTHON* variables, no user site, no script dir on sys.path; -S: no site
        # packages; env={}: nothing of the trainer's environment (tokens, keys) reaches it.
        return [sys.executable, "-I", "-S", "-B", _SANDBOX, json.dumps(cfg)], {}

    def _evaluate(self, responses: list[str], rows: list[Mapping]) -> RewardResult:
        c = self.config
        if c.workers > 512:
            raise ValueError("CodeRewardConfig.workers must be <= 512 (uids per block)")
        programs = [build_program(r, row) for r, row in zip(responses, rows)]
        todo = [i for i, p in enumerate(programs) if p is not None]
        if self._pool is None:
            self._pool = WorkerPool(c.workers or os.cpu_count() or 1, self._spawn)
        # The zygote enforces wall_s itself; the extra 30 s only catch a stuck zygote.
        replies = self._pool.map([_request(programs[i]) for i in todo], c.wall_s + 30)
        scores, reasons = [0.0] * len(rows), ["no_code"] * len(rows)
        for i, reply in zip(todo, replies):
            scores[i], reasons[i] = float(reply["score"]), reply["reason"]
            if reply.get("cgroup") is False and not self._warned:
                self._warned = True
                log.warning("code reward: no memory cgroup could be made here (cgroup v2 "
                            "without a delegated memory controller, or no v1 hierarchy): a "
                            "candidate's memory is bounded per process (RLIMIT_AS) only, "
                            "not memfd/tmpfs pages nor the sum over its processes")
        return RewardResult(scores, reasons)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

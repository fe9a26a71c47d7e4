"""Code-reward sandbox zygote: one per pool slot, started by code.py as
`python -I -S -B zygote.py CONFIG_JSON` with an EMPTY environment, as root.

Standalone on purpose (stdlib only, no score_fast import): candidates are forked from this
process and inherit its memory, so it must hold nothing worth stealing. It pre-imports the
modules candidates commonly use once (a fresh `python -I -S` plus those imports costs ~80 ms a
candidate on the 2-core CI machine, a fork ~1 ms), then answers one request at a time on
stdin: a line `HEADER_LEN TESTS_LEN\\n`, HEADER_LEN bytes of JSON {"src", "entries",
"override"} and TESTS_LEN bytes of JSON {"setup", "setup_strict", "tests"}, with one JSON
line {"score", "reason"}.

Two processes per candidate, both forked from here:

* the candidate process runs the candidate's code and nothing else, then serves calls. Still
  root after fork: new process group, stdio on /dev/null, every fd closed but its two ends of
  the call pipes; new network namespace (no interface but a down loopback: connect() fails)
  and mount namespace with a private tmpfs (size-capped, owned by the slot uid, mode 0700) as
  its working directory; rlimits (address space, CPU seconds, process count, file size, open
  files, no core dumps); then setgroups([])/setgid/setuid to the slot's own unprivileged uid,
  no_new_privs, and a Landlock domain that allows writing only in the tmpfs, reading only
  there and in the stdlib, no execve, no TCP, no signals or abstract sockets outside the
  domain.
* the checker process runs the dataset's test code (MBPP asserts, HumanEval's prompt +
  check) and never any candidate code: the functions the tests use are proxies that send
  (name, args, kwargs) to the candidate process and decode its answer, a small tagged JSON
  of plain data (None/bool/int/float/complex/str/bytes/containers) or an exception marker.
  Objects of any other type never cross: the checker gets a handle (Ref) on them, equal
  only to itself, whose attribute reads, calls and iteration are requests to the candidate
  process; no `__eq__` of the candidate's ever runs where the asserts do. What one process
  would give is kept: arguments the candidate changes in place are changed in the test's
  objects (the candidate sends them back), returned generators, closures and objects work
  through their handles, MBPP's test_setup_code runs after the solution in the candidate's
  namespace (its Node trees are the candidate's objects, handles in the checker), and a
  builtin-named function under test (`def pow`) is the candidate's. A StopIteration from
  the candidate becomes a RuntimeError in the checker: it cannot end the test's map() or
  all() early. It runs as a second uid of the slot (so the candidate, not root, can neither
  signal nor ptrace it), with rlimits, no_new_privs and a read-only Landlock domain.

The test code never enters this zygote's memory, so it is not in the candidate's either (a
fork copies everything): the zygote reads only the header and splices the tests bytes, in
the kernel, from its stdin into a pipe only the checker reads. The checker alone writes the
verdict, to a pipe created after the candidate was forked. The zygote enforces the wall
clock (pidfds + select), then SIGKILLs both groups and every process of the candidate uid
(kill(-1) from a helper running as that uid, which also catches setsid() escapees), reaping
them as child subreaper. When the checker says the candidate process went away (EOF, garbage
on the pipe), the reason comes from the candidate's exit status."""
import ast
import builtins
import collections
import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import signal
import struct
import sys
import time

CFG = json.loads(sys.argv[1])
for _name in CFG["preload"]:
    try:
        __import__(_name)
    except ImportError:
        pass

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x40000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
# Landlock syscalls share these numbers on every architecture (added after the 5.x unification).
LL_CREATE, LL_ADD_RULE, LL_RESTRICT = 444, 445, 446
MAX_MSG = 16 << 20  # largest encoded call or answer on the call pipes
MAX_DEPTH = 100  # deepest nesting of an encoded value
# Reasons a candidate process may give for its own failure; anything else reads "crash".
REASONS = {"wrong_answer", "memory", "syntax_error", "exited_early", "bad_return_type",
           "file_size", "crash", "cpu_time", "sandbox_error"}


def _check(ok: int, what: str) -> None:
    if ok != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _landlock(rw_dir, ro_dirs: list[str]) -> None:
    abi = libc.syscall(LL_CREATE, None, 0, 1)  # flag 1: ask for the ABI version
    if abi < 1:
        raise OSError(errno.ENOSYS, "landlock unavailable")
    fs = (1 << 13) - 1 | (abi >= 2) << 13 | (abi >= 3) << 14 | (abi >= 5) << 15
    net = 3 if abi >= 4 else 0  # TCP bind + connect, behind the network namespace
    scope = 3 if abi >= 6 else 0  # abstract unix sockets + signals outside the domain
    attr = struct.pack("=QQQ", fs, net, scope)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = libc.syscall(LL_CREATE, attr, len(attr), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    read = 1 << 2 | 1 << 3  # READ_FILE | READ_DIR; no EXECUTE anywhere: no execve at all
    rules = ([(rw_dir, fs & ~1)] if rw_dir else []) + [(d, read) for d in ro_dirs]
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
        except OSError:
            continue
        _check(libc.syscall(LL_ADD_RULE, ruleset, 1, struct.pack("=Qi", access, fd), 0),
               f"landlock_add_rule {path}")
        os.close(fd)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(libc.syscall(LL_RESTRICT, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)


def _drop(uid: int, limits: list) -> None:
    mb = 1 << 20
    for res, soft, hard in [
        (resource.RLIMIT_AS, CFG["memory_mb"] * mb, CFG["memory_mb"] * mb),
        # soft -> SIGXCPU, hard -> SIGKILL one second later if SIGXCPU is ignored
        (resource.RLIMIT_CPU, CFG["cpu_s"], CFG["cpu_s"] + 1),
        (resource.RLIMIT_NOFILE, CFG["open_files"], CFG["open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ] + limits:
        resource.setrlimit(res, (soft, hard))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)  # root ignores RLIMIT_NPROC; this uid is the slot's alone, so it holds


def _stdlib_view(workdir: str) -> None:
    """The whole stdlib importable by the candidate's uid: where it lies under a directory
    that uid cannot enter (a pyenv in /root, mode 0700), a read-only bind mount of it inside
    the working directory (this mount namespace only) takes its place in sys.path."""
    stdlib = os.path.dirname(os.__file__)
    probe = stdlib
    while probe != "/":  # every directory on the way must be enterable by "others"
        if not os.stat(probe).st_mode & 0o001:
            break
        probe = os.path.dirname(probe)
    else:
        return
    view = os.path.join(workdir, ".stdlib")
    os.mkdir(view, 0o555)
    _check(libc.mount(stdlib.encode(), view.encode(), None, MS_BIND | MS_REC, None),
           "bind the stdlib")
    _check(libc.mount(None, view.encode(), None,
                      MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None),
           "read-only stdlib")
    sys.path[:] = [view + p[len(stdlib):] if p == stdlib or p.startswith(stdlib + "/") else p
                   for p in sys.path]
    sys.path_importer_cache.clear()


def _relay(child: int) -> None:
    """A process between the zygote and the candidate (the one outside the candidate's PID
    namespace, and that namespace's init): holds nothing, waits for its child and ends as
    it did, so that exit status and resource usage read as the candidate's. Killed (a
    sweep, the zygote's death), it takes its child with it (the child's parent-death
    signal), and init's death takes every process left in the namespace: nothing a
    candidate forks outlives it."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.closerange(0, 1 << 16)
    _, status = os.waitpid(child, 0)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    if os.getpid() == 1:  # init cannot signal itself: 128 + signal, codes above capped
        os._exit(128 + sig if sig else min(code, 127))
    if sig is None and code >= 128:  # init's report of a signal
        sig, code = code - 128, 1
    if sig:
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), signal.SIGKILL)  # a signal whose default is not to end
    os._exit(code)


def _confine_candidate() -> None:
    uid, workdir = CFG["uid"], CFG["workdir"]
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    _join_cgroup()
    # A PID namespace: its init relays again and runs nothing else; the candidate is its
    # pid 2. When init ends, the kernel kills all that is left in the namespace. (Not the
    # candidate as init: an init that joins another process group, e.g. its child's,
    # keeps that group's pid alive and its exit waits on itself -- measured: 30 s stuck.)
    _check(libc.unshare(CLONE_NEWPID), "unshare pid")
    for _ in range(2):  # the relay outside, then init inside
        child = os.fork()
        if child:
            _relay(child)
        # (getppid() reads 0 in init: its parent is outside. Were the relay killed before
        # this line, killpg of the candidate's group still reaches this process.)
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    _check(libc.unshare(CLONE_NEWNET | CLONE_NEWNS), "unshare")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    opts = f"size={CFG['disk_mb']}m,mode=0700,uid={uid},gid={uid}".encode()
    _check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts),
           "mount tmpfs")
    _stdlib_view(workdir)
    os.chdir(workdir)
    mb = 1 << 20
    _drop(uid, [(resource.RLIMIT_NPROC, CFG["nproc"], CFG["nproc"]),
                (resource.RLIMIT_FSIZE, CFG["file_size_mb"] * mb, CFG["file_size_mb"] * mb)])
    _landlock(workdir, CFG["read_dirs"])
    # after setuid: a credential change clears it. Dies with the zygote.
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")


# ---------------------------------------------------------------- memory cgroup
# RLIMIT_AS bounds each process's address space, but not memory outside it: memfd and tmpfs
# pages (750 MB held under memory_mb=512, measured), nor the sum over the candidate's
# processes. A memory cgroup per slot charges all of it to the candidate: its limit is
# memory_mb + disk_mb (its tmpfs pages are charged too) for the whole tree. cgroup v2 where
# its memory controller is delegated here, else v1's memory hierarchy; where neither can be
# written, CGROUP stays None and only the rlimits hold (the reward says so once).
CGROUP = None


def _cgroup_dir() -> str | None:
    name = f"score_fast_{CFG['uid']}"
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, path in lines:
        if controllers == "" and os.path.isfile("/sys/fs/cgroup/cgroup.controllers"):
            base = "/sys/fs/cgroup" + path  # v2, mounted at the usual place
            if "memory" in open(os.path.join(base, "cgroup.subtree_control")).read().split():
                return os.path.join(base, name)
        if "memory" in controllers.split(","):
            base = "/sys/fs/cgroup/memory" + path  # v1
            if os.path.isdir(base):
                return os.path.join(base, name)
    return None


def _setup_cgroup() -> None:
    """The slot's memory cgroup, made (or reused: a predecessor's) by the zygote at start."""
    global CGROUP
    try:
        path = _cgroup_dir()
        if path is None:
            return
        os.makedirs(path, exist_ok=True)
        limit = str((CFG["memory_mb"] + CFG["disk_mb"]) << 20)
        v2 = os.path.isfile(os.path.join(path, "memory.max"))
        for name, value in ((("memory.max", limit), ("memory.swap.max", "0")) if v2 else
                            (("memory.limit_in_bytes", limit),
                             ("memory.memsw.limit_in_bytes", limit))):
            try:
                with open(os.path.join(path, name), "w") as f:
                    f.write(value)
            except OSError:
                if name in ("memory.max", "memory.limit_in_bytes"):
                    raise  # the swap limit is optional (no swap accounting)
        CGROUP = path
    except OSError:
        CGROUP = None


def _join_cgroup() -> None:
    if CGROUP is not None:
        with open(os.path.join(CGROUP, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


def _oom_kills() -> int:
    """How many times the kernel killed in the slot's cgroup for memory (so far)."""
    if CGROUP is None:
        return 0
    for name in ("memory.events", "memory.oom_control"):
        try:
            with open(os.path.join(CGROUP, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            continue
    return 0


def _confine_checker() -> None:
    """Trusted code, but it reads what the candidate sends: its own uid (the candidate's
    cannot signal or ptrace it, and setuid from root leaves it non-dumpable), no forks, no
    file writes, read-only stdlib, no TCP."""
    os.chdir("/")
    _drop(CFG["checker_uid"], [(resource.RLIMIT_NPROC, 1, 1), (resource.RLIMIT_FSIZE, 0, 0)])
    _landlock(None, CFG["read_dirs"])
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")


# ---------------------------------------------------------------- plain-data encoding
# JSON with tags: null/true/false/str/float (NaN, +-Infinity included) and lists are
# themselves; ints beyond 2^53 travel as hex (no int_max_str_digits limit); everything else
# is {"t": tag, "v": ...}. Exact types only: a subclass could redefine __eq__.
_FACTORIES = {"int": int, "float": float, "str": str, "list": list, "dict": dict, "set": set,
              "tuple": tuple, "bool": bool, "bytes": bytes, "frozenset": frozenset}


class Ref:
    """Checker-side handle on an object that stays in the candidate process: an instance of
    a candidate class (MBPP rows that build one, e.g. Pair(5, 24), and pass it back), a
    returned generator, closure, bound method or object. Equal only to itself (the
    candidate's __eq__ never runs here); attribute reads, calls and iteration are requests
    to the candidate process, whose answers are plain data or more handles."""
    __slots__ = ("id", "_channel")

    def __init__(self, id_, channel=None):
        self.id, self._channel = id_, channel

    def __getattr__(self, name):
        if name.startswith("__") or self._channel is None:
            raise AttributeError(name)
        return self._channel.op(self, "getattr", name)

    def __iter__(self):
        return self._channel.op(self, "iter")


class RefCall(Ref):
    __slots__ = ()

    def __call__(self, *args, **kwargs):
        return self._channel.op(self, "call", args=args, kwargs=kwargs)


class RefIter(Ref):
    __slots__ = ()

    def __iter__(self):
        return self

    def __next__(self):
        return self._channel.op(self, "next")


_REFS = {"o": Ref, "f": RefCall, "i": RefIter}


def _kind(v, callable=callable, hasattr=hasattr) -> str:
    """How the checker may use a candidate object: i(terator), f(unction) or o(bject)."""
    try:
        if hasattr(type(v), "__next__"):
            return "i"
        return "f" if callable(v) else "o"
    except BaseException:
        return "o"


def _encode(v, depth=0, type=type, len=len, hexs=int.__format__, refs=None):
    """Plain data as tagged JSON. refs (candidate side): a list where any other object is
    kept, sent as a handle {"t": "ref", "v": index, "k": kind}; None (checker side): such
    an object is a TypeError (except the checker's handles, which go back by index)."""
    if depth > MAX_DEPTH:
        raise ValueError("too deep")
    t, d = type(v), depth + 1
    if refs is not None and t not in _PLAIN:
        refs.append(v)
        return {"t": "ref", "v": len(refs) - 1, "k": _kind(v)}
    enc = (lambda x: _encode(x, d, refs=refs))  # noqa: E731
    if v is None or t is bool or t is str:
        return v
    if t is int:
        return v if -(1 << 53) < v < (1 << 53) else {"t": "i", "v": hexs(v, "x")}
    if t is float:
        return v
    if t is list:
        return [enc(x) for x in v]
    if t is tuple:
        return {"t": "t", "v": [enc(x) for x in v]}
    if t is dict or t is collections.OrderedDict or t is collections.Counter:
        tag = "d" if t is dict else "od" if t is collections.OrderedDict else "C"
        return {"t": tag, "v": [[enc(k), enc(x)] for k, x in v.items()]}
    if t is collections.defaultdict:
        f = v.default_factory
        name = f.__name__ if f is not None and _FACTORIES.get(f.__name__) is f else None
        return {"t": "dd", "f": name, "v": [[enc(k), enc(x)] for k, x in v.items()]}
    if t is set or t is frozenset:
        return {"t": "s" if t is set else "fs", "v": [enc(x) for x in v]}
    if t is bytes or t is bytearray:
        return {"t": "b" if t is bytes else "ba", "v": v.hex()}
    if t is complex:
        return {"t": "c", "v": [v.real, v.imag]}
    if t is range:
        return {"t": "r", "v": [v.start, v.stop, v.step]}
    if t is collections.deque:
        return {"t": "q", "m": v.maxlen, "v": [enc(x) for x in v]}
    if t in _REF_TYPES:
        return {"t": "ref", "v": v.id}
    raise TypeError(t.__name__)


_REF_TYPES = frozenset(_REFS.values())
_PLAIN = frozenset({type(None), bool, str, int, float, list, tuple, dict, set, frozenset, bytes,
                    bytearray, complex, range, collections.OrderedDict, collections.Counter,
                    collections.defaultdict, collections.deque})
_MUTABLE = frozenset({list, dict, set, bytearray, collections.OrderedDict, collections.Counter,
                      collections.defaultdict, collections.deque})


def _decode(v, refs, depth=0, channel=None):
    """Builds fresh objects of exact builtin types from parsed JSON; anything unexpected
    raises. `refs`: list to resolve handles in (candidate side) or None (checker side, where
    a handle becomes a Ref of its kind bound to `channel`)."""
    if depth > MAX_DEPTH:
        raise ValueError("too deep")
    t, d = type(v), depth + 1
    if v is None or t is bool or t is int or t is float or t is str:
        return v
    if t is list:
        return [_decode(x, refs, d, channel) for x in v]
    if t is not dict or type(v.get("t")) is not str:
        raise ValueError("bad value")
    tag, x = v["t"], v.get("v")
    if tag == "i" and type(x) is str and len(x) <= (MAX_MSG // 2):
        return int(x, 16)
    if tag in ("b", "ba") and type(x) is str:
        return (bytes if tag == "b" else bytearray).fromhex(x)
    if tag == "c" and type(x) is list and len(x) == 2 and all(type(y) in (int, float) for y in x):
        return complex(x[0], x[1])
    if tag == "r" and type(x) is list and len(x) == 3 and all(type(y) is int for y in x):
        return range(*x)
    if tag == "ref" and type(x) is int:
        if refs is None:
            return _REFS.get(v.get("k"), Ref)(x, channel)
        return refs[x]  # IndexError on a bad handle
    if type(x) is not list:
        raise ValueError("bad value")
    if tag in ("d", "od", "C", "dd"):
        items = []
        for kv in x:
            if type(kv) is not list or len(kv) != 2:
                raise ValueError("bad item")
            items.append((_decode(kv[0], refs, d, channel), _decode(kv[1], refs, d, channel)))
        if tag == "dd":
            f = v.get("f")
            return collections.defaultdict(_FACTORIES[f] if f is not None else None, items)
        if tag == "C":
            return collections.Counter(dict(items))  # Counter(pairs) would count the pairs
        return (dict if tag == "d" else collections.OrderedDict)(items)
    items = [_decode(y, refs, d, channel) for y in x]
    if tag == "t":
        return tuple(items)
    if tag == "s":
        return set(items)
    if tag == "fs":
        return frozenset(items)
    if tag == "q":
        m = v.get("m")
        if m is not None and type(m) is not int:
            raise ValueError("bad maxlen")
        return collections.deque(items, m)
    raise ValueError("bad tag")


def _send(fd: int, obj, dumps=json.dumps, pack=struct.pack, write=os.write) -> None:
    data = dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_MSG:
        raise ValueError("message too large")
    data = pack(">I", len(data)) + data
    while data:
        data = data[write(fd, data):]


def _recv(fd: int, read=os.read):
    """One framed message, or None on EOF. Raises on an oversized frame."""
    buf = b""
    while len(buf) < 4:
        chunk = read(fd, 4 - len(buf))
        if not chunk:
            return None
        buf += chunk
    n = struct.unpack(">I", buf)[0]
    if n > MAX_MSG:
        raise ValueError("message too large")
    parts, left = [], n
    while left:
        chunk = read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return json.loads(b"".join(parts))


# ---------------------------------------------------------------- candidate process
def _reason(e, isinstance=isinstance, table=(
        (AssertionError, "wrong_answer"), (MemoryError, "memory"), (SyntaxError, "syntax_error"),
        (SystemExit, "exited_early"), (OSError, "os_error"))):
    for cls, reason in table:
        if isinstance(e, cls):
            if reason == "os_error":
                full = (errno.EFBIG, errno.ENOSPC, errno.EDQUOT)
                return "file_size" if e.errno in full else "crash"
            return reason
    return "crash"


def _builtin_base(e) -> str:
    """Name of the nearest builtin exception class of `e` (a candidate's own
    `class E(ValueError)` travels as ValueError)."""
    for cls in type(e).__mro__:
        if getattr(builtins, cls.__name__, None) is cls:
            return cls.__name__
    return "Exception"


def _candidate(header: dict, call_r: int, call_w: int, exit_=os._exit, callable=callable,
               isinstance=isinstance, type=type, str=str, getattr=getattr, encode=_encode,
               decode=_decode, send=_send, recv=_recv, reason=_reason) -> None:
    """Runs the candidate's code, then answers calls until the checker hangs up. Nothing
    here is trusted: whatever it sends, the checker only ever gets plain data from it. (The
    builtins and helpers are bound at import only so that a candidate that patches them
    still gets an accurate failure reason.)"""
    os.environ.clear()  # started with env={}, but CPython's C-locale coercion adds LC_CTYPE
    try:
        _confine_candidate()
    except OSError as e:
        _send(call_w, {"err": "sandbox_error", "msg": str(e)})
        exit_(1)
    try:
        code = compile(header["src"], "<candidate>", "exec")
        # "__candidate__", not "__main__": demo blocks under `if __name__ == "__main__"`
        # often call input() or print a lot, and are not part of the solution.
        ns = {"__name__": "__candidate__", "__builtins__": builtins}
        entries = header["entries"]
        exec(code, ns)
        if header.get("setup_src"):  # MBPP's test_setup_code: after the solution, as in one
            exec(compile(header["setup_src"], "<setup>", "exec"), ns)  # process
    except SystemExit:
        exit_(0)  # the checker sees EOF, the zygote an exit status of 0: exited_early
    except BaseException as e:
        send(call_w, {"err": reason(e)})
        exit_(1)
    fns = {}
    for name in entries:
        fn = ns.get(name)
        if callable(fn):
            fns[name] = (fn, isinstance(fn, type))
    refs = []
    ready = {"ready": {n: "c" if cls else "f" for n, (_, cls) in fns.items()}}
    if header.get("setup_src"):  # what the setup bound, as plain data or handles
        try:
            ready["setup"] = {k: encode(ns[k], refs=refs) for k in header["setup_names"]
                              if k in ns}
        except (TypeError, ValueError, RecursionError):
            send(call_w, {"bad": "?"})
            exit_(1)
    send(call_w, ready)
    while True:
        msg = recv(call_r)
        if msg is None:
            exit_(0)
        args = decode(msg["a"], refs)
        kwargs = {k: decode(x, refs) for k, x in msg["k"]}
        op, cls = msg.get("op"), False
        try:
            if op is None:  # a call of an entry by name
                fn, cls = fns[msg["n"]]
                out = fn(*args, **kwargs)
            else:  # on an object the checker holds a handle to
                target = refs[msg["h"]]
                if op == "call":
                    out = target(*args, **kwargs)
                elif op == "next":
                    try:
                        out = next(target)
                    except StopIteration:  # the iterator's own end: not an exception
                        send(call_w, {"stop": 1})
                        continue
                elif op == "iter":
                    out = iter(target)
                else:
                    out = getattr(target, str(msg["attr"]))
        except SystemExit:
            exit_(0)
        except BaseException as e:
            try:
                text = str(e)[:2000]
            except BaseException:
                text = ""
            eno = getattr(e, "errno", None) if isinstance(e, OSError) else None
            send(call_w, {"x": _builtin_base(e), "m": text,
                          "e": eno if type(eno) is int else None})
            continue
        try:
            # arguments changed in place go back, for the checker to change its own
            changed = []
            for i, (sent, value) in enumerate(zip(msg["a"], args)):
                if type(value) in _MUTABLE:
                    now = encode(value, refs=refs)
                    if now != sent:
                        changed.append([i, now])
            for k, x in msg["k"]:
                if type(kwargs[k]) in _MUTABLE:
                    now = encode(kwargs[k], refs=refs)
                    if now != x:
                        changed.append([k, now])
            if cls:  # a candidate class's instance: always a handle
                refs.append(out)
                reply = {"v": {"t": "ref", "v": len(refs) - 1, "k": _kind(out)}}
            else:
                reply = {"v": encode(out, refs=refs)}  # objects of other types: handles
            if changed:
                reply["m"] = changed
            send(call_w, reply)  # raises before writing if too big
        except MemoryError:
            send(call_w, {"err": "memory"})
        except (TypeError, ValueError, RecursionError):
            send(call_w, {"bad": "?"})


# ---------------------------------------------------------------- checker process
class _Fatal(BaseException):
    """The candidate process broke the call protocol, returned a non-plain object, or left.
    A BaseException, and remembered: a test's `except Exception` (or bare except) that
    swallows it does not turn the run into a pass."""


class CandidateError(Exception):
    """An exception the candidate raised whose type is not a builtin one."""


_EXCEPTIONS = {n: c for n, c in vars(builtins).items()
               if isinstance(c, type) and issubclass(c, Exception)}


class _Channel:
    def __init__(self, req_w: int, resp_r: int):
        self.req_w, self.resp_r, self.fatal = req_w, resp_r, None

    def fail(self, reason: str):
        if self.fatal is None:
            self.fatal = reason
        raise _Fatal(self.fatal)

    def recv(self):
        try:
            msg = _recv(self.resp_r)
        except MemoryError:
            self.fail("memory")
        except Exception:
            msg = None
        if type(msg) is not dict:
            self.fail("lost")  # EOF or garbage: the zygote reads the candidate's status
        return msg

    def call(self, name: str, args: tuple, kwargs: dict):
        return self._request({"n": name}, args, kwargs)

    def op(self, ref: "Ref", op: str, attr: str | None = None, args=(), kwargs=None):
        """A request on a handle: getattr, call, iter or next (StopIteration at its end)."""
        return self._request({"h": ref.id, "op": op, "attr": attr}, args, kwargs or {},
                             stop=op == "next")

    def _request(self, head: dict, args: tuple, kwargs: dict, stop: bool = False):
        if self.fatal is not None:
            raise _Fatal(self.fatal)
        try:
            req = {**head, "a": _encode(list(args)),
                   "k": [[k, _encode(v)] for k, v in kwargs.items()]}
        except Exception:
            self.fail("unsupported_argument")
        try:
            _send(self.req_w, req)
        except OSError:
            self.fail("lost")
        msg = self.recv()
        if stop and msg.get("stop") == 1:
            raise StopIteration
        if "v" in msg:
            try:
                out = _decode(msg["v"], None, channel=self)
                for where, value in msg.get("m") or ():
                    self._update(args[where] if type(where) is int else kwargs[where],
                                 _decode(value, None, channel=self))
                return out
            except MemoryError:
                self.fail("memory")
            except Exception:
                self.fail("lost")
        if "bad" in msg:
            self.fail("bad_return_type")
        if "err" in msg:
            self.fail(msg["err"] if msg["err"] in REASONS else "crash")
        if "x" in msg:
            name, text, eno = msg["x"], str(msg.get("m", "")), msg.get("e")
            if name in ("StopIteration", "StopAsyncIteration", "GeneratorExit"):
                # a candidate's StopIteration must not end the test's own loop (map, all,
                # a for over a generator): it becomes an error, as PEP 479 does in generators
                raise RuntimeError(f"the candidate raised {name}: {text}")
            cls = _EXCEPTIONS.get(name)
            try:
                if cls is None:
                    exc = CandidateError(f"{name}: {text}")
                elif type(eno) is int and issubclass(cls, OSError):
                    exc = cls(eno, text)
                else:
                    exc = cls(text)
            except Exception:
                exc = CandidateError(f"{name}: {text}")
            raise exc
        self.fail("lost")

    @staticmethod
    def _update(mine, new) -> None:
        """An argument the candidate changed in place: the test's own object changes too."""
        t = type(mine)
        if t is not type(new) or t not in _MUTABLE:
            raise ValueError("not the argument's type")
        if t is list or t is bytearray:
            mine[:] = new
        elif t is collections.deque:
            mine.clear()
            mine.extend(new)
        else:  # dicts and sets
            mine.clear()
            mine.update(new)
            if t is collections.defaultdict:
                mine.default_factory = new.default_factory


def _proxy(channel: _Channel, name: str):
    def proxy(*args, **kwargs):
        return channel.call(name, args, kwargs)
    proxy.__name__ = proxy.__qualname__ = name
    return proxy


def _checker(part_fd: int, req_w: int, resp_r: int, verdict_fd: int, header: dict) -> None:
    """Runs the dataset's test code against proxies; writes b"P" (every test passed),
    b"E:reason" or b"C" (the candidate process went away: the zygote knows why). Never runs
    candidate code: what comes from it is decoded into fresh builtin objects."""
    chunks = []
    while True:
        chunk = os.read(part_fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(part_fd)
    part = json.loads(b"".join(chunks))
    del chunks
    try:
        _confine_checker()
    except OSError as e:
        os.write(verdict_fd, b"E:sandbox_error " + str(e).encode())
        return
    channel = _Channel(req_w, resp_r)
    ns = {"__name__": "__checker__"}
    try:
        if part["setup"]:  # HumanEval's prompt: optional, a prompt may not run on its own
            try:
                exec(compile(part["setup"], "<setup>", "exec"), ns)
            except Exception:
                pass
        tree = ast.parse(part["tests"], "<tests>")
        tests = compile(tree, "<tests>", "exec")
        # names the test code binds itself (imports, setup code's defs): never proxied
        bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                 and isinstance(n.ctx, ast.Store)}
        bound |= {n.name for n in ast.walk(tree)
                  if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        bound |= {(a.asname or a.name).split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        ready = channel.recv()
        if "err" in ready:
            channel.fail(ready["err"] if ready["err"] in REASONS else "crash")
        kinds = ready.get("ready")
        if type(kinds) is not dict:
            channel.fail("lost")
        override, targets = set(header["override"]), set(header.get("targets") or ())
        for name in header["entries"]:
            if name in override:
                ns.pop(name, None)
            elif name in bound or hasattr(builtins, name) and name not in targets:
                continue  # the tests' own definition, or a builtin: never the candidate's
            if name in kinds:
                ns[name] = _proxy(channel, name)
        setup = ready.get("setup") or {}
        for name in header.get("setup_names") or ():  # only the names the setup code binds
            if name in setup and name not in bound:
                try:
                    ns[name] = _decode(setup[name], None, channel=channel)
                except Exception:
                    channel.fail("lost")
        exec(tests, ns)
    except _Fatal:
        pass
    except BaseException as e:
        if channel.fatal is None:
            os.write(verdict_fd, b"E:" + _reason(e).encode())
            return
    if channel.fatal == "lost":
        os.write(verdict_fd, b"C")
    elif channel.fatal is not None:
        os.write(verdict_fd, b"E:" + channel.fatal.encode())
    else:
        os.write(verdict_fd, b"P")


# ---------------------------------------------------------------- zygote
def _sweep(uid: int, reap: bool = True) -> None:
    """SIGKILL every process of `uid` (the candidate's tree, setsid() or not), then reap."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(uid)
            for _ in range(10):  # kill(-1) spares only the caller; ESRCH: none left
                os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        os._exit(0)
    os.waitpid(pid, 0)
    while reap:  # orphans were re-parented to us (child subreaper); all are SIGKILLed
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _high(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD, 64)  # above every target of the dup2s below


def _fork(fds: list[int], body) -> int:
    """Forks a child whose fds 0-2 are /dev/null and 3, 4, ... are `fds`, nothing else."""
    pid = os.fork()
    if pid == 0:
        try:
            high = [_high(fd) for fd in fds]
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # 0/1 are the zygote's protocol pipes: the child must not speak
                os.dup2(null, fd)
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i)
            os.closerange(3 + len(fds), 1 << 16)
            os.setpgid(0, 0)
            body(*range(3, 3 + len(fds)))
        finally:  # never fall back into the zygote's loop
            os._exit(1)
    try:
        os.setpgid(pid, pid)  # also here: no race with a kill before the child ran setpgid
    except OSError:
        pass
    return pid


def _read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _splice(src: int, dst: int, n: int) -> None:
    """Moves n bytes from the stdin pipe to `dst` inside the kernel: this process never
    holds them. If the reader is gone, the rest goes to /dev/null, so the stream stays in
    step with the next request."""
    null = None
    while n:
        try:
            moved = os.splice(src, dst if null is None else null, n)
        except BrokenPipeError:
            null = os.open(os.devnull, os.O_WRONLY)
            continue
        if moved == 0:
            raise EOFError
        n -= moved
    if null is not None:
        os.close(null)


def _status_reason(status: int, usage) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL
                                     and usage.ru_utime + usage.ru_stime >= CFG["cpu_s"]):
            return "cpu_time"
        return "file_size" if sig == signal.SIGXFSZ else "crash"
    exited_zero = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return "exited_early" if exited_zero else "crash"


def _run(header: dict, tests_len: int) -> dict:
    call_r, call_w = os.pipe()  # checker -> candidate
    resp_r, resp_w = os.pipe()  # candidate -> checker
    cpid = _fork([call_r, resp_w], lambda r, w: _candidate(header, r, w))
    os.close(call_r)
    os.close(resp_w)
    # made after the candidate was forked: it never held them
    part_r, part_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    kpid = _fork([part_r, call_w, resp_r, verdict_w],
                 lambda p, w, r, v: _checker(p, w, r, v, header) or os._exit(0))
    for fd in (call_w, resp_r, part_r, verdict_w):
        os.close(fd)
    _splice(0, part_w, tests_len)
    os.close(part_w)
    cfd = os.pidfd_open(cpid)
    ooms = _oom_kills()
    deadline = time.monotonic() + CFG["wall_s"]
    timed_out, c_dead = False, False
    while True:  # the verdict pipe turns readable when the checker wrote to it or exited
        left = deadline - time.monotonic()
        ready = select.select([verdict_r] + ([] if c_dead else [cfd]), [], [], max(left, 0))[0]
        if verdict_r in ready:
            break
        if cfd in ready:  # the candidate left: its children may still hold the pipe to the
            c_dead = True  # checker open, so kill them all for the checker to see EOF
            _sweep(CFG["uid"], reap=False)
            continue
        timed_out = True
        break
    os.set_blocking(verdict_r, False)
    try:  # one write of at most a few bytes, and only the checker holds the write end
        verdict = os.read(verdict_r, 4096)
    except BlockingIOError:
        verdict = b""
    os.close(verdict_r)
    if verdict == b"C" and not c_dead:  # garbage on the pipe, or it exits right now
        select.select([cfd], [], [], min(1.0, max(deadline - time.monotonic(), 0)))
    os.close(cfd)
    for pid in (kpid, cpid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    # (cpid is the relay, root, which never leaves its group: killpg always reaches it, and
    # its death takes the candidate's PID namespace, whatever groups the candidate made)
    if verdict not in (b"P", b"C") and not verdict.startswith(b"E:"):
        _, kstatus, _ = os.wait4(kpid, 0)  # no verdict: timed out or died; why?
    # else the checker (no forks: RLIMIT_NPROC 1) is torn down while the candidate's
    # processes are reaped and swept; the sweep's reaping waits for it too
    _, cstatus, cusage = os.wait4(cpid, 0)
    _sweep(CFG["uid"])  # and reaps every child, the checker included
    if _oom_kills() > ooms:  # over its memory, in any of its processes: not a pass
        return {"score": 0.0, "reason": "memory"}
    if timed_out:
        return {"score": 0.0, "reason": "timeout"}
    if verdict == b"P":
        return {"score": 1.0, "reason": "ok"}
    if verdict.startswith(b"E:"):
        return {"score": 0.0, "reason": verdict[2:].decode(errors="replace")}
    if verdict == b"C":
        return {"score": 0.0, "reason": _status_reason(cstatus, cusage)}
    if os.WIFSIGNALED(kstatus) and os.WTERMSIG(kstatus) == signal.SIGXCPU:
        return {"score": 0.0, "reason": "cpu_time"}
    return {"score": 0.0, "reason": "checker_error"}


def main() -> None:
    _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    _setup_cgroup()
    _sweep(CFG["uid"])  # leftovers of a predecessor that was killed mid-candidate
    _sweep(CFG["checker_uid"])
    while True:
        line = b""  # "HEADER_LEN TESTS_LEN\n", read byte by byte: no read-ahead into the tests
        while not line.endswith(b"\n"):
            c = os.read(0, 1)
            if not c:
                return
            line += c
        header_len, tests_len = map(int, line.split())
        header = json.loads(_read_exact(0, header_len))
        reply = _run(header, tests_len)
        reply["cgroup"] = CGROUP is not None  # code.py warns once when it is not
        os.write(1, (json.dumps(reply) + "\n").encode())


if __name__ == "__main__":
    main()

"""Code-reward sandbox zygote: one per pool slot, started by code.py as
`python -I -S -B _sandbox.py CONFIG_JSON` with an EMPTY environment, as root.

Standalone on purpose (stdlib only, no score_fast import): candidates are forked from this
process and inherit its memory, so it must hold nothing worth stealing. It pre-imports the
modules candidates commonly use once (a fresh `python -I -S` plus those imports costs ~80 ms a
candidate on the 2-core CI machine, a fork ~1 ms), then answers one JSON request per stdin
line: {"src", "tests", "entries"} -> {"score", "reason"}.

Per candidate, the forked child, still root: new process group, stdio on /dev/null, every
other fd closed; new network namespace (no interface but a down loopback: connect() fails)
and mount namespace with a private tmpfs (size-capped, owned by the slot uid, mode 0700) as
its working directory; rlimits (address space, CPU seconds, process count, file size, open
files, no core dumps); then setgroups([])/setgid/setuid to the slot's own unprivileged uid,
no_new_privs, and a Landlock domain that allows writing only in the tmpfs, reading only
there and in the stdlib, no execve, no TCP, no signals or abstract sockets outside the
domain. Then it runs the candidate and the tests in one namespace.

Pass/fail is decided here, not by the child's exit code or output: after the tests return
the child reads a 16-byte nonce from a pipe this zygote fills only after fork, and copies it
to the result pipe. sys.exit/os._exit/a printed marker before the tests end yields no nonce.
The zygote enforces the wall clock (pidfd + select), then SIGKILLs the group and every
process of the slot uid (kill(-1) from a helper running as that uid, which also catches
setsid() escapees), reaping them as child subreaper."""
import builtins
import collections
import ctypes
import errno
import json
import os
import resource
import select
import signal
import struct
import sys

CFG = json.loads(sys.argv[1])
for _name in CFG["preload"]:
    try:
        __import__(_name)
    except ImportError:
        pass

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
# Landlock syscalls share these numbers on every architecture (added after the 5.x unification).
LL_CREATE, LL_ADD_RULE, LL_RESTRICT = 444, 445, 446
# Exact types a tested function may return: an object of any other type could define
# __eq__ to return True and pass `assert f(x) == y` without computing anything.
PLAIN = {type(None), bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set,
         frozenset, range, collections.OrderedDict, collections.defaultdict,
         collections.Counter, collections.deque}


def _check(ok: int, what: str) -> None:
    if ok != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _landlock(rw_dir: str, ro_dirs: list[str]) -> None:
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
    for path, access in [(rw_dir, fs & ~1)] + [(d, read) for d in ro_dirs]:
        try:
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
        except OSError:
            continue
        _check(libc.syscall(LL_ADD_RULE, ruleset, 1, struct.pack("=Qi", access, fd), 0),
               f"landlock_add_rule {path}")
        os.close(fd)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(libc.syscall(LL_RESTRICT, ruleset, 0), "landlock_restrict_self")


def _confine() -> None:
    uid, workdir = CFG["uid"], CFG["workdir"]
    _check(libc.unshare(CLONE_NEWNET | CLONE_NEWNS), "unshare")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    opts = f"size={CFG['disk_mb']}m,mode=0700,uid={uid},gid={uid}".encode()
    _check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts),
           "mount tmpfs")
    os.chdir(workdir)
    mb = 1 << 20
    for res, soft, hard in [
        (resource.RLIMIT_AS, CFG["memory_mb"] * mb, CFG["memory_mb"] * mb),
        # soft -> SIGXCPU, hard -> SIGKILL one second later if SIGXCPU is ignored
        (resource.RLIMIT_CPU, CFG["cpu_s"], CFG["cpu_s"] + 1),
        (resource.RLIMIT_NPROC, CFG["nproc"], CFG["nproc"]),
        (resource.RLIMIT_FSIZE, CFG["file_size_mb"] * mb, CFG["file_size_mb"] * mb),
        (resource.RLIMIT_NOFILE, CFG["open_files"], CFG["open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ]:
        resource.setrlimit(res, (soft, hard))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)  # root ignores RLIMIT_NPROC; this uid is the slot's alone, so it holds
    _landlock(workdir, CFG["read_dirs"])
    # after setuid: a credential change clears it. Dies with the zygote.
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")


# Code that runs after the candidate (it shares this interpreter) takes every builtin and
# helper it needs as a default argument, bound when this file was imported: a candidate that
# replaces builtins.type, builtins.AssertionError, os.write or this module's globals
# (`import __main__`) cannot change what the harness calls.
def _plain(value, plain=PLAIN, type=type, seqs=(list, tuple, set, frozenset, collections.deque),
           dicts=(dict, collections.OrderedDict, collections.defaultdict, collections.Counter),
           keys=dict.keys, values=dict.values):
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t not in plain:
            return False
        if t in dicts:
            stack.extend(keys(v))
            stack.extend(values(v))
        elif t in seqs:
            stack.extend(v)
    return True


class BadReturn(Exception):
    pass


def _guard(fn, plain=_plain, bad=BadReturn, type=type):
    def guarded(*args, **kwargs):
        out = fn(*args, **kwargs)
        if not plain(out):
            raise bad(type(out).__name__)
        return out
    return guarded


def _reason(e, isinstance=isinstance, table=(
        (AssertionError, "wrong_answer"), (MemoryError, "memory"), (SyntaxError, "syntax_error"),
        (SystemExit, "exited_early"), (BadReturn, "bad_return_type"), (OSError, "os_error"))):
    for cls, reason in table:
        if isinstance(e, cls):
            if reason == "os_error":
                return "file_size" if e.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT) else "crash"
            return reason
    return "crash"


def _child(req: dict, result_fd: int, nonce_fd: int, read=os.read, write=os.write,
           exit_=os._exit, compile_=compile, exec_=exec, settrace=sys.settrace,
           setprofile=sys.setprofile, callable_=callable, isinstance_=isinstance, type_=type,
           base_exception=BaseException, guard=_guard, reason=_reason) -> None:
    clean_builtins = dict(builtins.__dict__)
    os.environ.clear()  # started with env={}, but CPython's C-locale coercion adds LC_CTYPE
    try:
        _confine()
    except OSError as e:
        write(result_fd, f"E:sandbox_error {e}".encode())
        exit_(1)
    try:
        code = compile_(req["src"], "<candidate>", "exec")
        tests = compile_(req["tests"], "<tests>", "exec")
        # "__candidate__", not "__main__": demo blocks under `if __name__ == "__main__"`
        # often call input() or print a lot, and are not part of the solution.
        ns = {"__name__": "__candidate__", "__builtins__": builtins}
        exec_(code, ns)
        for name in req["entries"]:
            fn = ns.get(name)
            if callable_(fn) and not isinstance_(fn, type_):
                ns[name] = guard(fn)
        settrace(None)  # a trace function can jump over assert lines
        setprofile(None)
        ns["__builtins__"] = clean_builtins  # tests resolve abs/len/... unpatched
        exec_(tests, ns)
    except base_exception as e:  # every way out is a failure with a reason
        try:
            write(result_fd, b"E:" + reason(e).encode())
        finally:
            exit_(1)
    write(result_fd, read(nonce_fd, 64))
    exit_(0)


def _sweep(uid: int) -> None:
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
    while True:  # orphans were re-parented to us (child subreaper); all are SIGKILLed
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _run(req: dict) -> dict:
    result_r, result_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_RDWR)
        res, non = os.dup(result_w), os.dup(nonce_r)
        for fd in (0, 1, 2):  # 0/1 are the zygote's protocol pipes: the child must not speak
            os.dup2(null, fd)
        os.dup2(res, 3)
        os.dup2(non, 4)
        os.closerange(5, 1 << 16)
        try:
            os.setpgid(0, 0)
            _child(req, 3, 4)
        finally:  # never fall back into the zygote's loop
            os._exit(1)
    try:
        os.setpgid(pid, pid)  # also here: no race with a kill before the child ran setpgid
    except OSError:
        pass
    os.close(result_w)
    os.close(nonce_r)
    nonce = os.urandom(16).hex().encode()  # made after fork: the child's memory never held it
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    pidfd = os.pidfd_open(pid)
    timed_out = not select.select([pidfd], [], [], CFG["wall_s"])[0]
    os.close(pidfd)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    _, status, usage = os.wait4(pid, 0)
    _sweep(CFG["uid"])
    os.set_blocking(result_r, False)
    try:
        data = os.read(result_r, 4096)  # every writer is dead: what's there is all there is
    except BlockingIOError:
        data = b""
    os.close(result_r)
    if timed_out:
        return {"score": 0.0, "reason": "timeout"}
    if data == nonce and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return {"score": 1.0, "reason": "ok"}
    if data.startswith(b"E:"):
        return {"score": 0.0, "reason": data[2:].decode(errors="replace")}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL
                                     and usage.ru_utime + usage.ru_stime >= CFG["cpu_s"]):
            return {"score": 0.0, "reason": "cpu_time"}
        return {"score": 0.0, "reason": "file_size" if sig == signal.SIGXFSZ else "crash"}
    exited_zero = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return {"score": 0.0, "reason": "exited_early" if exited_zero else "crash"}


def main() -> None:
    _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    _sweep(CFG["uid"])  # leftovers of a predecessor that was killed mid-candidate
    for line in sys.stdin.buffer:
        reply = _run(json.loads(line))
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

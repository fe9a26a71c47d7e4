"""A bounded pool of long-lived worker processes that answer one JSON line per request.

Math and code rewards both need the same thing: isolate work that can hang or crash in a
child process, bound how many run at once, and never let a stuck item block the batch. A
worker that misses its deadline or dies is SIGKILLed (with its process group) and replaced
lazily; the item gets reason "timeout" (worker alive but late) or "crash" (worker died)."""
from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence


class _Worker:
    def __init__(self, argv: list[str], env: dict[str, str]):
        # New session: the kill on a missed deadline takes the worker's whole group.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, start_new_session=True)

    def call(self, request: dict | bytes, timeout: float) -> dict | str:
        """`request`: a dict sent as one JSON line, or bytes sent as they are (a worker with
        its own framing, like the code sandbox's). Returns the reply, or "timeout" (no reply
        in time) or "crash" (EOF, broken pipe, garbage). Decided from the pipe, not from
        poll(): a worker that just closed its stdout may not be reaped yet."""
        try:
            data = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                return "timeout"
            line = self.proc.stdout.readline()
            return json.loads(line) if line else "crash"
        except (OSError, ValueError):  # broken pipe (worker died), garbage reply
            return "crash"

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class WorkerPool:
    """`size` worker slots; `spawn(slot)` gives (argv, env) of the worker for that slot (the
    code sandbox maps slot -> its own uid). Workers start on first use and live until close()."""

    def __init__(self, size: int, spawn: Callable[[int], tuple[list[str], dict[str, str]]]):
        self.size, self._spawn = size, spawn
        self._workers: list[_Worker | None] = [None] * size
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(size):
            self._free.put(slot)
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="score_fast_reward")
        self._lock = threading.Lock()

    def _one(self, request: dict | bytes, timeout: float) -> dict:
        slot = self._free.get()
        try:
            worker = self._workers[slot]
            if worker is None or worker.proc.poll() is not None:
                worker = self._workers[slot] = _Worker(*self._spawn(slot))
            reply = worker.call(request, timeout)
            if isinstance(reply, str):  # missed its deadline or died: never reuse it
                worker.kill()
                self._workers[slot] = None
                reply = {"score": 0.0, "reason": reply}
            return reply
        finally:
            self._free.put(slot)

    def map(self, requests: Sequence[dict | bytes], timeout: float) -> list[dict]:
        return list(self._executor.map(lambda r: self._one(r, timeout), requests))

    def close(self) -> None:
        with self._lock:
            self._executor.shutdown(wait=True)
            for i, w in enumerate(self._workers):
                if w is not None:
                    w.kill()
                    self._workers[i] = None

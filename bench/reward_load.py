"""The code reward under load (issue 18): 2,000 mixed candidates in one evaluate() call --
correct, wrong and hostile -- candidates/s, peak memory of the sandbox's processes, and
what is left after.

    python bench/reward_load.py [N]          # N candidates (default 2000)

The mix, in a fixed shuffled order: 60% correct, 25% wrong (wrong value, exception,
syntax error), 15% hostile, each of: a CPU loop, a 50 GB allocation, 768 MB of memfd
pages, a fork bomb, a forked sleeper in its own session, a StopIteration, an object equal
to everything. Limits: wall_s 2, cpu_s 1, memory_mb 512, two workers (this machine's
cores). Peak memory: the largest sum of resident memory over the zygotes and every
process of the slots' uids, sampled every 50 ms."""
import random
import sys
import threading
import time

from score_fast.rewards import CodeReward, CodeRewardConfig
from score_fast.rewards.code import live_processes

ROW = {"test_list": [
    "assert all(map(lambda t: add(*t[0]) == t[1], [((1, 2), 3), ((2, 2), 4)]))",
    "assert add(-1, 1) == 0"]}
GOOD = "def add(a, b):\n    return a + b\n"
MIX = [(60, [GOOD,
             "def add(a, b):\n    s = 0\n    for x in (a, b):\n        s += x\n    return s\n"]),
       (25, ["def add(a, b):\n    return a - b\n", "def add(a, b):\n    return [][1]\n",
             "def add(a, b:\n"]),
       (15, ["while True:\n    pass\n", "x = bytearray(50 << 30)\n" + GOOD,
             "import os\nc = b'x' * (16 << 20)\n"
             "for fd in [os.memfd_create('m') for _ in range(48)]:\n    os.write(fd, c)\n" + GOOD,
             "import os\nwhile True:\n    os.fork()\n",
             "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\n" + GOOD,
             "def add(a, b):\n    raise StopIteration\n",
             "class E:\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    return E()\n"])]


def main(n: int = 2000) -> None:
    rng = random.Random(0)
    srcs = []
    for share, kinds in MIX:
        srcs += [kinds[i % len(kinds)] for i in range(n * share // 100)]
    srcs += [GOOD] * (n - len(srcs))
    rng.shuffle(srcs)
    r = CodeReward(CodeRewardConfig(workers=2, wall_s=2.0, cpu_s=1, memory_mb=512))
    uids = range(r._uid0, r._uid0 + 1024)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            zyg = [w.proc.pid for w in (r._pool._workers if r._pool else []) if w]
            peak[0] = max(peak[0], sum(kb for _, kb in live_processes(uids, zyg)))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    res = r.evaluate(srcs, [ROW] * n)
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    r.close()
    time.sleep(0.5)
    left = live_processes(uids)
    ok = sum(s > 0 for s, src in zip(res.scores, srcs))
    right = sum(s > 0 for s, src in zip(res.scores, srcs) if src in MIX[0][1])
    print(f"| {n} | {dt:.1f} | {n / dt:.1f} | {ok} scored 1 ({right} of "
          f"{sum(src in MIX[0][1] for src in srcs)} correct) | {peak[0] / 1024:.0f} | "
          f"{len(left)} |")
    print("reasons:", dict(sorted(res.failures().items())))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)

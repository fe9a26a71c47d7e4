"""Reward throughput: candidates checked per second with the default pool (os.cpu_count()
workers), and the cost per candidate, side by side with the unisolated way of doing it.

    bash bench/run.sh bench/bench_rewards.py

math: MathReward (worker processes, hard timeouts) vs `inline`: math-verify called in this
      process's main thread with its signal timeouts (no isolation, no parallelism).
code: CodeReward (sandbox: forked from a zygote into namespaces, rlimits, uid drop, Landlock)
      vs `subprocess`: a bare `python -I -S -c program` per candidate on a thread pool of the
      same size (no limits at all). Trivial passing programs, so this is the overhead.
extra_info: candidates_per_s = n / median batch time, ms_per_candidate = its inverse in ms.
Worker start (math-verify import ~1 s, zygote ~0.1 s) happens in the warm-up round."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import QUICK, run

N_MATH = [16] if QUICK else [256]
N_CODE = [8] if QUICK else [64]
PAPER = "Final Answer: The final answer is ${}$. I hope it is correct."
MATH_ITEMS = [(PAPER.format(r"\frac{%d}{4}" % i), str(i / 4)) for i in range(1, 9)] + [
    (r"so \boxed{(1, %d]}" % i, "(1,%d]" % i) for i in range(2, 6)] + [
    (PAPER.format(r"%d\%%" % i), str(i / 100)) for i in range(1, 5)]
GOOD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def _record(benchmark, n):
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(candidates_per_s=round(n / median, 1),
                                ms_per_candidate=round(1e3 * median / n, 3))


@pytest.mark.parametrize("n", N_MATH)
@pytest.mark.parametrize("provider", ["pool", "inline"])
def test_math(benchmark, provider, n):
    items = [MATH_ITEMS[i % len(MATH_ITEMS)] for i in range(n)]
    responses, rows = [r for r, _ in items], [{"answer": a} for _, a in items]
    if provider == "pool":
        from score_fast.rewards import MathReward
        reward = MathReward()
        fn = lambda: reward.score(responses, rows)  # noqa: E731
    else:
        from math_verify import parse, verify
        from score_fast.rewards.math import extract_answer
        fn = lambda: [float(verify(parse(f"${a}$"), parse(f"${extract_answer(r)}$")))  # noqa: E731
                      for r, a in items]
    try:
        assert fn() == [1.0] * n
        run(benchmark, fn, device="cpu", provider=provider, shape=f"n={n}", baseline="inline",
            rounds=3, workers=os.cpu_count() if provider == "pool" else 1)
        _record(benchmark, n)
    finally:
        if provider == "pool":
            reward.close()


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="sandbox needs root")
@pytest.mark.parametrize("n", N_CODE)
@pytest.mark.parametrize("provider", ["sandbox", "subprocess"])
def test_code(benchmark, provider, n):
    workers = os.cpu_count()
    if provider == "sandbox":
        from score_fast.rewards import CodeReward
        reward = CodeReward()
        fn = lambda: reward.score([GOOD] * n, [{"test_list": TESTS}] * n)  # noqa: E731
    else:
        program = GOOD + "\n".join(TESTS)
        pool = ThreadPoolExecutor(workers)

        def one(_):
            p = subprocess.run([sys.executable, "-I", "-S", "-c", program], env={},
                               capture_output=True, timeout=10)
            return float(p.returncode == 0)

        fn = lambda: list(pool.map(one, range(n)))  # noqa: E731
    try:
        assert fn() == [1.0] * n
        run(benchmark, fn, device="cpu", provider=provider, shape=f"n={n}",
            baseline="subprocess", rounds=3, workers=workers)
        _record(benchmark, n)
    finally:
        (reward.close() if provider == "sandbox" else pool.shutdown())

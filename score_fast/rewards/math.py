"""Math reward: 1 if the response's final answer equals the reference, by math-verify.

The answer is taken from, in order: the paper's format ("Final Answer: The final answer is
$X$. I hope it is correct."), the last \\boxed{...}/\\fbox{...} (nested braces), and "final
answer is X" without the closing sentence: a response that states no final answer gets 0
("no_answer"), as the paper's "final answer matches" checker gives. lenient=True (config:
reward.lenient_math) also takes the last plain number of such a response: not the paper's
checker, and it credits attempt-1 text that never commits to an answer (a trainer using it
says so when it starts). math-verify then compares the answer with the reference, so
1/2 = 0.5 = \\frac{1}{2} = \\dfrac12, 10\\% = 0.1, 1,000 = 1000, 5\\text{ cm} = 5, {1,2} = {2,1},
intervals, matrices and equations are handled.

Parsing can hang on hostile input (sympy expanding 2^{2^{2^{99}}}, regex backtracking), and
math-verify's own timeout uses SIGALRM, which only works in a main thread. So checks run in
a pool of worker processes, one check at a time each, in the worker's main thread: an alarm
there ends a slow check cheaply ("timeout"), and a check stuck where Python cannot interrupt
it (inside one long C call) is SIGKILLed by the parent at 2 x timeout_s + 5 s and the worker
replaced (also "timeout")."""
from __future__ import annotations

import os
import re
import signal
import sys
from dataclasses import dataclass
from typing import Mapping

from score_fast.rewards._pool import WorkerPool
from score_fast.rewards.base import OK, Reward, RewardResult


@dataclass
class MathRewardConfig:
    kind: str = "math"
    answer_field: str = "answer"  # the row field holding the reference answer
    # Per check (extract + parse + compare). A cold worker's first check costs ~0.3 s (sympy
    # caches); warm checks take 1-50 ms (0.3 s for polynomial identities) on the CI machine.
    timeout_s: float = 5.0
    workers: int = 0  # 0: os.cpu_count(). Each worker holds sympy: ~150 MB resident
    float_rounding: int = 6  # math-verify's default: 1/3 = 0.333333 but not 0.333
    lenient: bool = False  # also the last number of a response stating no answer (module doc)


# "final answer is $a$ (and|or|, $b$)*", else the rest of the sentence
_FINAL = re.compile(r"\s*(\$[^$]*\$(?:\s*(?:,|and|or)\s*\$[^$]*\$)*|.+?(?=\.\s|\.?$))", re.M)
# "\boxed{" / "\fbox{" (group 1: the brace), or MATH's rare "\boxed 5" (no brace)
_BOXED = re.compile(r"\\(?:boxed|fbox)\b\s*(\{)?")
_HOPE = re.compile(r"I hope it is correct", re.I)
_FINAL_IS = re.compile(r"final answer is", re.I)
_DOLLAR = re.compile(r"(?<!\\)\$")  # math delimiters, not an escaped \$ (currency)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def _last(pattern: re.Pattern, text: str, end: int) -> int:
    """Where the last match of `pattern` before `end` ends (-1: none); from _HOPE it is where
    the match starts, so the answer lies between the two."""
    m = None
    for m in pattern.finditer(text, 0, end):
        pass
    return -1 if m is None else (m.start() if pattern is _HOPE else m.end())


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} in `text`, braces balanced
    (\\boxed{\\frac{1}{2}} -> \\frac{1}{2}); a backslash-escaped brace (\\{ \\}) is content,
    not nesting, so \\boxed{\\left\\{1\\right.} closes where LaTeX closes it. MATH's brace-less
    "\\boxed 5$" gives the text up to the next $ or line end. None when there is no box or
    the last one is never closed (an earlier box is not used: the last one is the answer)."""
    m = None
    for m in _BOXED.finditer(text):
        pass
    if m is None:
        return None
    if m.group(1) is None:  # "\boxed 5": no brace
        rest = text[m.end():]
        return re.split(r"[$\n]", rest, maxsplit=1)[0].strip() or None
    depth, i = 1, m.end()
    while i < len(text):
        c = text[i]
        if c == "\\":  # skip the escaped character: \{ and \} do not nest
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth == 0:
            return text[m.end():i]
        i += 1
    return None


def extract_answer(response: str, lenient: bool = False) -> str | None:
    """The final answer in `response`, without $ delimiters, or None when it states none
    (lenient: or else its last plain number; module doc)."""
    # Last phrase positions, not a lazy regex from phrase to phrase: that is O(n^2) on a
    # response repeating "final answer is" (linear here; checked in the tests).
    hope = _last(_HOPE, response, len(response))
    final = _last(_FINAL_IS, response, len(response) if hope < 0 else hope)
    found = [response[final:hope]] if final >= 0 and hope >= 0 else []
    if not found:
        boxed = last_boxed(response)
        found = [] if boxed is None else [boxed]
    if not found and final >= 0:
        found = [_FINAL.match(response, final).group(1)]
    if not found and lenient:
        found = _NUMBER.findall(response)
    answer = _DOLLAR.sub("", found[-1].strip().rstrip(".")).strip() if found else ""
    return answer or None


class _Timeout(BaseException):
    """BaseException: math-verify and sympy catch Exception in many places; this must pass."""


def _check(request: dict) -> dict:
    from math_verify import parse, verify

    def alarm(signum, frame):
        raise _Timeout

    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, request["timeout_s"])
    try:
        answer = extract_answer(request["response"], request["lenient"])
        if answer is None:
            return {"score": 0.0, "reason": "no_answer"}
        gold = _DOLLAR.sub("", str(request["gold"])).strip()
        gold = gold if "\\boxed" in gold else f"${gold}$"
        # Timeouts off: they would set their own SIGALRM handler over ours.
        gold_parsed = parse(gold, parsing_timeout=None)
        if not gold_parsed:
            return {"score": 0.0, "reason": "bad_reference"}
        pred_parsed = parse(f"${answer}$", parsing_timeout=None)
        if not pred_parsed:
            return {"score": 0.0, "reason": "no_answer"}
        right = verify(gold_parsed, pred_parsed, float_rounding=request["float_rounding"],
                       timeout_seconds=None)
        return {"score": 1.0, "reason": OK} if right else {"score": 0.0, "reason": "wrong_answer"}
    except _Timeout:
        return {"score": 0.0, "reason": "timeout"}
    except Exception:  # noqa: BLE001 - a parser bug must not stop the batch
        return {"score": 0.0, "reason": "crash"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _serve() -> None:
    """Worker loop: one JSON request per stdin line, one reply per stdout line."""
    import json
    import logging

    logging.disable(logging.WARNING)  # math-verify warns that its timeouts are off: they are
    import math_verify  # noqa: F401 - imported before the first request: ~0.6 s

    out = sys.stdout
    for line in sys.stdin:
        out.write(json.dumps(_check(json.loads(line))) + "\n")
        out.flush()


class MathReward(Reward):
    def __init__(self, config: MathRewardConfig | None = None):
        self.config = config or MathRewardConfig()
        self._pool: WorkerPool | None = None

    def _spawn(self, slot: int):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        return [sys.executable, "-c", "from score_fast.rewards.math import _serve; _serve()"], env

    def _evaluate(self, responses: list[str], rows: list[Mapping]) -> RewardResult:
        c = self.config
        if self._pool is None:
            self._pool = WorkerPool(c.workers or os.cpu_count() or 1, self._spawn)
        requests = [{"response": r, "gold": row[c.answer_field], "timeout_s": c.timeout_s,
                     "float_rounding": c.float_rounding, "lenient": c.lenient}
                    for r, row in zip(responses, rows)]
        # The hard limit also covers a fresh worker's start (~1 s to import math-verify).
        replies = self._pool.map(requests, 2 * c.timeout_s + 5)
        return RewardResult([float(r["score"]) for r in replies], [r["reason"] for r in replies])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

"""Math reward: 1 if the response's final answer equals the reference, by math-verify.

The answer is taken from, in order: the paper's format ("Final Answer: The final answer is
$X$. I hope it is correct."), the last \\boxed{...}/\\fbox{...} (nested braces), and "final
answer is X" without the closing sentence: a response that states no final answer gets 0
("no_answer"), as the paper's "final answer matches" checker gives. lenient=True (config:
reward.lenient_math) also takes the last plain number of such a response: not the paper's
checker, and it credits attempt-1 text that never commits to an answer (a trainer using it
says so when it starts). math-verify then compares the answer with the reference, so
1/2 = 0.5 = \\frac{1}{2} = \\dfrac12, 10\\% = 0.1, 1,000 = 1000, 5\\text{ cm} = 5, {1,2} = {2,1},
intervals, matrices and equations are handled, within the rules of "what counts as equal"
below: a response stating two different final answers gets 0 ("hedged"), lists must have
the reference's number of items, percent is part of a value, and units that both sides
state must agree.

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

from score_fast.data import DataError
from score_fast.rewards.sandbox.pool import WorkerPool
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
    return None if m is None else _box_content(text, m)


def with_reference(row: Mapping, answer_field: str, where: str) -> Mapping:
    """`row` with its reference answer under `answer_field`: the field itself, or when it
    is missing or blank the last \\boxed{...} of `solution` (Hendrycks' MATH has no answer
    field; MATH500 has both), for training and evaluation alike. DataError naming `where`
    when the row has neither."""
    gold = row.get(answer_field)
    if gold is not None and str(gold).strip():
        return row
    gold = last_boxed(str(row.get("solution") or ""))
    if gold is None or not gold.strip():
        raise DataError(f"{where}: no {answer_field!r} and no closed \\boxed{{...}} in "
                        f"'solution': no reference answer")
    return {**row, answer_field: gold}


def _box_content(text: str, m: re.Match) -> str | None:
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


def stated_answers(response: str) -> list[str]:
    """Every final answer the response states: each closed \\boxed{...} and each of the
    paper's "final answer is X. I hope it is correct." sentences (not the looser "final
    answer is" fallback, which prose can contain), without $ delimiters, in order."""
    found = [_box_content(response, m) for m in _BOXED.finditer(response)]
    for m in _FINAL_IS.finditer(response):
        hope = _HOPE.search(response, m.end())
        nxt = _FINAL_IS.search(response, m.end())
        if hope and (nxt is None or hope.start() < nxt.start()):
            found.append(response[m.end():hope.start()])
    out = [_DOLLAR.sub("", a.strip().rstrip(".")).strip() for a in found if a]
    return [a for a in out if a]


# ---------------------------------------------------------------- what counts as equal
# math-verify decides equality of two values (module doc); these rules run around it, each
# closing a way a response was paid without giving the answer (tests/test_rewards_math.py):
#   * one answer: a response stating final answers that are not all equal gets 0 ("hedged");
#   * as many items as the reference: "3,3,3" is not 3, "2,3,3" is not "2,3" (math-verify
#     compares such lists as sets); equal counts are matched as a multiset, in any order;
#   * percent is part of the value: 10\% = 0.1 and 300\% = 3, so 3\% is not 3; against a
#     reference in percent, the bare number of percent also counts (25 for 25\%, as "what
#     percent" is answered) besides its value (0.25);
#   * units: where both carry one, the units must agree (3 m is not 3 km; m = meter(s));
#     a unit on one side only is dropped (MATH's references mostly omit them).
_PERCENT = re.compile(r"^(?P<value>.*?\S)\s*\\?%$", re.S)
_UNIT = re.compile(r"^(?P<value>.*?[\w}.)])\s*(?:\\(?:text|mbox|mathrm)\s*\{(?P<u1>[^{}]*)\}|"
                   r"(?<=\s)(?P<u2>[A-Za-z]{1,16}))(?P<pow>\^\{?\d\}?)?$", re.S)
_UNIT_NAMES = {"meter": "m", "metre": "m", "centimeter": "cm", "centimetre": "cm",
               "millimeter": "mm", "kilometer": "km", "inch": "in", "inche": "in",
               "foot": "ft", "feet": "ft", "yard": "yd", "mile": "mi", "second": "s",
               "sec": "s", "minute": "min", "hour": "h", "hr": "h", "gram": "g",
               "kilogram": "kg", "liter": "l", "litre": "l", "degree": "deg",
               "dollar": "$", "cent": "cent"}
_THOUSANDS_ONLY = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _split_unit(s: str) -> tuple[str, str | None]:
    m = _UNIT.match(s.strip())
    if not m or not re.search(r"\d", m.group("value")):
        return s.strip(), None
    unit = (m.group("u1") if m.group("u1") is not None else m.group("u2")).strip().lower()
    unit = unit.replace(" ", "")
    if unit.endswith("s") and len(unit) > 3:
        unit = unit[:-1]
    return m.group("value").strip(), _UNIT_NAMES.get(unit, unit) + (m.group("pow") or "")


def _split_percent(s: str) -> tuple[str, bool]:
    m = _PERCENT.match(s.strip())
    return (m.group("value").strip(), True) if m else (s.strip(), False)


def _items(s: str) -> list[str]:
    """Top-level comma-separated items (commas inside (), [], {} or \\{\\} do not split;
    a number with thousands separators is one item)."""
    s = s.strip()
    if _THOUSANDS_ONLY.fullmatch(s):
        return [s]
    items, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    items.append(s[start:])
    return [x.strip() for x in items if x.strip()]


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
        if "\\boxed" in gold:
            gold = last_boxed(gold) or gold
        rounding = request["float_rounding"]

        def parsed(text):  # timeouts off: they would set their own SIGALRM handler over ours
            return parse(f"${text}$", parsing_timeout=None)

        def same(a, b) -> bool:
            pa, pb = parsed(a), parsed(b)
            return bool(pa and pb and verify(pb, pa, float_rounding=rounding,
                                             timeout_seconds=None))

        if not gold or not parsed(gold):
            return {"score": 0.0, "reason": "bad_reference"}
        if not parsed(answer):
            return {"score": 0.0, "reason": "no_answer"}
        # every answer the response states must be the one it ends with
        if any(not same(other, answer) for other in set(stated_answers(request["response"]))
               - {answer}):
            return {"score": 0.0, "reason": "hedged"}
        right = _equal(answer, gold, same)
        return {"score": 1.0, "reason": OK} if right else {"score": 0.0, "reason": "wrong_answer"}
    except _Timeout:
        return {"score": 0.0, "reason": "timeout"}
    except Exception:  # noqa: BLE001 - a parser bug must not stop the batch
        return {"score": 0.0, "reason": "crash"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _equal(answer: str, gold: str, same) -> bool:
    """answer = gold under the rules above, with `same` (math-verify) on the values."""
    a_items, g_items = _items(answer), _items(gold)
    if len(a_items) != len(g_items):
        return False
    if len(g_items) > 1:  # a multiset: each reference item matched once, in any order
        left = list(g_items)
        for a in a_items:
            hit = next((i for i, g in enumerate(left) if _equal(a, g, same)), None)
            if hit is None:
                return False
            left.pop(hit)
        return True
    (a_val, a_unit), (g_val, g_unit) = _split_unit(answer), _split_unit(gold)
    if a_unit and g_unit and a_unit != g_unit:
        return False
    (a_num, a_pct), (g_num, g_pct) = _split_percent(a_val), _split_percent(g_val)
    if a_pct == g_pct:
        return same(a_num, g_num)
    if a_pct:  # its value: a_num / 100
        return same(f"\\frac{{{a_num}}}{{100}}", g_num)
    return same(a_num, g_num) or same(a_num, f"\\frac{{{g_num}}}{{100}}")


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

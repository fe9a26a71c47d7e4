"""Custom reward: a user function, given in the config as "module:function" (or, through the
Python API, as the callable itself), called once per batch in either convention:
  * fn(completions, **row_fields): the completions first, positionally; each row field a
    list over the batch;
  * TRL's, for a function with a parameter named `completions`: fn(prompts=..., completions=
    ..., **row_fields), all by keyword; prompts = the rows' problem field (what the model was
    asked; reward.problem_field), the row fields as in TRL minus names it takes itself.
It must return one finite float per completion; anything else is an error naming the
function, never a silent 0 (a wrong reward trains silently).

A call has timeout_s seconds (reward.timeout_s; default 300 s a batch): past it the call is
interrupted (SIGALRM, when called in the main thread; a thread pool's call is left to
finish in the background) and RewardTimeout names the function and the limit, instead of
training hanging on a stuck function."""
from __future__ import annotations

import importlib
import importlib.util
import concurrent.futures
import inspect
import math
import os
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Mapping

from score_fast.rewards.base import OK, Reward, RewardResult


@dataclass
class CustomRewardConfig:
    kind: str = "custom"
    # "package.module:function", "path/to/file.py:function" for a file not on sys.path, or
    # the callable itself (Python API)
    function: str | Callable = ""
    problem_field: str = "problem"  # TRL-style functions get it as `prompts`
    timeout_s: float = 300.0  # per call (a batch): RewardTimeout past it


class RewardTimeout(TimeoutError):
    """A reward call ran past its time limit (not a per-sample failure: the trainer stops)."""


class _Alarm(BaseException):  # BaseException: a user function's `except Exception` passes it
    pass


def call_with_timeout(fn: Callable, timeout_s: float, what: str):
    """fn() within timeout_s seconds, else RewardTimeout naming `what`. In the main thread
    a SIGALRM interrupts it (any Python code, time.sleep included); elsewhere it runs in a
    helper thread that is abandoned on timeout (Python cannot stop a thread)."""
    message = f"{what} ran past reward.timeout_s={timeout_s:g} s"
    if threading.current_thread() is threading.main_thread():
        def alarm(signum, frame):
            raise _Alarm

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn()
        except _Alarm:
            raise RewardTimeout(message) from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise RewardTimeout(message) from None
    finally:
        pool.shutdown(wait=False)


def function_name(spec: str | Callable) -> str:
    """How a reward function is named in messages and config.yaml."""
    if callable(spec):
        return f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', repr(spec))}"
    return spec


def load_function(spec: str | Callable) -> Callable:
    if callable(spec):
        return spec
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise ValueError(f"custom reward {spec!r}: expected 'module:function'")
    try:
        if module_name.endswith(".py"):
            loader = importlib.util.spec_from_file_location(
                os.path.basename(module_name)[:-3], module_name)
            if loader is None:
                raise ImportError(f"cannot load {module_name}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except (ImportError, AttributeError, OSError) as e:
        raise ValueError(f"custom reward {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"custom reward {spec!r}: not callable")
    return fn


class CustomReward(Reward):
    def __init__(self, config: CustomRewardConfig):
        self.config = config
        self.fn = load_function(config.function)
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):  # a builtin without a signature: the positional call
            params = {}
        self.trl_style = "completions" in params
        # prompts only where it can land: a fn(completions, answer) of the first convention
        # has a `completions` parameter too
        self.takes_prompts = "prompts" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def _evaluate(self, responses: list[str], rows: list[Mapping]) -> RewardResult:
        name = function_name(self.config.function)
        keys = dict.fromkeys(k for row in rows for k in row)  # first-seen order
        fields = {k: [row.get(k) for row in rows] for k in keys}
        if self.trl_style:
            fields = {k: v for k, v in fields.items() if k not in ("prompts", "completions")}
            if self.takes_prompts:
                fields["prompts"] = [row.get(self.config.problem_field) for row in rows]
            call = lambda: self.fn(completions=responses, **fields)  # noqa: E731
        else:
            call = lambda: self.fn(responses, **fields)  # noqa: E731
        out = call_with_timeout(call, self.config.timeout_s,
                                f"custom reward {name!r} on {len(responses)} completions")
        try:
            scores = [float(s) for s in out]
        except (TypeError, ValueError) as e:
            raise ValueError(f"custom reward {name!r} must return floats: {e}") from e
        if len(scores) != len(responses):
            raise ValueError(f"custom reward {name!r} returned {len(scores)} scores for "
                             f"{len(responses)} completions")
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise ValueError(f"custom reward {name!r} returned non-finite scores at {bad[:5]}: "
                             f"{[scores[i] for i in bad[:5]]}")
        return RewardResult(scores, [OK if s > 0 else "zero" for s in scores])

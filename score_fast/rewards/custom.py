"""Custom reward: a user function, given in the config as "module:function" (or, through the
Python API, as the callable itself), called once per batch in either convention:
  * fn(completions, **row_fields): the completions first, positionally; each row field a
    list over the batch;
  * TRL's, for a function with a parameter named `completions`: fn(prompts=..., completions=
    ..., **row_fields), all by keyword; prompts = the rows' problem field (what the model was
    asked; reward.problem_field), the row fields as in TRL minus names it takes itself.
It must return one finite float per completion; anything else is an error naming the
function, never a silent 0 (a wrong reward trains silently)."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
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
            out = self.fn(completions=responses, **fields)
        else:
            out = self.fn(responses, **fields)
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

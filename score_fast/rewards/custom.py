"""Custom reward: a user function named "module:function" in the config, called once per batch
as fn(completions, **row_fields), where each row field becomes a list over the batch (the
TRL reward-function convention). It must return one finite float per completion; anything
else is an error naming the function, never a silent 0 (a wrong reward trains silently)."""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping

from score_fast.rewards.base import OK, Reward, RewardResult


@dataclass
class CustomRewardConfig:
    kind: str = "custom"
    # "package.module:function", or "path/to/file.py:function" for a file not on sys.path
    function: str = ""


def load_function(spec: str) -> Callable:
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

    def _evaluate(self, responses: list[str], rows: list[Mapping]) -> RewardResult:
        name = self.config.function
        keys = dict.fromkeys(k for row in rows for k in row)  # first-seen order
        fields = {k: [row.get(k) for row in rows] for k in keys}
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

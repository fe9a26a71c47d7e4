"""Binary oracle rewards for SCoRe (math answer checking, sandboxed code tests) plus user
functions, behind one batched interface:

    reward = make_reward("math")                       # or a config object / dict
    result = reward.evaluate(responses, rows)          # RewardResult(.scores, .reasons)
    scores = reward.score(responses, rows)             # just the floats
    result.failures()                                  # {"no_answer": 3, "timeout": 1, ...}

Rewards that keep worker processes (math, code) are context managers; close() stops them."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from score_fast.rewards.base import OK, Reward, RewardResult
from score_fast.rewards.code import CodeReward, CodeRewardConfig
from score_fast.rewards.custom import CustomReward, CustomRewardConfig
from score_fast.rewards.math import MathReward, MathRewardConfig

_KINDS = {"math": (MathRewardConfig, MathReward), "code": (CodeRewardConfig, CodeReward),
          "custom": (CustomRewardConfig, CustomReward)}

__all__ = ["OK", "Reward", "RewardResult", "MathReward", "MathRewardConfig", "CodeReward",
           "CodeRewardConfig", "CustomReward", "CustomRewardConfig", "make_reward"]


def make_reward(config: str | Mapping[str, Any] | Any, **fields) -> Reward:
    """A reward from a kind ("math" | "code" | "custom") plus config fields, a mapping with a
    "kind" key (as read from YAML/JSON), or a config dataclass. Unknown fields raise."""
    if isinstance(config, str):
        config = {"kind": config}
    if isinstance(config, Mapping):
        config = {**config, **fields}
        kind = config.get("kind")
        if kind not in _KINDS:
            raise ValueError(f"unknown reward kind {kind!r}; expected one of {sorted(_KINDS)}")
        config = _KINDS[kind][0](**config)
    elif fields:
        config = dataclasses.replace(config, **fields)
    for cfg_type, reward_type in _KINDS.values():
        if isinstance(config, cfg_type):
            return reward_type(config)
    raise TypeError(f"not a reward config: {config!r}")

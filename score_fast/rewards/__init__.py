"""Binary oracle rewards for SCoRe (math answer checking, sandboxed code tests) plus user
functions, behind one batched interface:

    reward = make_reward("math")                       # or a config object / dict
    reward = make_reward_from(run_config)              # the reward a run's Config names
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
           "CodeRewardConfig", "CustomReward", "CustomRewardConfig", "make_reward",
           "make_reward_from"]


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


def make_reward_from(config, function=None) -> Reward:
    """The reward a run's config (score_fast.config.Config) names, with its workers, timeout
    and sandbox limits; `function` (a callable passed to Trainer) makes it a custom reward
    of that function."""
    spec = config.reward
    if spec.kind == "custom" or function is not None:
        return make_reward({"kind": "custom", "function": function or spec.function,
                            "problem_field": config.problem_field(),
                            **({} if spec.timeout_s is None else {"timeout_s": spec.timeout_s})})
    limits = {"workers": spec.workers}
    if spec.kind == "math":
        if spec.timeout_s is not None:
            limits["timeout_s"] = spec.timeout_s
        return make_reward({"kind": "math", "answer_field": config.answer_field() or "answer",
                            "lenient": spec.lenient_math, **limits})
    if spec.timeout_s is not None:
        limits["wall_s"] = spec.timeout_s
    return make_reward({"kind": "code", **limits, **dataclasses.asdict(spec.sandbox)})

"""Rewards: black-box scores of decoded images, registered by name (see :mod:`loopdiff.rewards.base`)."""

from loopdiff.rewards.base import (
    PromptRequirement,
    RewardError,
    RewardFn,
    RewardInfo,
    WeightedSum,
    build_reward,
    parse_reward_spec,
    register_reward,
    register_reward_modules,
    registered_rewards,
)

__all__ = [
    "PromptRequirement",
    "RewardError",
    "RewardFn",
    "RewardInfo",
    "WeightedSum",
    "build_reward",
    "parse_reward_spec",
    "register_reward",
    "register_reward_modules",
    "registered_rewards",
]

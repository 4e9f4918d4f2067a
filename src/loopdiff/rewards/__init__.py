"""Rewards: black-box scores of decoded images, registered by name (see :mod:`loopdiff.rewards.base`)."""

from loopdiff.rewards.base import (
    RewardError,
    RewardFn,
    RewardInfo,
    WeightedSum,
    build_reward,
    parse_reward_spec,
    register_reward,
    registered_rewards,
)

__all__ = [
    "RewardError",
    "RewardFn",
    "RewardInfo",
    "WeightedSum",
    "build_reward",
    "parse_reward_spec",
    "register_reward",
    "registered_rewards",
]

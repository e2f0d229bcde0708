"""Reward sources a user names in YAML, and how they are called."""

from lightning_rlhf.rewards.calling import RewardFunction, call_reward_function

__all__ = ["RewardFunction", "call_reward_function"]

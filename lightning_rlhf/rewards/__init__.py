"""Reward sources a user names in YAML (sandboxed code execution against test cases) and their calling."""

from lightning_rlhf.rewards.calling import RewardFunction, call_reward_function
from lightning_rlhf.rewards.code import (
    STATUSES,
    CodeExecutionReward,
    ExecutionRecord,
    TestCases,
    TestSpecError,
    extract_code,
    parse_tests,
    return_matches,
    stdout_matches,
)
from lightning_rlhf.rewards.sandbox import Isolation, ProgramResult, isolation, run_program

__all__ = [
    "STATUSES",
    "CodeExecutionReward",
    "ExecutionRecord",
    "Isolation",
    "ProgramResult",
    "RewardFunction",
    "TestCases",
    "TestSpecError",
    "call_reward_function",
    "extract_code",
    "isolation",
    "parse_tests",
    "return_matches",
    "run_program",
    "stdout_matches",
]

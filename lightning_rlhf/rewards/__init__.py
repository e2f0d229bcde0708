"""Reward sources a user names in YAML: code execution against test cases (sandboxed)."""

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
    "TestCases",
    "TestSpecError",
    "extract_code",
    "isolation",
    "parse_tests",
    "return_matches",
    "run_program",
    "stdout_matches",
]

"""Row-aware reward calling: which columns a function gets, and what it must return."""

import pytest
import torch

from lightning_rlhf.rewards.calling import (
    call_reward_function,
    repeat_columns,
    reward_source_metrics,
    select_columns,
)

COLUMNS = {"answer": ["4", "9"], "tier": ["easy", "hard"], "tests": [[1], [2, 3]]}


def plain(prompts, responses):
    return [float(len(r)) for r in responses]


def by_answer(prompts, responses, answer):
    return [float(r == a) for r, a in zip(responses, answer, strict=True)]


def by_keyword(prompts, responses, *, tier="easy", missing="default"):
    return [float(t == "hard") for t in tier]


def takes_all(prompts, responses, **columns):
    return [float(len(columns)) for _ in responses]


class Scorer:
    def __init__(self):
        self.last = {}

    def __call__(self, prompts, responses, tests):
        self.last = {"pass_rate": 0.5, "calls": 1}
        return [float(len(t)) for t in tests]

    def metrics(self):
        return self.last


def test_each_function_gets_only_the_columns_it_names():
    assert select_columns(plain, COLUMNS, "f") == {}
    assert select_columns(by_answer, COLUMNS, "f") == {"answer": ["4", "9"]}
    assert select_columns(by_keyword, COLUMNS, "f") == {
        "tier": ["easy", "hard"]
    }  # 'missing' keeps its default
    assert select_columns(takes_all, COLUMNS, "f") == COLUMNS
    assert select_columns(Scorer(), COLUMNS, "f") == {"tests": [[1], [2, 3]]}  # bound __call__: no self
    # prompts / responses as positional-only parameters still take the first two places
    assert select_columns(lambda p, r, /, tier: tier, COLUMNS, "f") == {"tier": ["easy", "hard"]}


def test_scores_follow_the_rows():
    prompts, responses = ["2+2=", "3*3="], ["4", "8"]
    assert call_reward_function(plain, prompts, responses, COLUMNS, "f").tolist() == [1.0, 1.0]
    assert call_reward_function(by_answer, prompts, responses, COLUMNS, "f").tolist() == [1.0, 0.0]
    assert call_reward_function(by_keyword, prompts, responses, COLUMNS, "f").tolist() == [0.0, 1.0]
    assert call_reward_function(takes_all, prompts, responses, COLUMNS, "f").tolist() == [3.0, 3.0]
    assert call_reward_function(Scorer(), prompts, responses, COLUMNS, "f").tolist() == [1.0, 2.0]
    # no columns at all (old call sites, data without extra columns): plain functions work unchanged
    assert call_reward_function(plain, prompts, responses, None, "f").dtype == torch.float32


def test_a_missing_or_misshapen_column_is_named():
    with pytest.raises(ValueError, match=r"reward_function needs the column 'answer'.*carries \['tier'\]"):
        call_reward_function(by_answer, ["a"], ["b"], {"tier": ["x"]}, "reward_function")
    with pytest.raises(ValueError, match="needs the column 'answer', but the prompt data carries no other"):
        call_reward_function(by_answer, ["a"], ["b"], None, "reward_function")
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 responses"):
        call_reward_function(by_answer, ["a", "b"], ["c", "d"], {"answer": ["x"]}, "f")


def test_what_a_function_returns_is_checked():
    with pytest.raises(ValueError, match="returned 1 scores for 2 responses"):
        call_reward_function(lambda p, r: [1.0], ["a", "b"], ["x", "y"], None, "reward_function")
    with pytest.raises(ValueError, match="non-finite score inf for response 0"):
        call_reward_function(lambda p, r: [float("inf"), 1.0], ["a", "b"], ["x", "y"], None, "g")
    with pytest.raises(ValueError, match="g must return one number per response.*got str"):
        call_reward_function(lambda p, r: "ab", ["a", "b"], ["x", "y"], None, "g")


def test_repeat_columns_matches_prompts_sampled_k_times():
    assert repeat_columns({"a": [1, 2], "b": [[0], [9]]}, 3) == {
        "a": [1, 1, 1, 2, 2, 2],
        "b": [[0], [0], [0], [9], [9], [9]],
    }
    assert repeat_columns(None, 2) == {}


def test_reward_objects_report_their_metrics():
    scorer = Scorer()
    scorer(["p"], ["r"], [[1]])
    assert reward_source_metrics(scorer, None) == {"rollout/pass_rate": 0.5, "rollout/calls": 1.0}
    assert reward_source_metrics(plain, scorer) == {"rollout/gold_pass_rate": 0.5, "rollout/gold_calls": 1.0}
    assert reward_source_metrics(None, None) == {}

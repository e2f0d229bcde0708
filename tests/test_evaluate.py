"""`lightning-rlhf evaluate`: a hand-computed table, and the command end to end on the testbed."""

import json

import pytest
import torch

from lightning_rlhf.cli import cli_main
from lightning_rlhf.evaluate import PolicySamples, evaluate, markdown_table, summarize
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.reward import GoldReward
from lightning_rlhf.testbed.task import TaskConfig
from lightning_rlhf.validation import ConfigError


def test_summary_matches_a_hand_computed_table():
    """2 prompts x 3 samples, two policies, scorer 'tests' (pass at >= 10) and 'rm'.

    base:  tests [10, 0, 0 | 0, 0, 0]   -> c = (1, 0): pass@1 = (1/3 + 0) / 2 = 1/6,
                                            pass@2 = (1 - C(2,2)/C(3,2) + 0) / 2 = (2/3) / 2 = 1/3
           rm    [1, 2, 3 | 4, 5, 6]    -> mean 3.5
    ppo:   tests [10, 10, 0 | 10, 0, 0] -> c = (2, 1): pass@1 = (2/3 + 1/3) / 2 = 1/2,
                                            pass@2 = (1 + 2/3) / 2 = 5/6
           rm    [1, 3, 2 | 4, 9, 0]    -> mean 19/6; vs base: tie, win, loss | tie, win, loss -> 0.5
    eos: base 4 of 6 ended, ppo 6 of 6; lengths: base mean 2, ppo mean 5."""
    base = PolicySamples(
        "base",
        ["r"] * 6,
        [True, True, False, True, True, False],
        [1, 2, 3, 1, 2, 3],
        {"tests": [10, 0, 0, 0, 0, 0], "rm": [1, 2, 3, 4, 5, 6]},
    )
    ppo = PolicySamples(
        "ppo", ["r"] * 6, [True] * 6, [5] * 6, {"tests": [10, 10, 0, 10, 0, 0], "rm": [1, 3, 2, 4, 9, 0]}
    )
    rows = summarize(
        [base, ppo], num_samples=3, pass_k=[1, 2], pass_scorer="tests", pass_threshold=10, win_scorer="rm"
    )
    expected = [
        {
            "policy": "base",
            "score/tests": 10 / 6,
            "score/rm": 3.5,
            "win_rate/rm": 0.5,
            "pass@1": 1 / 6,
            "pass@2": 1 / 3,
            "eos_rate": 4 / 6,
            "response_tokens": 2.0,
        },
        {
            "policy": "ppo",
            "score/tests": 30 / 6,
            "score/rm": 19 / 6,
            "win_rate/rm": 0.5,
            "pass@1": 1 / 2,
            "pass@2": 5 / 6,
            "eos_rate": 1.0,
            "response_tokens": 5.0,
        },
    ]
    assert list(rows[0]) == list(expected[0])
    for row, want in zip(rows, expected, strict=True):
        assert row == pytest.approx(want)
    table = markdown_table(rows)
    assert table.splitlines()[0] == (
        "| policy | score/tests | score/rm | win_rate/rm | pass@1 | pass@2 | eos_rate | response_tokens |"
    )
    assert table.splitlines()[3] == "| ppo | 5.0000 | 3.1667 | 0.5000 | 0.5000 | 0.8333 | 1.0000 | 5.0000 |"


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb")
    sizes = SplitSizes(sft_train=8, sft_eval=8, pairs_train=8, pairs_eval=8, prompts_train=8, prompts_eval=6)
    write_testbed(out, TaskConfig(seed=0), sizes, model_size="nano")
    return out


def test_the_same_policy_twice_ties_and_scores_match_the_gold_reward(testbed):
    """Same weights, same seed: identical samples, so every paired comparison is a tie (win rate 1/2)."""
    gold = GoldReward(str(testbed))
    policy = str(testbed / "init_policy")
    summary, samples, prompts = evaluate(
        [policy, policy],
        str(testbed / "prompts_eval.jsonl"),
        reward_functions={"gold": gold},
        num_samples=2,
        pass_k=[1, 2],
        pass_threshold=0.5,
        progress=False,
    )
    assert len(prompts) == 6 and len(samples[0].responses) == 12
    assert samples[0].responses == samples[1].responses
    assert summary[1]["win_rate/gold"] == 0.5
    expected = gold([p for p in prompts for _ in range(2)], samples[0].responses)
    assert samples[0].scores["gold"] == pytest.approx(list(expected))
    assert summary[0]["score/gold"] == pytest.approx(sum(expected) / 12)


def test_the_command_writes_json_and_markdown_and_prints_the_table(testbed, tmp_path, capsys):
    policy = str(testbed / "init_policy")
    functions = json.dumps(
        {
            "gold": {
                "class_path": "lightning_rlhf.testbed.reward.GoldReward",
                "init_args": {"task_dir": str(testbed)},
            }
        }
    )
    cli_main(
        [
            "evaluate",
            "--policies",
            f"[{policy}]",
            "--prompts",
            str(testbed / "prompts_eval.jsonl"),
            "--reward_functions",
            functions,
            "--num_samples",
            "2",
            "--max_new_tokens",
            "6",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    assert torch.is_grad_enabled()  # the command leaves the caller's autograd state alone
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["summary"][0]["policy"] == policy and len(report["policies"][0]["responses"]) == 12
    table = (tmp_path / "eval" / "evaluation.md").read_text()
    assert table in printed and "score/gold" in table and "evaluation written to" in printed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give a scorer"),
        (
            {"reward_functions": {"g": len}, "pass_k": [3], "num_samples": 2},
            "pass_k 3 needs 1 <= k <= num_samples",
        ),
        ({"reward_functions": {"g": len}, "pass_k": [1]}, "pass_k needs pass_threshold"),
        (
            {"reward_functions": {"g": len}, "win_scorer": "rm"},
            r"win_scorer 'rm' is not a scorer \(scorers: \['g'\]\)",
        ),
    ],
)
def test_bad_flags_are_named_before_any_model_loads(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        evaluate(["no/such/policy"], "no_such.jsonl", **kwargs)


def test_n_at_k_in_the_summary_is_hand_computed():
    """2 prompts x 3 samples. Prompt 0: samples (public ok, cluster A, hidden ok), (ok, B, no), (ok, B, no):
    B is the largest cluster, so 1@3 submits B -> unsolved; 2@3 submits B and A -> solved. Prompt 1: no
    sample passes the public tests -> unsolved. 1@3 = 0/2, 2@3 = 1/2; 1@1 sees only the first sample."""
    from lightning_rlhf.metrics import Submission as S

    subs = [S(True, "A", True), S(True, "B", False), S(True, "B", False)] + [S(False, "C", True)] * 3
    policy = PolicySamples("p", ["x"] * 6, [True] * 6, [1] * 6, {"f": [0.0] * 6}, submissions=subs)
    (row,) = summarize([policy], num_samples=3, n_at_k_pairs=[(1, 3), (2, 3), (1, 1)])
    assert (row["1@3"], row["2@3"], row["1@1"]) == (0.0, 0.5, 0.5)


def test_program_reward_submissions_hand_checked():
    from lightning_rlhf.testbed.programs import ProgramReward, fingerprint

    tests = {"inputs": ["3 1 2\n"], "outputs": ["1 2 3\n"]}
    public = {"inputs": ["2 1\n"], "outputs": ["1 2\n"]}
    reward = ProgramReward()
    out = reward.submissions(
        ["p"] * 3, [" sort", " rev", " zzz"], tests=[tests] * 3, public_tests=[public] * 3
    )
    assert [(s.passes_public, s.passes_hidden) for s in out] == [(True, True), (True, False), (False, False)]
    assert (
        out[0].cluster == fingerprint(["sort"]) and out[2].cluster is None
    )  # rev also maps [2, 1] -> [1, 2]


def test_evaluate_reports_n_at_k_from_program_submissions(tmp_path):
    """End to end on the program testbed: the reported 1@2 and 2@2 equal n_at_k over the submissions it
    returns, and those agree with ProgramReward's scores on the hidden tests."""
    from lightning_rlhf.metrics import n_at_k
    from lightning_rlhf.testbed.files import ProgramSplitSizes, write_program_testbed
    from lightning_rlhf.testbed.programs import ProgramReward

    sizes = ProgramSplitSizes(
        sft_train=6, sft_eval=3, pairs_train=3, pairs_eval=3, prompts_train=3, prompts_eval=6
    )
    write_program_testbed(tmp_path, sizes=sizes, model_size="nano")
    summary, samples, _ = evaluate(
        [str(tmp_path / "init_policy")],
        str(tmp_path / "prompts_eval.jsonl"),
        reward_functions={"tests": ProgramReward()},
        num_samples=2,
        n_at_k=["1@2", "2@2"],
        progress=False,
    )
    subs = samples[0].submissions
    assert len(subs) == 12
    assert [10.0 if s.passes_hidden else 0.0 for s in subs] == samples[0].scores["tests"]
    problems = [subs[i : i + 2] for i in range(0, 12, 2)]
    assert summary[0]["1@2"] == n_at_k(problems, 1, 2) and summary[0]["2@2"] == n_at_k(problems, 2, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_at_k": ["10-64"]}, "n_at_k entries look like '10@64'"),
        ({"n_at_k": ["3@2"]}, r"needs 1 <= n <= k <= num_samples \(2\)"),
        ({"n_at_k": ["1@2"]}, "needs a reward function with a submissions"),
    ],
)
def test_bad_n_at_k_flags_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        evaluate(["p"], "x.jsonl", reward_functions={"len": len}, num_samples=2, **kwargs)

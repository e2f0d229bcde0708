"""The program testbed on disk (#14 item 5): files in the ordinary formats, hidden tests as a column the
row-aware reward path reads, held-out programs unseen in training, one token per operation."""

import json

import pytest
from transformers import AutoTokenizer

from lightning_rlhf import PromptDataModule
from lightning_rlhf.cli import cli_main
from lightning_rlhf.rewards.calling import call_reward_function
from lightning_rlhf.testbed.files import ProgramSplitSizes, write_program_testbed
from lightning_rlhf.testbed.programs import (
    OPS,
    TIERS,
    ProgramReward,
    ProgramsConfig,
    fingerprint,
    parse_program,
    passes,
)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    out = tmp_path_factory.mktemp("programs")
    sizes = ProgramSplitSizes(
        sft_train=120, sft_eval=12, pairs_train=60, pairs_eval=12, prompts_train=48, prompts_eval=30
    )
    write_program_testbed(out, ProgramsConfig(unseen_eval_programs=True), sizes, model_size="nano")
    return out


def test_every_demonstration_and_chosen_program_passes_and_every_mutant_fails(programs):
    prompts = {r["prompt"]: r for r in rows(programs / "prompts_train.jsonl")}
    assert len(rows(programs / "sft_train.jsonl")) == 120 and len(rows(programs / "pairs_eval.jsonl")) == 12
    for row in rows(programs / "pairs_train.jsonl") + rows(programs / "pairs_eval.jsonl"):
        assert row["chosen"] != row["rejected"]
        chosen, rejected = parse_program(row["chosen"]), parse_program(row["rejected"])
        assert chosen is not None and rejected is not None and len(chosen) == len(rejected)
        assert sum(a != b for a, b in zip(chosen, rejected, strict=True)) == 1  # one operation replaced
    for row in rows(programs / "prompts_train.jsonl") + rows(programs / "prompts_eval.jsonl"):
        tests = json.loads(row["tests"])
        assert len(tests["inputs"]) == 8 and row["tier"] in TIERS
    # The reference programs of the prompt rows are not stored; their tests are consistent with the prompt:
    # a demonstration for the same prompt text, when one exists, passes that row's hidden tests.
    for sft in rows(programs / "sft_train.jsonl"):
        if sft["prompt"] in prompts:
            assert passes(parse_program(sft["completion"]), prompts[sft["prompt"]]["tests"])


def test_held_out_programs_never_appear_in_training(programs):
    """unseen_eval_programs=True (10 held-out rows per tier: at most 16 intro ones exist). A training program
    with a held-out program's semantics would pass all 11 of that row's tests."""
    evaluation = rows(programs / "prompts_eval.jsonl")
    assert [r["tier"] for r in evaluation] == [t for _ in range(10) for t in TIERS]
    trained = {tuple(parse_program(r["completion"])) for r in rows(programs / "sft_train.jsonl")}
    trained |= {tuple(parse_program(r["chosen"])) for r in rows(programs / "pairs_train.jsonl")}
    assert len({fingerprint(p) for p in trained}) > 30  # many distinct programs were demonstrated
    for row in evaluation:
        seen = [p for p in trained if passes(p, row["tests"]) and passes(p, row["public_tests"])]
        assert not seen, (row["prompt"], seen)


def test_each_operation_is_one_token_and_the_prompt_file_feeds_program_reward(programs):
    tokenizer = AutoTokenizer.from_pretrained(programs / "tokenizer")
    for op in OPS:
        assert len(tokenizer(" " + op, add_special_tokens=False)["input_ids"]) == 1, op
    for row in rows(programs / "sft_train.jsonl")[:20]:  # text survives encode -> decode exactly
        text = row["prompt"] + row["completion"]
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    data = PromptDataModule(str(programs / "init_policy"), str(programs / "prompts_eval.jsonl"), batch_size=6)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert set(batch["columns"]) == {"tests", "public_tests", "tier"}
    reward = ProgramReward()
    solutions = []
    for tests in batch["columns"]["tests"]:
        # Find a program that solves the row by brute force over depth <= 2, or keep the empty response.
        solutions.append(next((" " + " ".join(p) for p in _short_programs() if passes(p, tests)), ""))
    scores = call_reward_function(
        reward, list(batch["prompt"]), solutions, batch["columns"], "reward_function"
    )
    assert [float(s) for s in scores] == [10.0 if s else 0.0 for s in solutions]
    assert reward.metrics()["pass_rate"] == sum(bool(s) for s in solutions) / len(solutions)


def _short_programs():
    import itertools

    for depth in (1, 2):
        yield from itertools.product(OPS, repeat=depth)


def test_the_cli_writes_the_program_testbed(tmp_path, capsys):
    cli_main(["testbed", "--task", "programs", "--out", str(tmp_path / "p"), "--model-size", "nano"])
    assert "programs testbed written to" in capsys.readouterr().out
    for name in ("sft_train", "sft_eval", "pairs_train", "pairs_eval", "prompts_train", "prompts_eval"):
        assert (tmp_path / "p" / f"{name}.jsonl").is_file(), name
    assert (tmp_path / "p" / "init_policy" / "config.json").is_file()


def test_eval_programs_may_be_demonstrated_when_asked_but_prompts_never_repeat(tmp_path):
    """unseen_eval_programs=False: held-out rows are new problems drawn like the training ones, so short
    programs also appear in training (with other examples); no held-out prompt text is a training one."""
    sizes = ProgramSplitSizes(
        sft_train=300, sft_eval=6, pairs_train=6, pairs_eval=6, prompts_train=6, prompts_eval=30
    )
    write_program_testbed(tmp_path, ProgramsConfig(unseen_eval_programs=False), sizes, model_size="nano")
    evaluation = rows(tmp_path / "prompts_eval.jsonl")
    training = rows(tmp_path / "sft_train.jsonl") + rows(tmp_path / "prompts_train.jsonl")
    assert not {r["prompt"] for r in evaluation} & {r["prompt"] for r in training}
    trained = {fingerprint(parse_program(r["completion"])) for r in rows(tmp_path / "sft_train.jsonl")}
    demonstrated = 0
    for row in evaluation:
        solutions = [
            p for p in _short_programs() if passes(p, row["tests"]) and passes(p, row["public_tests"])
        ]
        demonstrated += any(fingerprint(p) in trained for p in solutions)
    assert demonstrated > 0  # 300 demonstrations cover most of the 16 intro-tier programs

"""The embedded testbed: gold reward arithmetic, determinism, data files, tokenizer and model factory."""

import filecmp
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_rlhf.testbed.files import SplitSizes, load_task, tokenizer_corpus, write_testbed
from lightning_rlhf.testbed.models import MODEL_SIZES, build_causal_lm, build_reward_model, count_parameters
from lightning_rlhf.testbed.task import Prompt, TaskConfig, WordTask, mean_gold_reward
from lightning_rlhf.testbed.tokenizer import train_tokenizer

SMALL = SplitSizes(sft_train=40, sft_eval=8, pairs_train=40, pairs_eval=8, prompts_train=16, prompts_eval=8)


@pytest.fixture()
def hand_task() -> WordTask:
    """A task whose first three words get hand-set utilities and topics."""
    task = WordTask(TaskConfig(seed=3))
    a, b, c = task.words[:3]
    task.utility.update({a: 0.5, b: -0.2, c: 0.9})
    task.topic_of.update({a: "sea", b: "sky", c: "sea"})
    return task


def test_gold_reward_hand_worked(hand_task):
    """Prompt: 3 words about sea, avoid c; topic_bonus 0.5, length_penalty 0.25.

    "a b b": values [0.5 + 0.5, -0.2, -1 (repeat)] -> mean -0.2/3 = -0.066667, length ok.
    "a":     values [1.0], |1 - 3| = 2 -> 1.0 - 0.5 = 0.5.
    "c zzz a": [-1 (avoided), -1 (not a word), 1.0] -> -1/3.
    "":      -1 - 0.25 * 3 = -1.75.
    "b a":   [-0.2, 1.0] -> 0.4 - 0.25 = 0.15.
    """
    a, b, c = hand_task.words[:3]
    prompt = Prompt(text="unused", topic="sea", n=3, avoid=c)
    assert hand_task.gold_reward(prompt, f" {a} {b} {b}") == pytest.approx(-0.2 / 3)
    assert hand_task.gold_reward(prompt, f"{a}") == pytest.approx(0.5)
    assert hand_task.gold_reward(prompt, f"{c} zzz {a}") == pytest.approx(-1 / 3)
    assert hand_task.gold_reward(prompt, "   ") == pytest.approx(-1.75)
    assert hand_task.gold_reward(prompt, f"{b}\n{a}") == pytest.approx(0.15)


def test_prompt_text_round_trips_and_unknown_prompt_is_named():
    task = WordTask(TaskConfig(seed=1))
    rng = random.Random(0)
    prompts = [task.make_prompt(rng) for _ in range(200)]
    fresh = WordTask(TaskConfig(seed=1))  # no cache: must parse from the text alone
    for prompt in prompts:
        assert fresh.parse_prompt(prompt.text) == prompt
    with pytest.raises(ValueError, match="not a prompt of this word task: 'hello'"):
        fresh.parse_prompt("hello")


def test_best_reward_bounds_every_response():
    task = WordTask(TaskConfig(seed=2))
    rng = random.Random(1)
    for _ in range(50):
        prompt = task.make_prompt(rng)
        best = task.best_reward(prompt)
        for _ in range(20):
            assert task.gold_reward(prompt, task.behaviour_response(prompt, rng)) <= best + 1e-12
        assert task.gold_reward(prompt, task.sft_response(prompt, rng)) <= best + 1e-12


def test_sft_demonstrations_are_mediocre_and_leave_headroom():
    """SFT responses have the right form (n distinct allowed words) and mean gold far below the best."""
    task = WordTask(TaskConfig(seed=0))
    rng = random.Random(0)
    prompts = [task.make_prompt(rng) for _ in range(2000)]
    responses = [task.sft_response(p, rng) for p in prompts]
    for p, r in zip(prompts, responses, strict=True):
        words = r.split()
        assert len(words) == p.n and len(set(words)) == p.n and p.avoid not in words
    sft = mean_gold_reward(task, prompts, responses)
    best = sum(task.best_reward(p) for p in prompts) / len(prompts)
    # Expected value of a random allowed word: ~0 utility + 0.5 / 4 topic bonus.
    assert -0.1 < sft < 0.3
    assert best - sft > 0.7


@pytest.mark.parametrize("shift", [0.0, 2.0])
def test_behaviour_shift_controls_how_often_favoured_words_appear(shift):
    task = WordTask(TaskConfig(seed=0, behaviour_shift=shift))
    rng = random.Random(0)
    words = [w for _ in range(300) for w in task.behaviour_response(task.make_prompt(rng), rng).split()]
    favoured = sum(w in task.favoured for w in words) / len(words)
    # shift s gives odds exp(2s) for a favoured word: 1 -> 0.5 share, e^4 -> ~0.98.
    expected = 0.5 if shift == 0 else 0.98
    assert favoured == pytest.approx(expected, abs=0.05)


def test_preference_labels_follow_bradley_terry_on_gold():
    """With T = 0.25 the gold reward agrees with most labels but not all (labels are draws)."""
    task = WordTask(TaskConfig(seed=0))
    rng = random.Random(0)
    pairs = [task.preference_pair(task.make_prompt(rng), rng) for _ in range(1000)]
    agree = sum(
        task.gold_reward(p["prompt"], p["chosen"]) > task.gold_reward(p["prompt"], p["rejected"])
        for p in pairs
    ) / len(pairs)
    assert 0.65 < agree < 0.9
    sharp = WordTask(TaskConfig(seed=0, label_temperature=1e-3))
    pairs = [sharp.preference_pair(sharp.make_prompt(rng), rng) for _ in range(300)]
    assert all(
        sharp.gold_reward(p["prompt"], p["chosen"]) >= sharp.gold_reward(p["prompt"], p["rejected"])
        for p in pairs
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_words", 5),
        ("num_topics", 0),
        ("min_request", 9),
        ("label_temperature", 0.0),
        ("form_noise", 2.0),
    ],
)
def test_task_config_rejects_impossible_values(field, value):
    with pytest.raises(ValueError, match=f"TaskConfig.{field}="):
        TaskConfig(**{field: value})


def test_write_testbed_is_deterministic_and_seed_dependent(tmp_path):
    write_testbed(tmp_path / "a", TaskConfig(seed=5), SMALL, model_size="nano")
    write_testbed(tmp_path / "b", TaskConfig(seed=5), SMALL, model_size="nano")
    write_testbed(tmp_path / "c", TaskConfig(seed=6), SMALL, model_size="nano")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert {"sft_train.jsonl", "pairs_train.jsonl", "prompts_eval.jsonl", "task.json"} <= {
        str(f) for f in files
    }
    assert any(f.name == "model.safetensors" for f in files)
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(files)
    assert (tmp_path / "a" / "sft_train.jsonl").read_bytes() != (
        tmp_path / "c" / "sft_train.jsonl"
    ).read_bytes()


def test_testbed_files_are_standard_formats_with_held_out_prompts(tmp_path):
    task = write_testbed(tmp_path, TaskConfig(seed=0), SMALL, model_size="nano")
    rows = {
        name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").open()]
        for name in ("sft_train", "sft_eval", "pairs_train", "pairs_eval", "prompts_train", "prompts_eval")
    }
    assert all(set(r) == {"prompt", "completion"} for r in rows["sft_train"] + rows["sft_eval"])
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in rows["pairs_train"] + rows["pairs_eval"])
    assert len(rows["pairs_train"]) == SMALL.pairs_train and len(rows["prompts_eval"]) == SMALL.prompts_eval
    held_out = {r["prompt"] for r in rows["prompts_eval"]}
    assert len(held_out) == SMALL.prompts_eval
    for name in ("sft_train", "sft_eval", "pairs_train", "pairs_eval", "prompts_train"):
        assert held_out.isdisjoint(r["prompt"] for r in rows[name])
    assert load_task(tmp_path).describe() == task.describe()
    with pytest.raises(FileNotFoundError, match="lightning-rlhf testbed"):
        load_task(tmp_path / "missing")


def test_tokenizer_round_trips_any_text_and_saves(tmp_path):
    task = WordTask(TaskConfig(seed=0))
    tokenizer = train_tokenizer(tokenizer_corpus(task))
    for text in [" " + " ".join(task.words[:5]), "Write 3 words about sea, not x:", "naïve 漢字 🙂\n\t"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # Each invented word (with its leading space) is a single token: the model learns words, not spelling.
    assert all(len(tokenizer(" " + w)["input_ids"]) == 1 for w in task.words)
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == "<|user|>\nhi\n<|assistant|>\nyo</s>\n"
    assert tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nhi\n<|assistant|>\n"
    )
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("x yz")["input_ids"] == tokenizer("x yz")["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template and loaded.eos_token_id == tokenizer.eos_token_id


def test_model_factory_sizes_and_heads(tmp_path):
    tokenizer = train_tokenizer(tokenizer_corpus(WordTask(TaskConfig(seed=0))))
    policy = build_causal_lm("tiny", tokenizer, seed=0)
    assert 0.8e6 < count_parameters(policy) < 1.2e6
    assert not policy.training
    assert torch.equal(
        next(policy.parameters()), next(build_causal_lm("tiny", tokenizer, seed=0).parameters())
    )
    ids = tokenizer(["a b c", "d"], padding=True, return_tensors="pt")
    assert policy(**ids).logits.shape == (2, ids["input_ids"].shape[1], len(tokenizer))
    reward = build_reward_model("nano", tokenizer)
    assert reward(**ids).logits.shape == (2, 1)
    policy.save_pretrained(tmp_path)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), type(policy))
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        build_causal_lm("huge", tokenizer)
    assert {"nano", "tiny", "small"} <= set(MODEL_SIZES)


def test_quickstart_files_exist_after_testbed_cli(tmp_path):
    from lightning_rlhf.cli import cli_main

    cli_main(["testbed", "--out", str(tmp_path / "tb"), "--model-size", "nano", "--seed", "1"])
    assert json.loads(Path(tmp_path / "tb" / "task.json").read_text())["config"]["seed"] == 1
    assert (tmp_path / "tb" / "init_policy" / "config.json").is_file()

"""Tokenization with truncation, collation, and SFTDataModule's handling of bad rows."""

import json
from pathlib import Path

import pytest
import torch

from lightning_rlhf.data.collate import SFTCollator, pad_right
from lightning_rlhf.data.loading import DataError
from lightning_rlhf.data.sft import SFTDataModule
from lightning_rlhf.data.tokenize import encode_prompt_response
from lightning_rlhf.testbed.task import TaskConfig, WordTask

WORDS = WordTask(TaskConfig(seed=0)).words  # each " word" is exactly one token of the testbed tokenizer


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_encode_appends_eos_exactly_once(tokenizer):
    p, r, eos = ids(tokenizer, "P:"), ids(tokenizer, " a b"), tokenizer.eos_token_id
    enc = encode_prompt_response(tokenizer, "P:", " a b", max_length=64)
    assert enc.input_ids == p + r + [eos]
    assert enc.response_mask == [0] * len(p) + [1] * (len(r) + 1)
    assert not enc.truncated
    again = encode_prompt_response(tokenizer, "P:", " a b</s>", max_length=64)
    assert again.input_ids == enc.input_ids


def test_truncation_cuts_prompt_left_then_response_right(tokenizer):
    """Prompt 10 tokens, response 6 + EOS = 7, max_length 12, max_prompt_length 4.

    Prompt keeps max(4, 12 - 7) = 5 tokens from its end; the response keeps 12 - 5 = 7 (all of it).
    With max_length 8: prompt keeps max(4, 8 - 7) = 4 tokens, response keeps 8 - 4 = 4 tokens (EOS lost).
    """
    prompt = " " + " ".join(WORDS[:10])
    response = " " + " ".join(WORDS[10:16])
    p, r = ids(tokenizer, prompt), ids(tokenizer, response)
    assert (len(p), len(r)) == (10, 6)
    enc = encode_prompt_response(tokenizer, prompt, response, max_length=12, max_prompt_length=4)
    assert enc.input_ids == p[-5:] + r + [tokenizer.eos_token_id] and enc.truncated
    enc = encode_prompt_response(tokenizer, prompt, response, max_length=8, max_prompt_length=4)
    assert enc.input_ids == p[-4:] + r[:4]
    assert enc.response_mask == [0] * 4 + [1] * 4


def test_empty_response_is_dropped(tokenizer):
    assert encode_prompt_response(tokenizer, "P:", "", max_length=16) is None
    assert encode_prompt_response(tokenizer, "P:", "</s>", max_length=16) is None
    # A prompt that keeps every slot leaves no room for the response: dropped, not fed to a loss.
    prompt = " " + " ".join(WORDS[:10])
    assert (
        encode_prompt_response(tokenizer, prompt, " " + WORDS[11], max_length=10, max_prompt_length=10)
        is None
    )
    # One slot left: the response's first word survives (its EOS does not), so the example is kept.
    kept = encode_prompt_response(tokenizer, prompt, " " + WORDS[11], max_length=11, max_prompt_length=10)
    assert kept.input_ids[-1] == ids(tokenizer, " " + WORDS[11])[0] and kept.response_mask[-1] == 1


def test_pad_right_and_collator():
    assert pad_right([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    batch = SFTCollator(pad_token_id=9)(
        [
            {"input_ids": [5, 6, 7], "response_mask": [0, 1, 1]},
            {"input_ids": [8], "response_mask": [1]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="empty batch"):
        pad_right([], 0)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_datamodule_counts_dropped_rows_and_batches(tmp_path, tokenizer_dir):
    rows = [
        {"prompt": "P:", "completion": " a b"},
        {"prompt": "Q:", "completion": ""},
        {"prompt": "R:", "completion": " c"},
    ]
    dm = SFTDataModule(tokenizer_dir, write_jsonl(tmp_path / "d.jsonl", rows), batch_size=2)
    dm.setup("fit")
    assert dm.stats["train"] == {"rows": 3, "kept": 2, "dropped_empty": 1, "skipped_bad": 0, "truncated": 0}
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2
    assert torch.all(batch["response_mask"] <= batch["attention_mask"])
    assert dm.val_dataloader() == []


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": None, "completion": " a"},
            r"row 1 \(0-based\), field 'prompt': expected a string, got NoneType",
        ),
        (
            {"prompt": "P:", "completion": 3},
            r"row 1 \(0-based\), field 'completion': expected a string, got int",
        ),
    ],
)
def test_malformed_rows_name_file_row_and_field(tmp_path, tokenizer_dir, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "completion": " a"}, row])
    with pytest.raises(DataError, match=message) as info:
        SFTDataModule(tokenizer_dir, path).setup("fit")
    assert "bad.jsonl" in str(info.value)


def test_missing_column_names_the_flag(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "P:", "completion": " a"}])
    with pytest.raises(DataError, match="no column 'prompt'.*prompt_field|no column 'prompt'"):
        SFTDataModule(tokenizer_dir, path).setup("fit")


def test_missing_and_unparsable_files_are_named(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        SFTDataModule(tokenizer_dir, str(tmp_path / "nope.jsonl")).setup("fit")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "P:", "completion": " a"}\n{"prompt": \n')
    with pytest.raises(DataError, match="broken.jsonl"):
        SFTDataModule(tokenizer_dir, str(broken)).setup("fit")


def test_bad_arguments_name_the_flag(tokenizer_dir):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        SFTDataModule(tokenizer_dir, "x.jsonl", batch_size=0)


def test_constructor_keeps_its_positional_order(tokenizer_dir):
    # quickstart.py and configs/sft/testbed.yaml pass tokenizer, train_file, val_file positionally.
    dm = SFTDataModule(tokenizer_dir, "train.jsonl", "val.jsonl", "q", "a", 64, 16, 4, 0, 7)
    hp = dm.hparams
    assert (hp.train_file, hp.val_file, hp.prompt_field, hp.completion_field) == (
        "train.jsonl",
        "val.jsonl",
        "q",
        "a",
    )
    assert (hp.max_length, hp.max_prompt_length, hp.batch_size, hp.num_workers, hp.seed) == (64, 16, 4, 0, 7)
    assert dm.tokenizer_name == tokenizer_dir


def chat(*turns):
    """Messages alternating user / assistant, starting with the user."""
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


def test_messages_format_renders_the_chat_template_with_eos_once(tmp_path, tokenizer, tokenizer_dir):
    """Rows ``[user "hi", assistant " a b"]``: the template renders ``<|user|>\\nhi\\n<|assistant|>\\n``
    as the prompt and `` a b</s>\\n`` after it; the newline after EOS is cut, so the ids end with one EOS."""
    rows = [{"messages": chat("hi", " a b")}, {"messages": chat("x", " c", "y", " d")}]
    dm = SFTDataModule(tokenizer_dir, write_jsonl(tmp_path / "chat.jsonl", rows), batch_size=2)
    dm.setup("fit")
    eos = tokenizer.eos_token_id
    prompt = ids(tokenizer, "<|user|>\nhi\n<|assistant|>\n")
    first = dm.datasets["train"][0]
    assert first["input_ids"] == prompt + ids(tokenizer, " a b") + [eos]
    assert first["response_mask"] == [0] * len(prompt) + [1] * 3
    # Multi-turn: everything before the last assistant message is the prompt, earlier replies included.
    second_prompt = ids(tokenizer, "<|user|>\nx\n<|assistant|>\n c</s>\n<|user|>\ny\n<|assistant|>\n")
    assert dm.datasets["train"][1]["input_ids"] == second_prompt + ids(tokenizer, " d") + [eos]
    assert dm.stats["train"]["kept"] == 2


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (chat("hi"), "last message must be the assistant reply"),
        ([{"role": "assistant", "content": " a"}], "at least one message"),
        ([{"role": "user"}, {"role": "assistant", "content": " a"}], "message 0 needs a string 'role'"),
        ("hi", "expected a non-empty list"),
        (None, "expected a non-empty list.*missing"),
    ],
)
def test_bad_messages_raise_or_are_skipped_and_counted(tmp_path, tokenizer_dir, messages, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat("hi", " a")}, {"messages": messages}])
    with pytest.raises(DataError, match=rf"chat\.jsonl: row 1 \(0-based\), field 'messages': .*{message}"):
        SFTDataModule(tokenizer_dir, path, format="messages").setup("fit")
    dm = SFTDataModule(tokenizer_dir, path, format="messages", on_bad_row="skip")
    dm.setup("fit")
    assert (dm.stats["train"]["kept"], dm.stats["train"]["skipped_bad"]) == (1, 1)


def test_skip_mode_counts_bad_prompt_completion_rows_and_val_fraction_splits(tmp_path, tokenizer_dir):
    rows = [{"prompt": f"P{i}:", "completion": f" {WORDS[i]}"} for i in range(20)]
    rows[3]["completion"] = None
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = SFTDataModule(tokenizer_dir, path, on_bad_row="skip", val_fraction=0.25)
    dm.setup("fit")
    train, val = dm.stats["train"], dm.stats["val"]
    assert train["rows"] + val["rows"] == 20 and val["rows"] == 5
    assert train["skipped_bad"] + val["skipped_bad"] == 1
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 19
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[0] == 5 - val["skipped_bad"]


def test_every_row_bad_raises_even_when_skipping(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "P:", "completion": 1}])
    with pytest.raises(DataError, match="no usable row left.*skipped_bad=1.*first malformed row: .*row 0"):
        SFTDataModule(tokenizer_dir, path, on_bad_row="skip").setup("fit")


def test_chat_template_argument_for_tokenizers_without_one(tmp_path, tokenizer_dir):
    """A base model's tokenizer has no template: the datamodule's chat_template supplies one (and is kept on
    the tokenizer, which HFExport saves), exactly as configs/sft/llama2-7b-ultrachat.yaml uses it."""
    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "configs/sft/llama2-7b-ultrachat.yaml").read_text())
    template = config["data"]["init_args"]["chat_template"]
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = SFTDataModule(tokenizer_dir, str(path), format="messages", chat_template=template)
    dm.setup("fit")
    (row,) = dm.datasets["train"]
    tok = dm.tokenizer
    prompt = [i for i, m in zip(row["input_ids"], row["response_mask"], strict=True) if not m]
    response = [i for i, m in zip(row["input_ids"], row["response_mask"], strict=True) if m]
    assert tok.decode(prompt) == "[INST] hi [/INST]"
    assert tok.decode(response) == " yo</s>" and response.count(tok.eos_token_id) == 1
    assert tok.chat_template == template

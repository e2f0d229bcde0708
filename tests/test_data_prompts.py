"""PromptDataModule: standard and conversational prompts, left padding, truncation, bad rows, splits."""

import json

import pytest
import torch

from lightning_rlhf.data.collate import PromptCollator, pad_left
from lightning_rlhf.data.loading import DataError
from lightning_rlhf.data.prompts import PromptDataModule
from lightning_rlhf.testbed.task import TaskConfig, WordTask

WORDS = WordTask(TaskConfig(seed=0)).words  # each " word" is exactly one token of the testbed tokenizer


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def setup(tokenizer_dir, path, **kwargs):
    dm = PromptDataModule(tokenizer_dir, path, **kwargs)
    dm.setup("fit")
    return dm


def test_pad_left_and_collator():
    assert pad_left([[1, 2, 3], [4], []], 0).tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    batch = PromptCollator(pad_token_id=9)(
        [{"prompt": "a", "input_ids": [5, 6], "index": 3}, {"prompt": "b", "input_ids": [7], "index": 0}]
    )
    assert batch["prompt"] == ["a", "b"]
    assert batch["input_ids"].tolist() == [[5, 6], [9, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["index"].tolist() == [3, 0]
    with pytest.raises(ValueError, match="empty batch"):
        pad_left([], 0)


def test_standard_prompts_are_left_padded(tmp_path, tokenizer, tokenizer_dir):
    rows = [{"prompt": "Write 3 words about sea, not " + WORDS[0] + ":"}, {"prompt": "Hi:"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    dm = setup(tokenizer_dir, path, val_file=path, batch_size=2)
    batch = next(iter(dm.val_dataloader()))  # validation is not shuffled
    long, short, pad = ids(tokenizer, rows[0]["prompt"]), ids(tokenizer, "Hi:"), tokenizer.pad_token_id
    width = len(long)
    assert batch["input_ids"].tolist() == [long, [pad] * (width - len(short)) + short]
    assert batch["attention_mask"][1].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert batch["prompt"] == [rows[0]["prompt"], "Hi:"]
    assert batch["index"].tolist() == [0, 1]
    assert dm.stats["train"] == {"rows": 2, "kept": 2, "dropped_empty": 0, "skipped_bad": 0, "truncated": 0}


def test_conversational_prompts_use_the_generation_prompt(tmp_path, tokenizer, tokenizer_dir):
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}]
    dm = setup(tokenizer_dir, write_jsonl(tmp_path / "c.jsonl", rows))
    text = "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert dm.datasets["train"][0]["prompt"] == text
    assert dm.datasets["train"][0]["input_ids"] == ids(tokenizer, text)


def test_long_prompts_keep_their_end(tmp_path, tokenizer, tokenizer_dir):
    """A 10-word prompt (10 tokens) with max_prompt_length 4 keeps its last 4 tokens; the text is theirs."""
    prompt = " " + " ".join(WORDS[:10])
    dm = setup(tokenizer_dir, write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt}]), max_prompt_length=4)
    row = dm.datasets["train"][0]
    assert row["input_ids"] == ids(tokenizer, prompt)[-4:]
    assert row["prompt"] == " " + " ".join(WORDS[6:10])
    assert dm.stats["train"]["truncated"] == 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"other": 1}, "expected a string, got NoneType.*missing"),
        ({"prompt": None}, "got NoneType"),
        ({"prompt": 7}, "expected a string, got int"),
        ({"prompt": [{"role": "user", "content": "x"}]}, "got list.*looks conversational.*mixed formats"),
    ],
)
def test_bad_rows_raise_or_are_skipped(tmp_path, tokenizer_dir, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "A:"}, bad, {"prompt": "B:"}])
    with pytest.raises(DataError, match=rf"bad\.jsonl: row 1 \(0-based\), field 'prompt': .*{message}"):
        setup(tokenizer_dir, path)
    dm = setup(tokenizer_dir, path, on_bad_row="skip")
    assert (dm.stats["train"]["kept"], dm.stats["train"]["skipped_bad"]) == (2, 1)


def test_bad_message_and_empty_prompts(tmp_path, tokenizer_dir):
    rows = [{"prompt": [{"role": "user", "content": "x"}]}, {"prompt": [{"role": "user", "content": None}]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1 \(0-based\), field 'prompt': message 0 needs"):
        setup(tokenizer_dir, path)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "A:"}, {"prompt": ""}])
    assert setup(tokenizer_dir, empty).stats["train"]["dropped_empty"] == 1


def test_val_fraction_and_seeded_shuffle(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Q{i}:"} for i in range(20)])
    dm = setup(tokenizer_dir, path, val_fraction=0.2, batch_size=4, seed=1)
    train = {r["prompt"] for r in dm.datasets["train"]}
    val = {r["prompt"] for r in dm.datasets["val"]}
    assert len(val) == 4 and len(train) == 16 and not train & val
    first = [p for b in dm.train_dataloader() for p in b["prompt"]]
    again = setup(tokenizer_dir, path, val_fraction=0.2, batch_size=4, seed=1)
    assert first == [p for b in again.train_dataloader() for p in b["prompt"]]
    assert sorted(first) == sorted(train)
    assert torch.is_tensor(next(iter(dm.val_dataloader()))["input_ids"])


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="PromptDataModule: max_prompt_length must be an integer >= 1"):
        PromptDataModule("tok", "x.jsonl", max_prompt_length=0)
    with pytest.raises(ValueError, match="PromptDataModule: format must be one of .auto., .standard."):
        PromptDataModule("tok", "x.jsonl", format="transcript")
    with pytest.raises(ValueError, match="implicit_prompt_delimiter"):
        PromptDataModule("tok", "x.jsonl", format="implicit", implicit_prompt_delimiter="")


def test_implicit_format_cuts_hh_transcripts_after_the_last_assistant_turn(tmp_path, tokenizer_dir):
    """HH-RLHF rows are transcripts: the PPO prompt is everything up to the last "\\n\\nAssistant:"."""
    from lightning_rlhf.data.loading import DataError

    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: I am fine."},
        {"chosen": "no turns here"},
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = PromptDataModule(
        tokenizer_dir, str(path), prompt_field="chosen", format="implicit", on_bad_row="skip"
    )
    dm.setup("fit")
    (row,) = dm.datasets["train"]
    assert row["prompt"] == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    assert dm.stats["train"]["skipped_bad"] == 1
    with pytest.raises(DataError, match="row 1.*'chosen'.*no '\\\\n\\\\nAssistant:'"):
        PromptDataModule(tokenizer_dir, str(path), prompt_field="chosen", format="implicit").setup("fit")


def test_extra_columns_are_carried_and_checked(tmp_path, tokenizer_dir):
    rows = [
        {"prompt": "A:", "answer": "4", "tests": '{"inputs": ["1"], "outputs": ["2"]}', "meta": [1, [2]]},
        {"prompt": "B:", "answer": "9", "tests": '{"inputs": [], "outputs": []}', "meta": [3, [4]]},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    dm = setup(tokenizer_dir, path, val_file=path, batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    # values as written: a JSON string stays a string, nested lists stay Python lists, nothing is a tensor
    assert batch["columns"] == {
        "answer": ["4", "9"],
        "tests": [rows[0]["tests"], rows[1]["tests"]],
        "meta": [[1, [2]], [3, [4]]],
    }
    assert setup(tokenizer_dir, path, columns=["meta"]).datasets["train"][0]["columns"] == {"meta": [1, [2]]}
    with pytest.raises(DataError, match=r"p\.jsonl: no column 'tset'.*set the matching columns argument"):
        setup(tokenizer_dir, path, columns=["tset"])
    with pytest.raises(ValueError, match="columns names the prompt column 'prompt'"):
        PromptDataModule("tok", path, columns=["prompt", "answer"])
    with pytest.raises(ValueError, match="columns lists a name twice"):
        PromptDataModule("tok", path, columns=["answer", "answer"])
    # the collator of data without extra columns (and of hand-built rows) still works
    assert PromptCollator(0)([{"prompt": "a", "input_ids": [1], "index": 0}])["columns"] == {}

"""Plain-string rows and chat templates (#16 item 7): `apply_chat_template` on the three datamodules.

True renders a standard-format row exactly as the same row written as messages; the default (None) uses the
strings as written, as TRL does, and warns once when the tokenizer has a chat template; False is silent.
"""

import copy
import json
import logging

import pytest

from lightning_rlhf.data.loading import DataError
from lightning_rlhf.data.preference import PreferenceDataModule
from lightning_rlhf.data.prompts import PromptDataModule
from lightning_rlhf.data.sft import SFTDataModule
from lightning_rlhf.data.tokenize import encode_prompt

PROMPT, GOOD, BAD = "What do bees make?", "Bees make honey.", "Bees make cars."


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def setup(dm):
    dm.setup("fit")
    return dm.datasets["train"]


def test_sft_strings_with_the_template_equal_the_messages_row(tmp_path, tokenizer_dir):
    plain = write(tmp_path / "plain.jsonl", [{"prompt": PROMPT, "completion": GOOD}])
    chat = write(tmp_path / "chat.jsonl", [{"messages": user(PROMPT) + assistant(GOOD)}])
    (wrapped,) = setup(SFTDataModule(tokenizer_dir, plain, apply_chat_template=True))
    (messages,) = setup(SFTDataModule(tokenizer_dir, chat))
    assert wrapped == messages
    (as_written,) = setup(SFTDataModule(tokenizer_dir, plain, apply_chat_template=False))
    assert as_written["input_ids"] != messages["input_ids"]


def test_preference_strings_with_the_template_equal_the_conversational_row(tmp_path, tokenizer_dir):
    plain = write(tmp_path / "plain.jsonl", [{"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}])
    chat = write(
        tmp_path / "chat.jsonl",
        [{"prompt": user(PROMPT), "chosen": assistant(GOOD), "rejected": assistant(BAD)}],
    )
    (wrapped,) = setup(PreferenceDataModule(tokenizer_dir, plain, apply_chat_template=True))
    (conversational,) = setup(PreferenceDataModule(tokenizer_dir, chat))
    assert wrapped == conversational


def test_prompt_strings_with_the_template_end_in_the_generation_prompt(tmp_path, tokenizer_dir):
    plain = write(tmp_path / "plain.jsonl", [{"prompt": PROMPT}])
    chat = write(tmp_path / "chat.jsonl", [{"prompt": user(PROMPT)}])
    (wrapped,) = setup(PromptDataModule(tokenizer_dir, plain, batch_size=1, apply_chat_template=True))
    (conversational,) = setup(PromptDataModule(tokenizer_dir, chat, batch_size=1))
    assert wrapped == conversational
    dm = PromptDataModule(tokenizer_dir, plain, batch_size=1, apply_chat_template=False)
    (as_written,) = setup(dm)
    assert as_written["prompt"] == PROMPT
    assert as_written["input_ids"] == encode_prompt(dm.tokenizer, PROMPT, max_prompt_length=256)[0]


def test_the_default_uses_strings_as_written_and_warns_once(tmp_path, tokenizer_dir, caplog):
    rows = [{"prompt": PROMPT, "completion": " " + GOOD}] * 3
    train, val = write(tmp_path / "train.jsonl", rows), write(tmp_path / "val.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="lightning_rlhf"):
        default = setup(SFTDataModule(tokenizer_dir, train, val, batch_size=1))
    notices = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
    assert len(notices) == 1, notices  # once, although the train and the val file were both read
    assert "train.jsonl: the rows are plain strings, used as written" in notices[0]
    assert repr(PROMPT + " " + GOOD) in notices[0] and "apply_chat_template=true" in notices[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_rlhf"):
        silent = setup(SFTDataModule(tokenizer_dir, train, val, batch_size=1, apply_chat_template=False))
    assert not [r for r in caplog.records if "chat template" in r.getMessage()]
    assert default == silent


def test_a_template_asked_for_without_one_is_named(tmp_path, tokenizer):
    tokenizer = copy.deepcopy(tokenizer)  # the session fixture keeps its template
    tokenizer.chat_template = None
    folder = tmp_path / "plain_tokenizer"
    tokenizer.save_pretrained(folder)
    plain = write(tmp_path / "plain.jsonl", [{"prompt": PROMPT, "completion": GOOD}])
    with pytest.raises(DataError, match="no chat_template"):
        setup(SFTDataModule(str(folder), plain, apply_chat_template=True))
    setup(SFTDataModule(str(folder), plain))  # no template and the default: nothing to say


def test_hh_transcripts_without_the_blank_line_warn_with_an_example(tmp_path, tokenizer_dir, caplog):
    """#16 item 7: 'Human: ... Assistant:' without '\\n\\n' falls back to a word boundary, and says so."""
    rows = [
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello there",
            "rejected": "\n\nHuman: hi\n\nAssistant: go away",
        },
        {"chosen": "Human: hi Assistant: hello there", "rejected": "Human: hi Assistant: go away"},
        {"chosen": "Human: yo Assistant: hey you", "rejected": "Human: yo Assistant: bye"},
    ]
    dm = PreferenceDataModule(tokenizer_dir, write(tmp_path / "hh.jsonl", rows))
    with caplog.at_level(logging.WARNING, logger="lightning_rlhf"):
        dm.setup("fit")
    (warning,) = [r.getMessage() for r in caplog.records if "implicit-prompt" in r.getMessage()]
    assert "hh.jsonl: 2 implicit-prompt rows have no '\\n\\nAssistant:'" in warning
    assert "'Human: hi Assistant:'" in warning and "set implicit_prompt_delimiter" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_rlhf"):
        PreferenceDataModule(tokenizer_dir, write(tmp_path / "ok.jsonl", rows[:1])).setup("fit")
    assert not [r for r in caplog.records if "implicit-prompt" in r.getMessage()]

"""PreferenceDataModule: formats, pair truncation, bad rows, splits, length grouping, fingerprints."""

import json

import datasets
import pytest
import torch

from lightning_rlhf.data.loading import DataError
from lightning_rlhf.data.preference import PreferenceDataModule
from lightning_rlhf.testbed.files import tokenizer_corpus
from lightning_rlhf.testbed.task import TaskConfig, WordTask
from lightning_rlhf.testbed.tokenizer import train_tokenizer

WORDS = WordTask(TaskConfig(seed=0)).words  # each " word" is exactly one token of the testbed tokenizer
HH_CHOSEN = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: I am fine."
HH_REJECTED = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: I am bad."


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def words(start, count):
    return " " + " ".join(WORDS[start : start + count])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pairs(n, offset=0):
    """``n`` distinct standard rows: prompt "P<i>:", chosen and rejected one distinct word each."""
    return [
        {"prompt": f"P{i + offset}:", "chosen": words(i % 40, 1), "rejected": words(i % 40 + 1, 1)}
        for i in range(n)
    ]


def setup(tokenizer_dir, path, **kwargs):
    dm = PreferenceDataModule(tokenizer_dir, path, **kwargs)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------ formats
def test_standard_format_batches(tmp_path, tokenizer, tokenizer_dir):
    rows = [
        {"prompt": "P:", "chosen": " a b", "rejected": " c"},
        {"prompt": "Q:", "chosen": " d", "rejected": " e"},
    ]
    dm = setup(tokenizer_dir, write_jsonl(tmp_path / "d.jsonl", rows), batch_size=2)
    batch = next(iter(dm.reference_dataloader()))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    p, ab, c = ids(tokenizer, "P:"), ids(tokenizer, " a b"), ids(tokenizer, " c")
    assert batch["input_ids"].shape[0] == 4
    assert batch["input_ids"][0].tolist()[: len(p + ab) + 1] == p + ab + [eos]
    chosen_len = len(p + ab) + 1
    rejected = batch["input_ids"][2].tolist()
    assert rejected == p + c + [eos] + [pad] * (batch["input_ids"].shape[1] - len(p + c) - 1)
    assert batch["response_mask"][2].tolist()[: len(p + c) + 1] == [0] * len(p) + [1] * (len(c) + 1)
    assert batch["attention_mask"][0].sum() == chosen_len
    assert batch["margin"].tolist() == [0.0, 0.0] and batch["index"].tolist() == [0, 1]
    assert dm.stats["train"] == {
        "rows": 2,
        "kept": 2,
        "dropped_empty": 0,
        "skipped_bad": 0,
        "truncated": 0,
        "dropped_identical": 0,
    }
    assert dm.val_dataloader() == []


def test_implicit_format_end_to_end(tmp_path, tokenizer, tokenizer_dir):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    dm = setup(tokenizer_dir, path)
    row, eos = dm.datasets["train"][0], tokenizer.eos_token_id
    assert row["prompt_ids"] == ids(tokenizer, HH_CHOSEN[: -len(" I am fine.")])
    assert row["chosen_ids"] == ids(tokenizer, " I am fine.") + [eos]
    assert row["rejected_ids"] == ids(tokenizer, " I am bad.") + [eos]


def chat(*turns):
    """Messages alternating user / assistant, starting with the user."""
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


def test_conversational_formats_render_the_template_with_eos_once(tmp_path, tokenizer, tokenizer_dir):
    """Prompt ``[user "hi"]`` renders as ``<|user|>\\nhi\\n<|assistant|>\\n``; the reply `` a`` renders as
    `` a</s>\\n``, cut to `` a</s>`` so the ids end with exactly one EOS and no newline after it."""
    with_prompt = {"prompt": chat("hi"), "chosen": [chat("", " a")[1]], "rejected": [chat("", " b")[1]]}
    whole = {"chosen": chat("hi", " a"), "rejected": chat("hi", " b")}
    eos = tokenizer.eos_token_id
    expected = (ids(tokenizer, "<|user|>\nhi\n<|assistant|>\n"), ids(tokenizer, " a") + [eos])
    for name, row in (("prompt.jsonl", with_prompt), ("whole.jsonl", whole)):
        dm = setup(tokenizer_dir, write_jsonl(tmp_path / name, [row]))
        encoded = dm.datasets["train"][0]
        assert (encoded["prompt_ids"], encoded["chosen_ids"]) == expected
        assert encoded["rejected_ids"] == ids(tokenizer, " b") + [eos]
    # Whole multi-turn conversations: every shared leading message is prompt, earlier replies included.
    multi = {"chosen": chat("hi", " a", "more", " c"), "rejected": chat("hi", " a", "more", " d")}
    encoded = setup(tokenizer_dir, write_jsonl(tmp_path / "multi.jsonl", [multi])).datasets["train"][0]
    assert encoded["prompt_ids"] == ids(
        tokenizer, "<|user|>\nhi\n<|assistant|>\n a</s>\n<|user|>\nmore\n<|assistant|>\n"
    )
    assert encoded["chosen_ids"] == ids(tokenizer, " c") + [eos]


def test_template_that_is_not_prefix_stable_names_the_row(tmp_path, tokenizer):
    odd = train_tokenizer(tokenizer_corpus(WordTask(TaskConfig(seed=0))))
    # The generation prompt opens "<|assistant|>\n" but assistant turns render as "<|assistant|> ...".
    odd.chat_template = tokenizer.chat_template.replace(
        "'|>\n' + message['content']", "'|> ' + message['content']"
    )
    assert odd.chat_template != tokenizer.chat_template
    odd.save_pretrained(tmp_path / "odd")
    path = write_jsonl(tmp_path / "c.jsonl", [{"chosen": chat("hi", " a"), "rejected": chat("hi", " b")}])
    with pytest.raises(
        DataError,
        match=r"c\.jsonl: row 0 \(0-based\), field 'chosen': the chat template is not prefix-stable",
    ):
        setup(str(tmp_path / "odd"), path)


# ------------------------------------------------------------------------------------------ bad rows
def standard(i):
    return {"prompt": f"P{i}:", "chosen": " a", "rejected": " b", "m": 1.0}


def conversational(i):
    return {"prompt": chat(f"hi {i}"), "chosen": [chat("", " a")[1]], "rejected": [chat("", " b")[1]]}


def implicit(i):
    return {"chosen": f"\n\nHuman: q{i}\n\nAssistant: a", "rejected": f"\n\nHuman: q{i}\n\nAssistant: b"}


BAD_ROWS = {
    "missing field": (
        standard,
        {"prompt": "P:", "chosen": " a", "m": 1.0},
        {},
        "rejected",
        "expected a string, got NoneType.*missing",
    ),
    "None": (
        standard,
        {"prompt": None, "chosen": " a", "rejected": " b", "m": 1.0},
        {},
        "prompt",
        "got NoneType",
    ),
    "non-string": (
        standard,
        {"prompt": "P:", "chosen": 3, "rejected": " b", "m": 1.0},
        {},
        "chosen",
        "expected a string, got int 3",
    ),
    "chosen == rejected": (
        standard,
        {"prompt": "P:", "chosen": " a", "rejected": " a", "m": 1.0},
        {},
        "rejected",
        "identical to 'chosen'",
    ),
    "mixed formats": (
        standard,
        {**conversational(9), "m": 1.0},
        {},
        "prompt",
        "got list.*looks conversational but the dataset is standard \\(detected from row 0\\)",
    ),
    "bad margin": (
        standard,
        {**standard(9), "m": "high"},
        {"margin_field": "m"},
        "m",
        "expected a finite number, got str",
    ),
    "bad message dict": (
        conversational,
        {**conversational(9), "chosen": [{"role": "assistant"}]},
        {},
        "chosen",
        "message 0 needs a string 'role' and a string 'content'",
    ),
    "message list is a string": (
        conversational,
        {**conversational(9), "rejected": " b"},
        {},
        "rejected",
        "expected a non-empty list",
    ),
    "identical conversations": (
        conversational,
        {**conversational(9), "rejected": [chat("", " a")[1]]},
        {},
        "rejected",
        "identical",
    ),
    "implicit without a prompt": (
        implicit,
        {"chosen": "yes", "rejected": "no"},
        {},
        "chosen",
        "share no prompt",
    ),
    "implicit None": (
        implicit,
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": None},
        {},
        "rejected",
        "got NoneType",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_raises_naming_file_row_field_or_is_skipped_and_counted(tmp_path, tokenizer_dir, case):
    good, bad, kwargs, field, message = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [good(0), bad, good(2)])
    pattern = rf"bad\.jsonl: row 1 \(0-based\), field '{field}': .*{message}.*on_bad_row='skip'"
    with pytest.raises(DataError, match=pattern):
        setup(tokenizer_dir, path, **kwargs)
    dm = setup(tokenizer_dir, path, on_bad_row="skip", **kwargs)
    assert (dm.stats["train"]["rows"], dm.stats["train"]["kept"], dm.stats["train"]["skipped_bad"]) == (
        3,
        2,
        1,
    )
    assert [r["index"] for r in dm.datasets["train"]] == [0, 1]


def test_missing_column_names_the_argument(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "P:", "good": " a", "rejected": " b"}])
    with pytest.raises(DataError, match=r"d\.jsonl: no column 'chosen'.*\*_field"):
        setup(tokenizer_dir, path)
    with pytest.raises(DataError, match="no column 'question'"):
        setup(
            tokenizer_dir,
            write_jsonl(tmp_path / "e.jsonl", pairs(2)),
            prompt_field="question",
            format="standard",
        )
    renamed = [{"question": "P:", "good": " a", "bad": " b"}]
    dm = setup(
        tokenizer_dir,
        write_jsonl(tmp_path / "f.jsonl", renamed),
        prompt_field="question",
        chosen_field="good",
        rejected_field="bad",
    )
    assert dm.stats["train"]["kept"] == 1


def test_drops_are_counted_and_warned_and_all_gone_raises(tmp_path, tokenizer_dir, caplog):
    rows = [
        {"prompt": "P:", "chosen": " a", "rejected": " b"},
        {"prompt": "Q:", "chosen": "", "rejected": " b"},  # empty response: dropped_empty
        {"prompt": "R:", "chosen": words(0, 6), "rejected": words(0, 5) + words(30, 1)},  # same first 5 words
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level("WARNING"):
        dm = setup(tokenizer_dir, path, max_length=6, max_prompt_length=1)
    stats = dm.stats["train"]
    assert (stats["kept"], stats["dropped_empty"], stats["dropped_identical"]) == (1, 1, 1)
    assert "kept 1 of 3 rows" in caplog.text and "d.jsonl" in caplog.text
    with pytest.raises(DataError, match="no usable row left for the train split.*dropped_empty=1"):
        setup(tokenizer_dir, write_jsonl(tmp_path / "e.jsonl", rows[1:2]))


def test_margin_column(tmp_path, tokenizer_dir):
    rows = [{**r, "gap": g} for r, g in zip(pairs(3), [0.5, 2, -1.25], strict=True)]
    dm = setup(tokenizer_dir, write_jsonl(tmp_path / "d.jsonl", rows), margin_field="gap", batch_size=3)
    batch = next(iter(dm.reference_dataloader()))
    assert batch["margin"].tolist() == [0.5, 2.0, -1.25] and batch["margin"].dtype == torch.float32


# ------------------------------------------------------------------------------------------ splits, loaders
def prompts_of(rows):
    return [tuple(r["prompt_ids"]) for r in rows]


def test_val_fraction_is_seeded_and_disjoint(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "d.jsonl", pairs(40))
    a = setup(tokenizer_dir, path, val_fraction=0.25, seed=3)
    b = setup(tokenizer_dir, path, val_fraction=0.25, seed=3)
    c = setup(tokenizer_dir, path, val_fraction=0.25, seed=4)
    train, val = prompts_of(a.datasets["train"]), prompts_of(a.datasets["val"])
    assert len(val) == 10 and len(train) == 30 and not set(train) & set(val)
    assert len(set(train) | set(val)) == 40
    assert (train, val) == (prompts_of(b.datasets["train"]), prompts_of(b.datasets["val"]))
    assert set(val) != set(prompts_of(c.datasets["val"]))
    assert (a.stats["train"]["rows"], a.stats["val"]["rows"]) == (30, 10)
    assert [r["index"] for r in a.datasets["val"]] == list(range(10))
    assert next(iter(a.val_dataloader()))["index"].tolist() == list(range(8))


def test_folder_splits_saved_datasets_and_val_file(tmp_path, tokenizer_dir):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", pairs(6))
    write_jsonl(folder / "test.jsonl", pairs(2, offset=100))
    dm = setup(tokenizer_dir, str(folder), val_split="test")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (6, 2)
    saved = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(pairs(4)), "validation": datasets.Dataset.from_list(pairs(3))}
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    dm = setup(tokenizer_dir, str(tmp_path / "saved"), val_split="validation")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (4, 3)
    with pytest.raises(DataError, match=r"no split 'test'.*\['train', 'validation'\].*\*_split"):
        setup(tokenizer_dir, str(tmp_path / "saved"), val_split="test")
    dm = setup(tokenizer_dir, str(folder / "train.jsonl"), val_file=str(folder / "test.jsonl"))
    assert len(dm.datasets["val"]) == 2 and dm.stats["val"]["rows"] == 2


def test_csv_and_parquet_load_like_jsonl(tmp_path, tokenizer_dir):
    rows = [{**r, "gap": 0.5} for r in pairs(5)]
    table = datasets.Dataset.from_list(rows)
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    table.to_parquet(str(tmp_path / "d.parquet"))
    reference = setup(tokenizer_dir, write_jsonl(tmp_path / "d.jsonl", rows), margin_field="gap")
    for name in ("d.csv", "d.parquet"):
        dm = setup(tokenizer_dir, str(tmp_path / name), margin_field="gap")
        assert dm.datasets["train"] == reference.datasets["train"]
        assert dm.fingerprint() == reference.fingerprint()


def test_reference_loader_is_in_index_order_and_train_loader_is_a_seeded_shuffle(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "d.jsonl", pairs(10))
    dm = setup(tokenizer_dir, path, batch_size=4)
    assert [i for b in dm.reference_dataloader() for i in b["index"].tolist()] == list(range(10))
    order = [i for b in dm.train_dataloader() for i in b["index"].tolist()]
    again = [
        i for b in setup(tokenizer_dir, path, batch_size=4).train_dataloader() for i in b["index"].tolist()
    ]
    assert sorted(order) == list(range(10)) and order == again and order != list(range(10))
    with pytest.raises(ValueError, match="no 'val' split"):
        dm.reference_dataloader("val")


def padding(batches):
    return sum(int((b["attention_mask"] == 0).sum()) for b in batches)


def test_group_by_length_cuts_padding_and_yields_every_index_once(tmp_path, tokenizer_dir):
    rows = [{"prompt": f"P{i}:", "chosen": words(0, 1 + (i * 7) % 30), "rejected": " b"} for i in range(120)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    plain = setup(tokenizer_dir, path, batch_size=8)
    grouped = setup(tokenizer_dir, path, batch_size=8, group_by_length=True)
    loader = grouped.train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        epochs.append([i for b in batches for i in b["index"].tolist()])
        assert sorted(epochs[-1]) == list(range(120))
        assert padding(batches) < 0.5 * padding(list(plain.train_dataloader()))
    assert epochs[0] != epochs[1]
    loader.sampler.set_epoch(0)
    assert [i for b in loader for i in b["index"].tolist()] == epochs[0]  # seeded


def test_fingerprint_is_stable_and_follows_the_data(tmp_path, tokenizer_dir):
    rows = pairs(6)
    first = setup(tokenizer_dir, write_jsonl(tmp_path / "a.jsonl", rows)).fingerprint()
    assert setup(tokenizer_dir, write_jsonl(tmp_path / "b.jsonl", rows)).fingerprint() == first
    assert len(first) == 64 and int(first, 16) >= 0
    changed = [*rows[:-1], {**rows[-1], "rejected": " zz"}]
    assert setup(tokenizer_dir, write_jsonl(tmp_path / "c.jsonl", changed)).fingerprint() != first
    assert setup(tokenizer_dir, write_jsonl(tmp_path / "d.jsonl", rows[::-1])).fingerprint() != first
    # The same token sequences split differently between prompt and response (other response masks).
    split_a = [{"prompt": "P:", "chosen": words(0, 2), "rejected": words(0, 1) + words(5, 1)}]
    split_b = [{"prompt": "P:" + words(0, 1), "chosen": words(1, 1), "rejected": words(5, 1)}]
    a = setup(tokenizer_dir, write_jsonl(tmp_path / "g.jsonl", split_a))
    b = setup(tokenizer_dir, write_jsonl(tmp_path / "h.jsonl", split_b))
    batch_a, batch_b = next(iter(a.reference_dataloader())), next(iter(b.reference_dataloader()))
    assert torch.equal(batch_a["input_ids"], batch_b["input_ids"])
    assert not torch.equal(batch_a["response_mask"], batch_b["response_mask"])
    assert a.fingerprint() != b.fingerprint()
    # A tokenizer with another vocabulary gives another fingerprint for the same ids.
    before = a.fingerprint()
    a.tokenizer.add_tokens(["<extra>"])
    assert a.fingerprint() != before
    with pytest.raises(DataError, match="no 'val' split"):
        setup(tokenizer_dir, write_jsonl(tmp_path / "f.jsonl", rows)).fingerprint("val")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"max_length": 1}, "max_length must be an integer >= 2"),
        ({"max_length": 8, "max_prompt_length": 8}, r"max_prompt_length must be in \[1, max_length\)"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        (
            {"val_fraction": 0.1, "val_split": "test"},
            "val_fraction=0.1 .* cannot be combined with val_file or val_split",
        ),
        ({"on_bad_row": "ignore"}, "on_bad_row must be one of 'raise', 'skip'"),
        ({"format": "chatml"}, "format must be one of 'auto', 'standard', 'conversational', 'implicit'"),
        ({"chosen_field": "x", "rejected_field": "x"}, "chosen_field and rejected_field are both 'x'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=f"PreferenceDataModule: {message}"):
        PreferenceDataModule("tok", "x.jsonl", **kwargs)


def test_implicit_errors_name_the_renamed_columns(tmp_path, tokenizer_dir):
    rows = [{"good": HH_CHOSEN, "bad": HH_REJECTED}, {"good": "yes", "bad": "no"}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1 \(0-based\), field 'good': 'good' and 'bad' share no prompt"):
        setup(tokenizer_dir, path, chosen_field="good", rejected_field="bad")

"""Hostile data, fuzzed with hypothesis: whatever rows or bytes a data file holds, setting up a datamodule
ends in a kept-and-counted dataset, or a DataError that names the file (and for a bad row, the row and the
field), or a counted skip under on_bad_row="skip". Never another exception from deep inside, never a NaN
margin, never a row lost without a count.

Fixed example budget, derandomized (the same cases on every run): 100 + 80 + 60 + 60 + 60 = 360 generated
cases plus the hand-written parquet / mixed-format cases, about 20 s on one CPU core.
"""

import csv
import io
import itertools
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_rlhf.data.loading import DataError
from lightning_rlhf.data.preference import PreferenceDataModule
from lightning_rlhf.data.prompts import PromptDataModule
from lightning_rlhf.data.sft import SFTDataModule

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_names = itertools.count()

text = st.one_of(
    st.sampled_from(["", " ", "\n", " a b", "P:", " c", "\n\nHuman: hi\n\nAssistant: yo", "\x00", "\ud7ff"]),
    st.text(max_size=12),
    st.text(alphabet="ab \n", min_size=3000, max_size=3000).map(lambda s: "P:" + s),  # very long
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", 3]), "content": st.one_of(text, st.none())}
)
value = st.one_of(
    text,
    st.none(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(message, max_size=3),
    st.dictionaries(st.sampled_from(["x", "role"]), text, max_size=2),
)


def row_of(keys):
    return st.dictionaries(st.sampled_from(keys), value, max_size=len(keys))


def identical_pair():
    return st.builds(lambda p, t: {"prompt": p, "chosen": t, "rejected": t}, text, text)


def write(tmp_path, rows, kind: str) -> str:
    """``rows`` as a ``kind`` file (jsonl, json, csv); values a format cannot hold are written as text."""
    path = tmp_path / f"d{next(_names)}.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        keys = sorted({k for r in rows for k in r})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {k: v if isinstance(v, str | int | float) else json.dumps(v) for k, v in r.items()}
            )
        path.write_text(out.getvalue())
    return str(path)


def check_outcome(dm, path: str, skip: bool) -> None:
    """Set up ``dm``: either a consistent, counted dataset, or a DataError naming the file."""
    try:
        dm.setup("fit")
    except DataError as err:
        message = str(err)
        assert path in message, message
        # datasets' own words for "no rows" / bad bytes are replaced by ours (found by this fuzzer).
        assert "StopIteration" not in message and "corresponds to no data" not in message, message
        assert "UnicodeDecodeError" not in message, message
        if "row " in message and "field" in message and not skip:
            assert message.index(path) < message.index("row ") < message.index("field"), message
        return
    stats = dm.stats["train"]
    lost = sum(v for k, v in stats.items() if k.startswith(("dropped", "skipped")))
    assert stats["kept"] + lost == stats["rows"] == len(dm.datasets["train"]) + lost
    if not skip:
        assert stats["skipped_bad"] == 0
    for row in dm.datasets["train"]:
        assert math.isfinite(row.get("margin", 0.0))  # a NaN margin would make the loss NaN
    next(iter(dm.train_dataloader()))  # the kept rows collate


def preference(tokenizer, path, skip, **kwargs):
    dm = PreferenceDataModule("unused", path, on_bad_row="skip" if skip else "raise", batch_size=2, **kwargs)
    dm.tokenizer = tokenizer  # loaded once for all cases
    return dm


@settings(FUZZ, max_examples=100)
@given(
    rows=st.lists(
        st.one_of(row_of(["prompt", "chosen", "rejected", "margin"]), identical_pair()), max_size=5
    ),
    kind=st.sampled_from(["jsonl", "json", "csv"]),
    skip=st.booleans(),
    margin=st.booleans(),
)
def test_preference_rows(tmp_path, tokenizer, rows, kind, skip, margin):
    path = write(tmp_path, rows, kind)
    kwargs = {"margin_field": "margin"} if margin else {}
    check_outcome(preference(tokenizer, path, skip, max_length=64, **kwargs), path, skip)


@settings(FUZZ, max_examples=80)
@given(
    rows=st.lists(row_of(["chosen", "rejected"]), min_size=1, max_size=4),
    fmt=st.sampled_from(["auto", "implicit", "conversational"]),
    skip=st.booleans(),
)
def test_implicit_and_conversational_rows(tmp_path, tokenizer, rows, fmt, skip):
    path = write(tmp_path, rows, "jsonl")
    check_outcome(preference(tokenizer, path, skip, format=fmt, max_length=64), path, skip)


@settings(FUZZ, max_examples=60)
@given(
    rows=st.lists(st.fixed_dictionaries({"prompt": text, "chosen": text, "rejected": text}), max_size=4),
    kind=st.sampled_from(["jsonl", "json", "csv"]),
    cut=st.floats(0, 1),
    garbage=st.sampled_from([b"", b"\xff\xfe", b"\xc3\x28", b"\x80abc", b"\x00"]),
    where=st.floats(0, 1),
)
def test_truncated_and_invalid_utf8_files(tmp_path, tokenizer, rows, kind, cut, garbage, where):
    """A file cut anywhere, or with bytes that are not UTF-8 spliced in anywhere."""
    path = write(tmp_path, rows, kind)
    with open(path, "rb") as f:
        data = f.read()
    data = data[: int(len(data) * cut)] if cut < 1 else data
    at = int(len(data) * where)
    with open(path, "wb") as f:
        f.write(data[:at] + garbage + data[at:])
    dm = preference(tokenizer, path, False, max_length=64)
    if garbage.strip(b"\x00"):
        with pytest.raises(DataError, match=r"line \d+ \(byte \d+\) is not valid UTF-8"):
            dm.setup("fit")
    else:
        check_outcome(dm, path, False)


@settings(FUZZ, max_examples=60)
@given(
    rows=st.lists(row_of(["prompt", "completion", "messages"]), max_size=4),
    kind=st.sampled_from(["jsonl", "json"]),
    skip=st.booleans(),
)
def test_sft_rows(tmp_path, tokenizer, rows, kind, skip):
    path = write(tmp_path, rows, kind)
    dm = SFTDataModule("unused", path, on_bad_row="skip" if skip else "raise", max_length=64, batch_size=2)
    dm.tokenizer = tokenizer
    check_outcome(dm, path, skip)


@settings(FUZZ, max_examples=60)
@given(
    rows=st.lists(row_of(["prompt"]), max_size=4),
    kind=st.sampled_from(["jsonl", "json", "csv"]),
    skip=st.booleans(),
    fmt=st.sampled_from(["auto", "implicit"]),
)
def test_prompt_rows(tmp_path, tokenizer, rows, kind, skip, fmt):
    path = write(tmp_path, rows, kind)
    dm = PromptDataModule(
        "unused", path, on_bad_row="skip" if skip else "raise", format=fmt, batch_size=1, drop_last=False
    )
    dm.tokenizer = tokenizer
    check_outcome(dm, path, skip)


def test_parquet_with_mixed_types_and_an_empty_table(tmp_path, tokenizer):
    """Parquet holds typed columns: an all-None column and an empty table are the hostile cases there."""
    import datasets

    rows = {"prompt": ["P:", None], "chosen": [" a", " b"], "rejected": [None, " c"]}
    path = str(tmp_path / "mixed.parquet")
    datasets.Dataset.from_dict(rows).to_parquet(path)
    with pytest.raises(DataError, match=r"mixed.parquet: row 0 \(0-based\), field 'rejected'"):
        preference(tokenizer, path, False).setup("fit")
    dm = preference(tokenizer, path, True)
    with pytest.raises(DataError, match="no usable row left.*skipped_bad=2"):
        dm.setup("fit")
    empty = str(tmp_path / "empty.parquet")
    datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).to_parquet(empty)
    with pytest.raises(DataError, match="empty.parquet: the file holds no rows"):
        preference(tokenizer, empty, False).setup("fit")
    for name, content in (("blank.jsonl", "\n \n"), ("none.json", "[]"), ("header.csv", "prompt,chosen\n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match=f"{name}: the file (is empty|holds no rows)"):
            preference(tokenizer, str(tmp_path / name), False).setup("fit")


def test_truncated_parquet_and_mixed_formats_in_one_file(tmp_path, tokenizer):
    import datasets

    path = tmp_path / "cut.parquet"
    datasets.Dataset.from_dict(
        {"prompt": ["P:"] * 50, "chosen": [" a"] * 50, "rejected": [" b"] * 50}
    ).to_parquet(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.parquet.*corrupted"):
        preference(tokenizer, str(path), True).setup("fit")

    standard = {"prompt": "P:", "chosen": " a", "rejected": " b"}
    chat = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "x"}],
        "rejected": [{"role": "assistant", "content": "y"}],
    }
    mixed = write(tmp_path, [standard, chat], "jsonl")
    with pytest.raises(
        DataError, match=r"row 1 \(0-based\), field 'prompt'.*looks conversational.*mixed formats"
    ):
        preference(tokenizer, mixed, False).setup("fit")
    dm = preference(tokenizer, mixed, True)
    dm.setup("fit")
    assert dm.stats["train"]["kept"] == 1 and dm.stats["train"]["skipped_bad"] == 1

"""Load a table of examples from a local file, a local dataset folder or a hub name, and check its fields."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from pathlib import Path

import datasets

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A dataset row or file is malformed; the message names the file, the row and the field."""


def load_table(source: str, *, split: str = "train") -> datasets.Dataset:
    """Load one split of ``source``.

    ``source`` is a ``.json``/``.jsonl``/``.csv``/``.parquet`` file (one table: ``split`` is ignored), a
    folder written by ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` from which ``split`` is taken), a
    folder of data files (``datasets.load_dataset`` maps file names such as ``train.jsonl`` /
    ``test.jsonl`` to splits; files without such names all land in ``"train"``), or a hub dataset name
    (which needs the network or a warm cache).
    """
    path = Path(source)
    if path.suffix.lower() in _BUILDERS:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {source}")
        builder, kwargs = _BUILDERS[path.suffix.lower()], {"data_files": str(path)}
        split = "train"  # a single file is always loaded as the "train" split of its own dataset
        if builder != "parquet":
            _check_text_file(path, source)
    elif path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _load_saved(path, split)
    elif not path.exists() and _looks_local(source):
        # Otherwise datasets takes it for a hub name and answers "Couldn't reach ... on the Hub".
        raise FileNotFoundError(
            f"no such file or folder: {source} (looked in {path.absolute().parent}); data files end in "
            f"{', '.join(_BUILDERS)}, and a hub dataset name has the form owner/name"
        )
    elif path.is_file():
        raise DataError(
            f"{source}: unsupported file type {path.suffix!r}; use one of {', '.join(_BUILDERS)}, or a "
            "folder written by datasets' save_to_disk"
        )
    else:
        builder, kwargs = source, {}
    try:
        return datasets.load_dataset(builder, split=split, **kwargs)
    except (FileNotFoundError, DataError):
        raise
    except Exception as err:  # datasets wraps parse errors several layers deep
        # The useful part (e.g. "JSON parse error ... in row 3") is in the innermost cause.
        causes, inner = [], err
        while inner is not None and len(causes) < 5:
            causes.append(f"{type(inner).__name__}: {inner}")
            inner = inner.__cause__ or inner.__context__
        if any(c.startswith("StopIteration") or "corresponds to no data" in c for c in causes):
            # datasets' words for a file that parsed but holds no row ("[]", a CSV header alone).
            raise DataError(f"{source}: the file holds no rows; add data or point *_file elsewhere") from err
        raise DataError(
            f"could not load {source!r} (split {split!r}): {' <- '.join(causes)}. Check that the file "
            "is valid JSON lines / CSV / parquet, that the split exists, or that the dataset name is right "
            "and available offline."
        ) from err


def _looks_local(text: str) -> bool:
    """A path meant as a local file or folder rather than a hub name (owner/name)."""
    path = Path(text)
    suffixes = "".join(path.suffixes).lower()
    data_like = any(word in suffixes for word in ("json", "csv", "parq", "arrow", "txt", "tsv"))
    first_is_dir = len(path.parts) > 1 and Path(path.parts[0]).is_dir()
    return path.is_absolute() or text.startswith((".", "~")) or data_like or first_is_dir


def _check_text_file(path: Path, source: str) -> None:
    """Empty files and bytes that are not UTF-8, named by line and byte (datasets reports neither well)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                bad = offset + err.start
                f.seek(0)
                line = f.read(bad).count(b"\n") + 1
                raise DataError(
                    f"{source}: line {line} (byte {bad}) is not valid UTF-8 ({err.reason}); re-save the file "
                    "as UTF-8 (or fix that line)"
                ) from None
            if not chunk:
                break
            offset += len(chunk)
            blank = blank and not text.strip()
    if blank:
        raise DataError(f"{source}: the file is empty; add data or point *_file elsewhere")


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{path}: no split {split!r} in this saved dataset (splits: {sorted(loaded)}); set the "
                "matching *_split argument"
            )
        return loaded[split]
    return loaded  # a single saved Dataset has no split names: like a single file, it is the whole table


def check_columns(
    table: datasets.Dataset, fields: Sequence[str], source: str, argument: str = "*_field"
) -> None:
    """Raise :class:`DataError` naming the column (and the argument to set) when one is absent or empty."""
    missing = [f for f in fields if f not in table.column_names]
    if missing:
        raise DataError(
            f"{source}: no column {missing[0]!r} (columns: {table.column_names}); set the matching "
            f"{argument} argument to the name your data uses"
        )
    if len(table) == 0:
        raise DataError(f"{source}: the dataset is empty")

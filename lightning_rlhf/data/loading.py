"""Load a table of examples from a local file, a local dataset folder or a hub name, and check its fields."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A dataset row or file is malformed; the message names the file, the row and the field."""


def load_table(source: str, *, split: str = "train") -> datasets.Dataset:
    """Load ``source`` with ``datasets.load_dataset``.

    ``source`` is a ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a local dataset folder, or a hub dataset
    name (which needs the network or a warm cache).
    """
    path = Path(source)
    if path.suffix.lower() in _BUILDERS:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {source}")
        builder, kwargs = _BUILDERS[path.suffix.lower()], {"data_files": str(path)}
        split = "train"  # a single file is always loaded as the "train" split of its own dataset
    else:
        builder, kwargs = source, {}
    try:
        return datasets.load_dataset(builder, split=split, **kwargs)
    except (FileNotFoundError, DataError):
        raise
    except Exception as err:  # datasets wraps parse errors several layers deep
        raise DataError(
            f"could not load {source!r} (split {split!r}): {type(err).__name__}: {err}. Check that the file "
            "is valid JSON lines / CSV / parquet, or that the dataset name is right and available offline."
        ) from err


def check_text_fields(table: datasets.Dataset, fields: Sequence[str], source: str) -> None:
    """Raise :class:`DataError` naming file, row and field for a missing, None, non-string or empty field."""
    missing = [f for f in fields if f not in table.column_names]
    if missing:
        raise DataError(
            f"{source}: no column {missing[0]!r} (columns: {table.column_names}); set the matching "
            "*_field argument to the name your data uses"
        )
    if len(table) == 0:
        raise DataError(f"{source}: the dataset is empty")
    for field in fields:
        for row, value in enumerate(table[field]):
            if not isinstance(value, str):
                raise DataError(
                    f"{source}: row {row} (0-based), field {field!r}: expected a string, got "
                    f"{type(value).__name__} {value!r:.60}"
                )

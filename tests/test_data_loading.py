"""load_table: a mistyped local path is "no such file", not a failed hub download."""

import pytest

from lightning_rlhf.data.loading import DataError, load_table


@pytest.mark.parametrize("source", ["data/conv.jsonnl", "./nothere", "data/sub/rows", "rows.jsonl.bak"])
def test_a_missing_local_path_is_named_as_such(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"no such file or folder: {source.replace('.', '[.]')} "):
        load_table(source)


def test_an_existing_file_of_another_type_is_refused_by_type(tmp_path):
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"rows\.txt: unsupported file type '\.txt'"):
        load_table(str(tmp_path / "rows.txt"))


def test_a_hub_name_is_still_looked_up_on_the_hub(tmp_path, monkeypatch):
    """owner/name with no local folder of that name goes to datasets (offline here, so it fails there)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="could not load 'someone/some-dataset'"):
        load_table("someone/some-dataset")

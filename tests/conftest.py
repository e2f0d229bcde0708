"""Shared test setup: every Hugging Face / datasets cache in a temporary folder, and no network."""

import os
import tempfile

_CACHE_ROOT = tempfile.mkdtemp(prefix="lightning_rlhf_test_cache_")
os.environ.setdefault("HF_HOME", os.path.join(_CACHE_ROOT, "hf"))
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_CACHE_ROOT, "datasets"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402  (the cache variables above must be set before anything imports transformers)


@pytest.fixture(scope="session")
def tokenizer():
    """The testbed's byte-level BPE tokenizer (seed 0): each invented word is one token."""
    from lightning_rlhf.testbed.files import tokenizer_corpus
    from lightning_rlhf.testbed.task import TaskConfig, WordTask
    from lightning_rlhf.testbed.tokenizer import train_tokenizer

    return train_tokenizer(tokenizer_corpus(WordTask(TaskConfig(seed=0))))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, tokenizer):
    """The same tokenizer saved as a folder, for modules that take a path."""
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(path)
    return str(path)

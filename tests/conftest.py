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


@pytest.fixture(scope="session")
def word_rl_testbed(tmp_path_factory):
    """The word testbed the RL tests train on (tests/word_rl.py: 1000 demonstrations, 256 prompts)."""
    from word_rl import write_rl_testbed

    return write_rl_testbed(tmp_path_factory.mktemp("word_rl"))


@pytest.fixture(scope="session")
def word_sft_start(tmp_path_factory, word_rl_testbed):
    """The SFT policy every "RL beats SFT" test starts from, trained once (tests/word_rl.py)."""
    from word_rl import train_sft_start

    return train_sft_start(word_rl_testbed, tmp_path_factory.mktemp("word_sft"))

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


# The suite on several cores (README's test command: pytest -n auto).

MAX_WORKERS = 4


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per usable core, at most ``MAX_WORKERS``. Each worker imports torch and the rest
    and builds its own session fixtures (about 1 GB each), and past a few workers the longest file alone (the
    quickstart, ~4 min) sets the wall time."""
    return max(1, min(_usable_cpus(), MAX_WORKERS))


# Under xdist each worker, and every process it starts, gets its share of the cores: two workers each running
# torch's default pool over both cores of the 2-core CI machine oversubscribe them (an earlier stop measured
# the quickstart fixture at 623 s that way, three times its time alone).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS:
    os.environ["OMP_NUM_THREADS"] = str(max(1, _usable_cpus() // _WORKERS))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Under xdist, whole files go to the workers in collection order, a worker asking for more as it runs low: a
# file's module fixtures (a trained quickstart, a study) are built once, and the longest files (CPU seconds on
# 2 cores, measured) go first, so that no worker starts one while the other is finishing. Within a file, and
# for every file not named, the order is unchanged.
LONGEST_FIRST = (
    "test_quickstart.py",
    "test_paper_study.py",
    "test_program_track.py",
    "test_deepspeed.py",
    "test_config_runs.py",
    "test_configs.py",
    "test_console.py",
    "test_ppo.py",
    "test_kill_resume_ranks.py",
    "test_critic_free.py",
    # files of 8-21 s: after them only files of a few seconds are left to hand out, so the two workers end
    # within seconds of each other (without them, one core idled for the last ~20 s)
    "test_real_model_cli.py",
    "test_sandbox_hostile.py",
    "test_benchmarks.py",
    "test_gpu_scripts.py",
    "test_kill_resume.py",
    "test_program_files.py",
    "test_lora.py",
    "test_data_fuzz.py",
)


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


def pytest_xdist_make_scheduler(config, log):
    """Whole files, in collection order (xdist's own ``loadfile`` would reorder them by test count)."""
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)

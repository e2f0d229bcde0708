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

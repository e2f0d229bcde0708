"""Loading is safe by default: no remote code unless asked for, checkpoints and caches read as data
(weights_only) with class paths restricted to the expected base class, reward functions only as callables."""

import pickle

import lightning as L
import pytest
import torch

from lightning_rlhf import DPOModule, PPOModule, PreferenceDataModule, RewardModule
from lightning_rlhf import models as model_loading
from lightning_rlhf.export import MODULE_CLASS_KEY, export_checkpoint
from lightning_rlhf.modules.reference_cache import _load_cache
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.task import TaskConfig
from lightning_rlhf.validation import ConfigError


class Evil:
    """Unpickling this would create ``marker``: the file's existence proves code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb")
    sizes = SplitSizes(sft_train=4, sft_eval=2, pairs_train=8, pairs_eval=2, prompts_train=4, prompts_eval=2)
    write_testbed(out, TaskConfig(seed=0), sizes, model_size="nano")
    return out


def test_remote_code_stays_off_unless_asked_for(testbed, monkeypatch):
    seen = []
    real = model_loading._load

    def spy(auto_class, name, what, **kwargs):
        seen.append((what, kwargs["trust_remote_code"]))
        return real(auto_class, name, what, **kwargs)

    monkeypatch.setattr(model_loading, "_load", spy)
    policy = str(testbed / "init_policy")
    for module in (RewardModule(policy), DPOModule(policy), PPOModule(policy, reward_function=len)):
        module.configure_model()
    assert seen and all(trust is False for _, trust in seen)
    assert {what for what, _ in seen} == {"model", "reward model", "tokenizer"}
    seen.clear()
    DPOModule(policy, trust_remote_code=True).configure_model()
    assert seen and all(trust is True for _, trust in seen)


def test_a_cache_file_never_runs_code_and_bad_ones_are_recomputed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "cache.pt"
    path.write_bytes(pickle.dumps({"chosen": Evil(marker)}))
    assert _load_cache(path, 3) is None and not marker.exists()
    torch.save({"chosen": torch.zeros(3), "rejected": torch.zeros(2)}, path)  # wrong length
    assert _load_cache(path, 3) is None
    torch.save({"chosen": torch.zeros(3), "rejected": torch.full((3,), float("nan"))}, path)
    assert _load_cache(path, 3) is None
    path.write_bytes(path.read_bytes()[:20])  # truncated by a crash
    assert _load_cache(path, 3) is None
    torch.save({"chosen": torch.zeros(3), "rejected": torch.ones(3)}, path)
    assert _load_cache(path, 3)["rejected"].tolist() == [1.0, 1.0, 1.0]


def test_a_poisoned_reference_cache_is_ignored_in_training(testbed, tmp_path):
    def fit():
        module = DPOModule(
            str(testbed / "init_policy"),
            precompute_reference=True,
            reference_cache_dir=str(tmp_path / "cache"),
            diagnostic_batches=0,
        )
        data = PreferenceDataModule(
            str(testbed / "init_policy"), str(testbed / "pairs_train.jsonl"), batch_size=4
        )
        L.Trainer(
            accelerator="cpu",
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
        ).fit(module, data)
        return module

    first = fit().cached["train"].chosen.clone()
    (cache,) = (tmp_path / "cache").glob("*.pt")
    marker = tmp_path / "pwned"
    cache.write_bytes(pickle.dumps({"chosen": Evil(marker), "rejected": Evil(marker)}))
    second = fit().cached["train"].chosen
    assert not marker.exists()
    torch.testing.assert_close(second, first)  # recomputed, and written back as plain tensors
    assert torch.load(cache, weights_only=True)["chosen"].shape == first.shape


def test_recorded_class_paths_must_name_the_expected_base(tmp_path):
    marker = tmp_path / "pwned"
    spec = {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}
    with pytest.raises(TypeError, match="'subprocess.Popen' is not a DPOLoss subclass"):
        DPOModule("m", loss=spec)
    with pytest.raises(TypeError, match="is not a BradleyTerryLoss subclass"):
        RewardModule("m", loss={"class_path": "lightning_rlhf.losses.IPOLoss"})
    checkpoint = tmp_path / "crafted.ckpt"
    torch.save({MODULE_CLASS_KEY: "subprocess.Popen"}, checkpoint)
    with pytest.raises(TypeError, match="is not a HFModelModule subclass"):
        export_checkpoint(checkpoint, tmp_path / "out")
    assert not marker.exists()


def test_checkpoints_load_as_plain_data(testbed, tmp_path):
    """Everything the modules add to a checkpoint (RNG states, counters) loads with weights_only=True."""
    module = RewardModule(str(testbed / "init_policy"), learning_rate=1e-3)
    data = PreferenceDataModule(
        str(testbed / "init_policy"), str(testbed / "pairs_train.jsonl"), batch_size=4
    )
    L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    ).fit(module, data)
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    loaded = torch.load(checkpoint, weights_only=True)
    assert set(loaded["lightning_rlhf_state"]) == {"rng", "rng_per_rank", "nonfinite_skipped"}
    assert loaded["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "position": 4}]


def test_reward_functions_are_callables_never_strings():
    with pytest.raises(ConfigError, match="PPOModule: reward_function must be a callable.*import path"):
        PPOModule("m", reward_function="os.system")
    module = PPOModule("m", reward_function=len)
    assert "reward_function" not in module.hparams  # checkpoints never name a function to import

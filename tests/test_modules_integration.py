"""Stage modules in plain Trainer scripts: cached reference log-probs, validate, checkpoints, other models."""

import json

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from lightning_rlhf import (
    DPOModule,
    IPOLoss,
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    RewardModule,
    SFTDataModule,
    SFTModule,
    SigmoidDPOLoss,
)
from lightning_rlhf.models import load_causal_lm
from lightning_rlhf.modules import reference_cache
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.reward import GoldReward
from lightning_rlhf.testbed.task import TaskConfig

SIZES = SplitSizes(sft_train=48, sft_eval=16, pairs_train=48, pairs_eval=16, prompts_train=8, prompts_eval=8)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb")
    write_testbed(out, TaskConfig(seed=0), SIZES, model_size="nano")
    return out


def trainer(root, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        deterministic=True,
    )
    return L.Trainer(**{**defaults, **kwargs})


def pairs(testbed, **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(
        str(testbed / "init_policy"),
        str(testbed / "pairs_train.jsonl"),
        str(testbed / "pairs_eval.jsonl"),
        batch_size=8,
        max_length=64,
        **kwargs,
    )


def test_cached_reference_logps_equal_live_ones_and_are_reused(testbed, tmp_path, monkeypatch):
    """Same seed, same data: the validation loss with cached reference log-probs equals the live one exactly,
    and a rerun reads the cache instead of recomputing it."""
    results = {}
    for precompute in (False, True):
        L.seed_everything(0)
        module = DPOModule(
            str(testbed / "init_policy"),
            learning_rate=1e-3,
            precompute_reference=precompute,
            reference_cache_dir=str(tmp_path / "cache"),
            diagnostic_batches=0,
        )
        fit = trainer(tmp_path, max_steps=3, enable_checkpointing=False, limit_val_batches=2)
        fit.fit(module, pairs(testbed))
        results[precompute] = {k: float(v) for k, v in fit.callback_metrics.items() if k.startswith("val/")}
    assert results[True] == pytest.approx(results[False], abs=1e-6)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # train and val

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(reference_cache, "_compute_split", must_not_run)
    module = DPOModule(
        str(testbed / "init_policy"),
        precompute_reference=True,
        reference_cache_dir=str(tmp_path / "cache"),
        diagnostic_batches=0,
    )
    trainer(tmp_path, max_steps=1, enable_checkpointing=False, limit_val_batches=1).fit(
        module, pairs(testbed)
    )


def test_the_reference_cache_is_not_shared_across_precisions(testbed, tmp_path, monkeypatch):
    """An fp32 cache must not serve a bf16-mixed run (their log-probs differ): each precision gets its own
    file, and a rerun in either precision reuses its own."""
    computed = []
    real = reference_cache._compute_split

    def counting(*args, **kwargs):
        computed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference_cache, "_compute_split", counting)
    for precision in ("32-true", "bf16-mixed", "32-true"):
        module = DPOModule(
            str(testbed / "init_policy"),
            precompute_reference=True,
            reference_cache_dir=str(tmp_path / "cache"),
            diagnostic_batches=0,
        )
        fit = trainer(
            tmp_path, max_steps=1, enable_checkpointing=False, limit_val_batches=0, precision=precision
        )
        fit.fit(module, pairs(testbed))
    # train and val in fp32, then again in bf16-mixed; the second fp32 run reads its own files
    assert len(computed) == 4
    assert len(list((tmp_path / "cache").glob("train-*.pt"))) == 2


def test_gradients_are_clipped_under_bf16_mixed(testbed, tmp_path):
    """Lightning's AMP plugin refuses to clip the gradients of a fused optimizer ("does not allow for gradient
    clipping ... 'fused' optimizer?"), and the default AdamW was fused on CPU and CUDA: bf16-mixed with
    clipping crashed at the first update (configs/ppo/apps.yaml: bf16-mixed and PPO's default max_grad_norm;
    any stage with gradient_clip_val). Under AMP the modules build the unfused AdamW."""
    policy = str(testbed / "init_policy")
    amp = dict(max_steps=1, enable_checkpointing=False, limit_val_batches=0, precision="bf16-mixed")
    fit = trainer(tmp_path, gradient_clip_val=1.0, **amp)
    fit.fit(RewardModule(policy, learning_rate=1e-3), pairs(testbed))
    assert fit.global_step == 1 and fit.optimizers[0].defaults["fused"] is None
    ppo = PPOModule(
        policy,
        reward_function=GoldReward(str(testbed)),
        mini_batch_size=4,
        micro_batch_size=4,
        max_new_tokens=4,
    )
    fit = trainer(tmp_path, **amp)
    fit.fit(ppo, PromptDataModule(policy, str(testbed / "prompts_train.jsonl"), batch_size=4))
    assert fit.global_step >= 1 and fit.optimizers[0].defaults["fused"] is None


def test_validate_alone_with_precomputed_reference(testbed, tmp_path):
    """`validate` without a fit first must compute the validation split's reference log-probs itself."""
    module = DPOModule(
        str(testbed / "init_policy"), precompute_reference=True, reference_cache_dir=str(tmp_path / "cache")
    )
    metrics = trainer(tmp_path).validate(module, pairs(testbed), verbose=False)[0]
    # Untrained policy == reference: every implicit reward is 0 and the sigmoid loss is log 2.
    assert metrics["val/loss"] == pytest.approx(0.693147, abs=1e-5)
    assert metrics["val/rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_checkpoint_restores_the_configured_loss(testbed, tmp_path):
    module = DPOModule(
        str(testbed / "init_policy"),
        loss=IPOLoss(beta=0.5),
        average_log_probs=True,
        learning_rate=1e-3,
        diagnostic_batches=0,
    )
    fit = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    fit.fit(module, pairs(testbed))
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    loaded = DPOModule.load_from_checkpoint(checkpoint, weights_only=True)
    assert isinstance(loaded.loss, IPOLoss) and loaded.loss.beta == 0.5
    for (name, a), b in zip(
        loaded.policy.state_dict().items(), module.policy.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_reward_module_and_preference_data_in_a_plain_trainer(testbed, tmp_path):
    """Drop-in, no CLI: validation accuracy and reward statistics (torchmetrics) cover the whole set."""
    module = RewardModule(str(testbed / "init_policy"), learning_rate=1e-3)
    data = pairs(testbed)
    fit = trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    fit.fit(module, data)
    metrics = fit.validate(module, data, verbose=False)[0]
    chosen, rejected = [], []
    module.eval()
    with torch.no_grad():
        for batch in data.val_dataloader():
            c, r = module.score_pairs(batch)
            chosen.append(c)
            rejected.append(r)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    assert len(chosen) == SIZES.pairs_eval
    assert metrics["val/accuracy"] == pytest.approx(float((chosen > rejected).float().mean()), abs=1e-6)
    everything = torch.cat([chosen, rejected])
    assert metrics["val/reward_mean"] == pytest.approx(float(everything.mean()), abs=1e-5)
    assert metrics["val/reward_std"] == pytest.approx(float(everything.std()), abs=1e-5)


@pytest.fixture(scope="module")
def foreign_model(tmp_path_factory, testbed):
    """A GPT-2 model and a tokenizer with NO pad token, saved with save_pretrained: not a testbed model."""
    folder = tmp_path_factory.mktemp("gpt2")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [
        json.loads(line)["prompt"] + json.loads(line)["completion"]
        for line in (testbed / "sft_train.jsonl").open()
    ]
    backend.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    assert tokenizer.pad_token is None
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(folder)  # saved in bf16, as hub models are
    tokenizer.save_pretrained(folder)
    return folder


def test_a_foreign_save_pretrained_folder_works_for_every_stage(foreign_model, testbed, tmp_path):
    """Offline, from a local folder: SFT, reward model and DPO each train and export a loadable model."""
    path = str(foreign_model)
    assert load_causal_lm(path).dtype == torch.float32  # trained in fp32 whatever it was saved in
    stages = [
        (
            SFTModule(path, learning_rate=1e-3),
            SFTDataModule(path, str(testbed / "sft_train.jsonl"), batch_size=8, max_length=64),
        ),
        (
            RewardModule(path, learning_rate=1e-3),
            PreferenceDataModule(path, str(testbed / "pairs_train.jsonl"), batch_size=8, max_length=64),
        ),
        (
            DPOModule(path, loss=SigmoidDPOLoss(beta=0.1), learning_rate=1e-3),
            PreferenceDataModule(path, str(testbed / "pairs_train.jsonl"), batch_size=8, max_length=64),
        ),
    ]
    for i, (module, data) in enumerate(stages):
        fit = trainer(tmp_path / str(i), max_steps=2, enable_checkpointing=False)
        fit.fit(module, data)
        assert torch.isfinite(fit.callback_metrics["train/loss"])
        module.save_pretrained(tmp_path / f"export{i}")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export2")
    assert isinstance(exported, GPT2LMHeadModel)


def test_missing_model_folder_says_what_to_do(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="folder not found: runs/nowhere/sft_policy.*lightning-rlhf testbed"
    ):
        SFTDataModule("runs/nowhere/sft_policy", str(tmp_path / "x.jsonl")).setup("fit")
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        DPOModule("runs/nowhere/sft_policy").configure_model()


def test_a_fixed_reference_is_left_out_of_checkpoints_and_restored_from_disk(testbed, tmp_path):
    """Half-size checkpoints: a frozen reference is not saved; resuming reloads it with the same weights."""
    module = DPOModule(str(testbed / "init_policy"), learning_rate=1e-3, diagnostic_batches=0)
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, pairs(testbed))
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert any(k.startswith("policy.") for k in state) and not any(k.startswith("reference.") for k in state)
    resumed = DPOModule(str(testbed / "init_policy"), learning_rate=1e-3, diagnostic_batches=0)
    trainer(tmp_path / "resume", max_steps=3, limit_val_batches=0).fit(
        resumed, pairs(testbed), ckpt_path=checkpoint
    )
    initial = load_causal_lm(str(testbed / "init_policy")).state_dict()
    for name, value in resumed.reference.state_dict().items():
        torch.testing.assert_close(value, initial[name], msg=name)
    loaded = DPOModule.load_from_checkpoint(checkpoint, weights_only=True)  # export path
    torch.testing.assert_close(loaded.reference.lm_head.weight, initial["lm_head.weight"])


def test_a_module_given_the_wrong_datamodule_names_it(testbed, tmp_path):
    """DPO on demonstrations (SFTDataModule) used to fail with a bare KeyError: 'index' inside the step."""
    from lightning_rlhf import SFTDataModule

    sft_data = SFTDataModule(str(testbed / "init_policy"), str(testbed / "sft_train.jsonl"), batch_size=4)
    module = DPOModule(str(testbed / "init_policy"), diagnostic_batches=0)
    message = r"DPOModule trains on PreferenceDataModule batches, but SFTDataModule gives batches without \["
    with pytest.raises(TypeError, match=message + r"'index'\]"):
        trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, sft_data)

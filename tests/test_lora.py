"""LoRA (PEFT): the adapters-off reference, the cache fingerprint, merged exports, resume, and refusals."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

pytest.importorskip("peft")

from lightning_rlhf import (  # noqa: E402  (after the importorskip: these tests need peft)
    DPOModule,
    EMAReferenceUpdate,
    HFExport,
    IterativeDPOModule,
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    RewardModule,
)
from lightning_rlhf.export import export_checkpoint  # noqa: E402
from lightning_rlhf.lora import (  # noqa: E402
    AdapterReference,
    AdaptersDisabled,
    LoraSettings,
    base_state_dict,
)
from lightning_rlhf.models import (  # noqa: E402
    load_causal_lm,
    load_reward_model,
    policy_logits,
    sequence_scores,
    weights_fingerprint,
)
from lightning_rlhf.modules import reference_cache  # noqa: E402
from lightning_rlhf.testbed.files import SplitSizes, write_testbed  # noqa: E402
from lightning_rlhf.testbed.reward import GoldReward  # noqa: E402
from lightning_rlhf.testbed.task import TaskConfig  # noqa: E402

SIZES = SplitSizes(sft_train=8, sft_eval=4, pairs_train=32, pairs_eval=8, prompts_train=16, prompts_eval=8)
LORA = LoraSettings(r=4, alpha=8.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        enable_checkpointing=False,
        default_root_dir=root,
        deterministic=True,
    )
    return L.Trainer(**{**defaults, **kwargs})


def pairs(testbed) -> PreferenceDataModule:
    return PreferenceDataModule(
        str(testbed / "init_policy"),
        str(testbed / "pairs_train.jsonl"),
        str(testbed / "pairs_eval.jsonl"),
        batch_size=8,
        max_length=64,
    )


def a_batch(testbed) -> dict:
    data = pairs(testbed)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def dpo(testbed, **kwargs) -> DPOModule:
    args = dict(learning_rate=1e-2, diagnostic_batches=0, lora=LORA)
    return DPOModule(str(testbed / "init_policy"), **{**args, **kwargs})


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer the module holds (shared tensors counted once)."""
    tensors = {t.data_ptr(): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r must be an integer >= 1"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"target_modules": []}, "target_modules"),
    ],
)
def test_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraSettings(**kwargs)


def test_settings_round_trip_through_plain_hparams():
    module = DPOModule("m", lora=LORA)
    assert module.hparams.lora == {**LORA.to_dict()}
    assert DPOModule("m", lora=dict(module.hparams.lora)).lora == LORA
    with pytest.raises(ValueError, match="unknown field"):
        LoraSettings.build({"rank": 4})


def test_unsupported_combinations_name_the_flag(testbed, tmp_path):
    with pytest.raises(ValueError, match="lora.dropout=0.1 conflicts with disable_dropout=true"):
        DPOModule("m", lora=LoraSettings(dropout=0.1))
    module = dpo(testbed)
    fit = trainer(tmp_path, max_steps=1, callbacks=[EMAReferenceUpdate()])
    with pytest.raises(ValueError, match="EMAReferenceUpdate does not support LoRA.*lora: null"):
        fit.fit(module, pairs(testbed))


def test_dpo_reference_is_the_base_model_and_no_copy_is_held(testbed, tmp_path):
    """After training, the adapters-off policy gives the base model's logits exactly, and the module holds
    about half the parameter bytes of a full DPO module (policy + reference copy)."""
    module = dpo(testbed)
    trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, pairs(testbed))
    assert module.reference is None
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)

    batch = a_batch(testbed)
    base = load_causal_lm(str(testbed / "init_policy")).eval()
    args = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        reference = policy_logits(AdaptersDisabled(module.policy), *args)
        trained = policy_logits(module.policy, *args)
        expected = policy_logits(base, *args)
    assert torch.equal(reference, expected)
    assert not torch.allclose(trained, expected, atol=1e-4)  # the adapters did train
    assert module.policy.training  # the reference forward gave train mode back

    full = DPOModule(str(testbed / "init_policy"))
    full.configure_model()
    lora_bytes, full_bytes = parameter_bytes(module), parameter_bytes(full)
    assert lora_bytes < 0.6 * full_bytes, (lora_bytes, full_bytes)


def test_cache_fingerprint_is_the_base_weights(testbed, tmp_path, monkeypatch):
    """The LoRA reference is the base model: a cache written by a full-weight run is reused by a LoRA run,
    and training the adapters does not change the fingerprint."""
    cache = str(tmp_path / "cache")
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(
        dpo(testbed, lora=None, precompute_reference=True, reference_cache_dir=cache), pairs(testbed)
    )

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(reference_cache, "_compute_split", must_not_run)
    module = dpo(testbed, precompute_reference=True, reference_cache_dir=cache)
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, pairs(testbed))
    base = weights_fingerprint(load_causal_lm(str(testbed / "init_policy")))
    assert weights_fingerprint(AdaptersDisabled(module.policy)) == base
    assert weights_fingerprint(module.policy) != base  # the trained adapters are in the full state
    assert set(base_state_dict(module.policy)) == set(
        load_causal_lm(str(testbed / "init_policy")).state_dict()
    )


def test_dpo_export_is_merged_and_checkpoints_resume(testbed, tmp_path):
    """HFExport writes a plain folder with the trained outputs; a run resumed from a mid-run checkpoint ends
    where the uninterrupted run does; `export --checkpoint` writes the same model."""
    L.seed_everything(0)
    straight = dpo(testbed)
    trainer(tmp_path / "a", max_steps=4, limit_val_batches=0, callbacks=[HFExport(str(tmp_path / "hf"))]).fit(
        straight, pairs(testbed)
    )
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not any("lora" in name for name in exported.state_dict())
    batch = a_batch(testbed)
    args = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        torch.testing.assert_close(
            policy_logits(exported, *args), policy_logits(straight.policy.eval(), *args)
        )

    # Resume: every batch the same, so the restarted loader sees what the uninterrupted run saw.
    def same_batches():
        return torch.utils.data.DataLoader([batch] * 4, batch_size=None)

    runs = {}
    for name, steps, ckpt in (("straight", 4, None), ("first", 2, None), ("resumed", 4, "step=2")):
        L.seed_everything(0)
        module = dpo(testbed)
        saver = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1)
        fit = trainer(tmp_path / name, max_steps=steps, callbacks=[saver], enable_checkpointing=True)
        path = None if ckpt is None else tmp_path / "ckpt" / f"{ckpt}.ckpt"
        fit.fit(module, train_dataloaders=same_batches(), ckpt_path=path)
        runs[name] = module.policy.state_dict()
    for name, value in runs["straight"].items():
        torch.testing.assert_close(runs["resumed"][name], value, msg=name)
    checkpoint = tmp_path / "ckpt" / "step=2.ckpt"
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert saved and all(".lora_" in key for key in saved)  # the frozen base weights are reloaded instead

    out = export_checkpoint(checkpoint, tmp_path / "from_ckpt")
    midway = AutoModelForCausalLM.from_pretrained(out).eval()
    assert set(midway.state_dict()) == set(exported.state_dict())


def test_reward_model_lora_trains_the_head_fully_and_exports_merged(testbed, tmp_path):
    module = RewardModule(str(testbed / "init_policy"), learning_rate=1e-2, lora=LORA)
    saver = ModelCheckpoint(tmp_path / "ckpt", filename="last")
    callbacks = [HFExport(str(tmp_path / "rm")), saver]
    fit = trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=True)
    fit.fit(module, pairs(testbed))
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert any(".score." in n and ".lora_" not in n for n in trainable)  # the head, fully
    assert all(".lora_" in n or ".score." in n for n in trainable)
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert exported.config.num_labels == 1
    batch = a_batch(testbed)
    args = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ours = sequence_scores(module.reward_model.eval(), *args)
        torch.testing.assert_close(sequence_scores(exported, *args), ours)
        torch.testing.assert_close(sequence_scores(load_reward_model(str(tmp_path / "rm")), *args), ours)
        from_checkpoint = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "rm_ckpt")
        torch.testing.assert_close(sequence_scores(load_reward_model(str(from_checkpoint)), *args), ours)


def ppo(testbed, **kwargs) -> PPOModule:
    args = dict(
        reward_function=GoldReward(str(testbed)),
        max_new_tokens=6,
        mini_batch_size=8,
        micro_batch_size=8,
        generation_batch_size=8,
        learning_rate=1e-2,
        critic_learning_rate=1e-2,
        lora=LORA,
    )
    return PPOModule(str(testbed / "init_policy"), **{**args, **kwargs})


def prompts(testbed) -> PromptDataModule:
    return PromptDataModule(str(testbed / "init_policy"), str(testbed / "prompts_train.jsonl"), batch_size=8)


def test_ppo_with_lora_runs_holds_no_reference_and_exports_merged(testbed, tmp_path):
    """Two rollouts: the first-step check (policy == adapters-off reference) passes, the critic is a
    separate LoRA model with its head trained fully, and the export matches the trained policy."""
    module = ppo(testbed)
    callbacks = [HFExport(str(tmp_path / "hf")), ModelCheckpoint(tmp_path / "ckpt", filename="last")]
    fit = trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=True)
    fit.fit(module, prompts(testbed))
    assert module.reference is None
    assert fit.global_step == 2 and "rollout/kl" in fit.callback_metrics
    critic_trainable = [n for n, p in module.critic.named_parameters() if p.requires_grad]
    assert any(".score." in n for n in critic_trainable)
    assert all(".lora_" in n or ".score." in n for n in critic_trainable)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    batch = a_batch(testbed)
    args = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        torch.testing.assert_close(policy_logits(exported, *args), policy_logits(module.policy.eval(), *args))
        base = load_causal_lm(str(testbed / "init_policy"))
        assert torch.equal(policy_logits(AdaptersDisabled(module.policy), *args), policy_logits(base, *args))
        from_checkpoint = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "from_ckpt")
        reloaded = AutoModelForCausalLM.from_pretrained(from_checkpoint).eval()
        torch.testing.assert_close(policy_logits(reloaded, *args), policy_logits(exported, *args))


def test_ppo_with_lora_refuses_the_ema_reference(testbed, tmp_path):
    fit = trainer(tmp_path, max_steps=1, callbacks=[EMAReferenceUpdate()])
    with pytest.raises(ValueError, match="EMAReferenceUpdate does not support LoRA"):
        fit.fit(ppo(testbed), prompts(testbed))


def iterative(testbed, **kwargs) -> IterativeDPOModule:
    args = dict(
        reward_function=GoldReward(str(testbed)),
        num_samples=2,
        max_new_tokens=6,
        mini_batch_size=8,
        micro_batch_size=8,
        learning_rate=1e-2,
        lora=LORA,
    )
    return IterativeDPOModule(str(testbed / "init_policy"), **{**args, **kwargs})


def test_iterative_dpo_with_lora_and_a_fixed_reference_runs(testbed, tmp_path):
    module = iterative(testbed, refresh_reference=False)
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(module, prompts(testbed))
    assert module.reference is None and fit.global_step == 2
    assert "train/loss" in fit.callback_metrics
    assert not any(".reference." in name for name, _ in module.policy.named_parameters())


def test_iterative_dpo_refreshes_a_reference_adapter(testbed, tmp_path):
    """refresh_reference with LoRA: a frozen second adapter equal to the trained one after each iteration,
    kept in checkpoints (with the frozen base weights left out), and never merged into the export."""
    module = iterative(testbed, refresh_reference=True)
    saver = ModelCheckpoint(tmp_path / "ckpt", filename="last")
    callbacks = [HFExport(str(tmp_path / "hf")), saver]
    fit = trainer(tmp_path, max_steps=2, callbacks=callbacks, enable_checkpointing=True)
    fit.fit(module, prompts(testbed))
    params = dict(module.policy.named_parameters())
    references = [name for name in params if ".reference." in name]
    assert references and not any(params[name].requires_grad for name in references)
    assert all(params[name].requires_grad for name in params if ".lora_" in name and ".default." in name)
    for name in references:
        assert torch.equal(params[name], params[name.replace(".reference.", ".default.")]), name
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(params[name]) for name in references}

    batch = a_batch(testbed)
    args = (batch["input_ids"], batch["attention_mask"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        trained = policy_logits(module.policy.eval(), *args)
        assert not torch.allclose(trained, policy_logits(AdaptersDisabled(module.policy), *args), atol=1e-4)
        assert torch.equal(policy_logits(AdapterReference(module.policy), *args), trained)
        assert module.policy.active_adapter == "default"
        torch.testing.assert_close(policy_logits(exported, *args), trained)  # merged once, not twice
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert {f"policy.{name}" for name in references} <= set(saved)
    assert all(".lora_" in key for key in saved)


def test_lora_configs_run_from_the_cli_and_export_plain_models(tmp_path, monkeypatch):
    """configs/{dpo,ppo}/testbed-lora.yaml run with `lightning-rlhf fit` and write merged folders."""
    from pathlib import Path

    from lightning_rlhf.cli import cli_main
    from lightning_rlhf.testbed.models import build_reward_model

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    testbed = Path("runs/testbed")
    write_testbed(testbed, TaskConfig(seed=0), SIZES, model_size="nano")
    policy = load_causal_lm(str(testbed / "init_policy"))
    policy.save_pretrained(testbed / "sft_policy")
    tokenizer = AutoTokenizer.from_pretrained(testbed / "init_policy")
    tokenizer.save_pretrained(testbed / "sft_policy")
    build_reward_model("nano", tokenizer).save_pretrained(testbed / "reward_model")
    for stage, batch in (("dpo", 8), ("ppo", 16)):
        overrides = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
        overrides += ["--data.init_args.batch_size", str(batch)]
        cli_main(["fit", "--config", str(repo / f"configs/{stage}/testbed-lora.yaml"), *overrides])
        exported = AutoModelForCausalLM.from_pretrained(testbed / f"{stage}_lora_policy")
        assert not any("lora" in name for name in exported.state_dict()), stage


def test_sft_with_lora_exports_a_merged_model(testbed, tmp_path):
    from lightning_rlhf import SFTDataModule, SFTModule

    module = SFTModule(str(testbed / "init_policy"), learning_rate=1e-2, lora=LORA)
    data = SFTDataModule(str(testbed / "init_policy"), str(testbed / "sft_train.jsonl"), batch_size=4)
    trainer(tmp_path, max_steps=2, callbacks=[HFExport(str(tmp_path / "hf"))]).fit(module, data)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    batch = a_batch(testbed)
    args = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        torch.testing.assert_close(policy_logits(exported, *args), policy_logits(module.policy.eval(), *args))


def test_sampled_logprobs_are_read_through_the_peft_wrapper(testbed):
    """generate runs the transformers model inside the wrapper: the recorder hooks it, adapters active."""
    from lightning_rlhf.lora import apply_lora
    from lightning_rlhf.models import response_token_logprobs
    from lightning_rlhf.rollout.generation import SampledLogprobs, SamplingConfig, generate_responses

    policy = apply_lora(load_causal_lm(str(testbed / "init_policy")), LORA, "causal_lm")
    for name, param in policy.named_parameters():  # non-zero adapters, so a missed hook would show
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = (torch.arange(4) > torch.tensor([[0], [-1]])).long()
    torch.manual_seed(0)
    with torch.no_grad(), SampledLogprobs(policy, temperature=0.9) as recorder:
        response, response_mask = generate_responses(
            policy,
            ids,
            mask,
            SamplingConfig(max_new_tokens=5, temperature=0.9),
            eos_token_id=1,
            pad_token_id=0,
        )
    sampled = recorder.finish(response)
    with torch.no_grad():
        forward, _ = response_token_logprobs(
            policy, torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1), 4, temperature=0.9
        )
    torch.testing.assert_close(sampled * response_mask, forward * response_mask, atol=2e-5, rtol=0)
    with torch.no_grad():
        plain, _ = response_token_logprobs(
            AdaptersDisabled(policy),
            torch.cat([ids, response], 1),
            torch.cat([mask, response_mask], 1),
            4,
            temperature=0.9,
        )
    assert (plain - forward).abs().max() > 1e-2  # the adapters matter here

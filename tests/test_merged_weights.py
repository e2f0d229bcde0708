"""lora.merged_weights: the weights a model computes with, streamed one module at a time (the vLLM sync).

Plain and PEFT models against their own ``state_dict`` / PEFT's ``merge_and_unload``; a ZeRO-3 partitioned
model on 2 gloo ranks against the weights it was loaded from, with at most one module gathered at a time.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from gloo import run_on_two_gloo_ranks

from lightning_rlhf.lora import merged_state_dict, merged_weights
from lightning_rlhf.testbed.models import build_causal_lm


def test_a_plain_model_streams_its_state_dict_in_order_without_copies(tokenizer):
    model = build_causal_lm("nano", tokenizer)
    streamed = list(merged_weights(model))
    state = model.state_dict()
    assert [name for name, _ in streamed] == list(state)
    for (_, tensor), want in zip(streamed, state.values(), strict=True):
        assert tensor.data_ptr() == want.data_ptr() and not tensor.requires_grad


def test_a_peft_model_streams_merged_adapters_and_its_fully_trained_modules(tokenizer):
    """Adapted layers merged (W + scale·B·A), a modules_to_save head as its trained copy, every other
    weight as PEFT's own merge_and_unload gives, names and order of the plain model's state_dict."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    plain = build_causal_lm("nano", tokenizer)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(copy.deepcopy(plain), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)  # non-zero B and a trained head: both must show
    before = copy.deepcopy(model.state_dict())
    streamed = list(merged_weights(model))
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    assert [name for name, _ in streamed] == list(plain.state_dict()) == list(want)
    for name, tensor in streamed:
        torch.testing.assert_close(tensor, want[name], atol=1e-6, rtol=0)
    head = model.base_model.model.lm_head
    assert torch.equal(dict(streamed)["lm_head.weight"], head.modules_to_save["default"].weight)
    assert not torch.equal(dict(streamed)["lm_head.weight"], plain.lm_head.weight)
    assert merged_state_dict(model).keys() == want.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def _partitioned_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed_cpu import zero_config
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from lightning_rlhf.zero import _transformers_zero3_flag, is_partitioned

    deepspeed.init_distributed("gloo")
    config = {**zero_config(3), "train_batch_size": 2}
    with _transformers_zero3_flag(HfDeepSpeedConfig(config)):
        model = AutoModelForCausalLM.from_pretrained(Path(out_dir) / "policy", dtype=torch.float32)
    assert is_partitioned(model)
    params = list(model.parameters())
    most_gathered, entries = 0, {}
    for name, tensor in merged_weights(model):
        gathered = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
        most_gathered = max(most_gathered, sum(p.ds_numel for p in gathered))
        entries[name] = tensor
    # Released after the stream, and the copies stay whole.
    assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params)
    torch.save(entries, Path(out_dir) / f"rank{rank}.pt")
    (Path(out_dir) / f"rank{rank}.json").write_text(
        json.dumps({"most_gathered": most_gathered, "largest": max(p.ds_numel for p in params)})
    )
    torch.distributed.barrier()


def test_a_zero3_model_is_gathered_one_module_at_a_time_on_every_rank(tokenizer, tmp_path):
    pytest.importorskip("deepspeed")
    model = build_causal_lm("nano", tokenizer)
    model.save_pretrained(tmp_path / "policy")
    want = model.state_dict()
    run_on_two_gloo_ranks(_partitioned_worker, tmp_path, timeout_s=180)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(got) == list(want)
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (rank, name)
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # One module's parameters at a time: never more than the largest single weight (no module of the
        # testbed Llama owns two parameters), far less than the model.
        assert seen["most_gathered"] == seen["largest"] < sum(t.numel() for t in want.values()) / 4

"""SFTModule: next-token cross-entropy on response tokens only, and SFT raises the gold reward."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from lightning_rlhf import SFTDataModule, SFTModule
from lightning_rlhf.quickstart import read_prompts
from lightning_rlhf.testbed.evaluate import evaluate_policy
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.task import TaskConfig


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    sizes = SplitSizes(
        sft_train=1000, sft_eval=64, pairs_train=8, pairs_eval=8, prompts_train=8, prompts_eval=96
    )
    task = write_testbed(out, TaskConfig(seed=0), sizes, model_size="tiny")
    return out, task


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_sft_loss_is_response_only_cross_entropy(testbed):
    """Against F.cross_entropy in float64 over exactly the shifted response positions, pooled per token."""
    out, _ = testbed
    module = SFTModule(str(out / "init_policy"))
    module.configure_model()
    module.policy.double()
    dm = SFTDataModule(str(out / "tokenizer"), str(out / "sft_eval.jsonl"), batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    loss = module._loss(batch)

    logits = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(batch["input_ids"].shape[0]):
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["response_mask"][i, t]:
                total += F.cross_entropy(logits[i, t - 1], batch["input_ids"][i, t])
                count += 1
    assert count == int(batch["response_mask"][:, 1:].sum())
    torch.testing.assert_close(loss, total / count)


def test_short_sft_raises_held_out_gold_reward(testbed):
    """~30 s on 2 cores: the untrained model emits non-words (gold ~ -1.3); SFT learns the form (gold ~ 0)."""
    out, task = testbed
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    prompts = read_prompts(out / "prompts_eval.jsonl")
    module = SFTModule(str(out / "init_policy"), learning_rate=3e-3)
    module.configure_model()
    before = evaluate_policy(module.policy, tokenizer, task, prompts, seed=0)
    dm = SFTDataModule(str(out / "tokenizer"), str(out / "sft_train.jsonl"), batch_size=32, seed=0)
    L.seed_everything(0, verbose=False)
    quiet_trainer(max_epochs=2, deterministic=True).fit(module, dm)
    after = evaluate_policy(module.policy, tokenizer, task, prompts, seed=0)
    assert before["gold_reward"] < -0.8 and before["eos_rate"] < 0.3
    assert after["gold_reward"] > before["gold_reward"] + 0.8
    assert after["eos_rate"] > 0.9
    # The SFT policy is mediocre, like its demonstrations: the RL stages need headroom.
    best = sum(task.best_reward(p) for p in prompts) / len(prompts)
    assert best - after["gold_reward"] > 0.7


def test_sft_module_drops_into_a_plain_trainer_script(testbed, tmp_path):
    """No CLI: a user's own Trainer fits, validates and checkpoints the module."""
    out, _ = testbed
    module = SFTModule(str(out / "init_policy"), learning_rate=1e-3)
    dm = SFTDataModule(str(out / "tokenizer"), str(out / "sft_train.jsonl"), str(out / "sft_eval.jsonl"))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        val_check_interval=3,
        limit_val_batches=2,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
    )
    trainer.fit(module, dm)
    assert {"train/loss", "val/loss"} <= set(trainer.callback_metrics)
    assert list(tmp_path.rglob("*.ckpt"))
    metrics = trainer.validate(module, dm, verbose=False)[0]
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


def test_sft_module_rejects_bad_learning_rate():
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        SFTModule("unused", learning_rate=0.0)

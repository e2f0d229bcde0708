"""An exported reward model scores the same in plain transformers as in sequence_scores, for pad == EOS."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_rlhf.models import sequence_scores
from lightning_rlhf.modules.reward import RewardModule
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.models import build_reward_model
from lightning_rlhf.testbed.task import TaskConfig


@pytest.fixture(scope="module")
def chat_like_rm(tmp_path_factory):
    """A tiny reward model whose tokenizer pads with EOS, as most chat models do (unk is another token)."""
    out = tmp_path_factory.mktemp("tb")
    sizes = SplitSizes(sft_train=8, sft_eval=8, pairs_train=8, pairs_eval=8, prompts_train=8, prompts_eval=8)
    write_testbed(out, TaskConfig(seed=0), sizes, model_size="nano")
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    tokenizer.unk_token = "<pad>"
    tokenizer.pad_token = tokenizer.eos_token
    folder = out / "rm_pad_is_eos"
    model = build_reward_model("nano", tokenizer)
    model.config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    with torch.no_grad():
        model.score.weight.normal_()  # a head that tells tokens apart, so reading one token early shows
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("side", ["right", "left"])
def test_plain_transformers_scores_where_sequence_scores_does(chat_like_rm, tmp_path, side):
    module = RewardModule(str(chat_like_rm))
    module.configure_model()
    module.reward_model.eval()
    exported = module.save_pretrained(tmp_path / "rm")

    tokenizer = AutoTokenizer.from_pretrained(exported, padding_side=side)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    plain = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    assert plain.config.pad_token_id == tokenizer.pad_token_id
    texts = [" hello world" + tokenizer.eos_token, " a" + tokenizer.eos_token]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        ours = sequence_scores(module.reward_model, batch["input_ids"], batch["attention_mask"])
        theirs = plain(**batch).logits[:, 0]
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        # The trap this avoids: with pad == EOS in the config, transformers reads the score one token early.
        plain.config.pad_token_id = tokenizer.eos_token_id
        assert not torch.allclose(plain(**batch).logits[:, 0], ours, atol=1e-4)

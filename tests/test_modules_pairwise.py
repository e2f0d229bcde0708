"""RewardModule and DPOModule on fixed tiny batches: every logged number against float64 by hand."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lightning_rlhf import DPOModule, IPOLoss, RewardModule, SigmoidDPOLoss
from lightning_rlhf.data.collate import PreferenceCollator
from lightning_rlhf.losses import BradleyTerryLoss
from lightning_rlhf.models import last_token_index, response_logps, shared_prompt_response_logps
from lightning_rlhf.testbed.models import build_causal_lm


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """A policy folder and a different 'reference' folder (another seed), each with the tokenizer."""
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("policy", 0), ("other", 1)):
        build_causal_lm("nano", tokenizer, seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def pair_batch() -> dict[str, torch.Tensor]:
    """B = 2 pairs, right padded; prompts are 2 tokens, responses 1-3 tokens (EOS = token 1)."""
    chosen = [[10, 11, 20, 21, 1], [12, 13, 22, 1, 0]]
    rejected = [[10, 11, 30, 1, 0], [12, 13, 31, 32, 1]]
    input_ids = torch.tensor(chosen + rejected)
    lengths = [5, 4, 4, 5]
    attention = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    response = attention.clone()
    response[:, :2] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "response_mask": response,
        "margin": torch.tensor([0.0, 0.5]),
        "index": torch.tensor([0, 1]),
    }


def naive_response_logps(model, batch) -> torch.Tensor:
    """Sum over response tokens t of log_softmax(logits[t-1])[token t], float64, one row at a time."""
    model = model.double()
    out = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n][None]
        logits = model(input_ids=ids).logits[0].double()
        total = torch.zeros((), dtype=torch.float64)
        for t in range(1, n):
            if batch["response_mask"][i, t]:
                total += F.log_softmax(logits[t - 1], -1)[ids[0, t]]
        out.append(total)
    return torch.stack(out)


def test_last_token_index_both_padding_sides():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 0, 3, 3]


def test_dpo_loss_and_metrics_match_hand_computation(model_dirs):
    """h_i = (pi_c - pi_r) - (ref_c - ref_r); loss = mean(-log sigmoid(0.1 h)); rewards = 0.1 (pi - ref)."""
    module = DPOModule(
        str(model_dirs / "policy"), loss=SigmoidDPOLoss(beta=0.1), reference_model=str(model_dirs / "other")
    )
    module.configure_model()
    module.policy.double()
    module.reference.double()
    batch = pair_batch()
    out, metrics = module.compute_loss(batch, "train")

    pi = naive_response_logps(AutoModelForCausalLM.from_pretrained(model_dirs / "policy"), batch)
    ref = naive_response_logps(AutoModelForCausalLM.from_pretrained(model_dirs / "other"), batch)
    pi_c, pi_r, ref_c, ref_r = pi[:2], pi[2:], ref[:2], ref[2:]
    h = (pi_c - pi_r) - (ref_c - ref_r)
    rewards_c, rewards_r = 0.1 * (pi_c - ref_c), 0.1 * (pi_r - ref_r)
    n_tokens = batch["response_mask"].sum(1).double()
    expected = {
        "loss": (-F.logsigmoid(0.1 * h)).mean(),
        "rewards/chosen": rewards_c.mean(),
        "rewards/rejected": rewards_r.mean(),
        "rewards/accuracies": (rewards_c > rewards_r).double().mean(),
        "rewards/margins": (rewards_c - rewards_r).mean(),
        "logps/chosen": pi_c.mean(),
        "logps/rejected": pi_r.mean(),
        "logps_per_token/chosen": (pi_c / n_tokens[:2]).mean(),
        "logps_per_token/rejected": (pi_r / n_tokens[2:]).mean(),
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(metrics[name].double(), value, msg=name)
    torch.testing.assert_close(out.loss.double(), expected["loss"])


def test_dpo_reference_is_initial_policy_gives_log2_loss(model_dirs):
    """With reference == policy, h = 0 so the sigmoid loss is log 2 and every reward is exactly 0."""
    module = DPOModule(str(model_dirs / "policy"))
    module.configure_model()
    out, metrics = module.compute_loss(pair_batch(), "train")
    torch.testing.assert_close(out.loss, torch.tensor(0.6931472))
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/margins"] == 0


def test_ipo_uses_average_log_probs(model_dirs):
    """IPO with average_log_probs: h on per-token means; loss = mean((h - 1/(2 beta))^2)."""
    module = DPOModule(
        str(model_dirs / "policy"),
        loss=IPOLoss(beta=0.5),
        reference_model=str(model_dirs / "other"),
        average_log_probs=True,
    )
    module.configure_model()
    batch = pair_batch()
    out, _ = module.compute_loss(batch, "train")
    n = batch["response_mask"].sum(1).double()
    pi = naive_response_logps(AutoModelForCausalLM.from_pretrained(model_dirs / "policy"), batch) / n
    ref = naive_response_logps(AutoModelForCausalLM.from_pretrained(model_dirs / "other"), batch) / n
    h = (pi[:2] - pi[2:]) - (ref[:2] - ref[2:])
    torch.testing.assert_close(out.loss.double(), ((h - 1.0) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_reference_free_holds_no_reference(model_dirs):
    module = DPOModule(str(model_dirs / "policy"), loss=SigmoidDPOLoss(reference_free=True))
    module.configure_model()
    assert module.reference is None
    out, metrics = module.compute_loss(pair_batch(), "train")
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="reference_free"):
        DPOModule("x", loss=SigmoidDPOLoss(reference_free=True), reference_model="y")


def test_reward_module_scores_last_real_token_and_loss(model_dirs, tmp_path, tokenizer):
    """Bradley-Terry with margin [0, 0.5] and centering 0.1, against scores read by hand at the last token."""
    module = RewardModule(str(model_dirs / "policy"), loss=BradleyTerryLoss(center_coef=0.1))
    module.configure_model()
    module.reward_model.double()
    batch = pair_batch()
    chosen, rejected = module.score_pairs(batch)
    naive = []
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        hidden = module.reward_model.model(input_ids=batch["input_ids"][i, :n][None]).last_hidden_state
        naive.append(module.reward_model.score(hidden)[0, n - 1, 0])
    naive = torch.stack(naive).double()
    torch.testing.assert_close(torch.cat([chosen, rejected]).double(), naive)
    # Pad id 0 differs from EOS here, but the score must not depend on what the pad id is.
    batch2 = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 1))
    torch.testing.assert_close(torch.cat(module.score_pairs(batch2)).double(), naive)
    out = module.loss(chosen, rejected, margin=batch["margin"])
    c, r = naive[:2], naive[2:]
    expected = (-F.logsigmoid(c - r - batch["margin"].double())).mean() + 0.1 * ((c + r) ** 2).mean()
    torch.testing.assert_close(out.loss.double(), expected)
    # Export: a folder that transformers alone loads, with the same scores.
    module.save_pretrained(tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").double()
    ids = batch["input_ids"][:1, :5]
    torch.testing.assert_close(loaded(input_ids=ids).logits[0, 0], naive[0])


def test_modules_validate_their_arguments():
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        RewardModule("x", learning_rate=-1.0)
    with pytest.raises(ValueError, match="diagnostic_batches must be an integer >= 0"):
        DPOModule("x", diagnostic_batches=-1)
    with pytest.raises(FileNotFoundError, match="model folder not found: ./does-not-exist"):
        DPOModule("./does-not-exist").configure_model()


def test_dpo_trains_in_a_plain_trainer_with_a_list_dataloader(model_dirs, tmp_path):
    """Drop-in: any loader that yields the preference layout works, no datamodule required."""
    module = DPOModule(str(model_dirs / "policy"), learning_rate=1e-3, diagnostic_batches=0)
    loader = torch.utils.data.DataLoader([pair_batch()] * 4, batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=loader)
    # After training on these pairs the policy prefers the chosen responses more than the reference does.
    assert trainer.callback_metrics["rewards/margins"] > 0


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_gradient_checkpointing_changes_memory_not_numbers(model_dirs, stage):
    """gradient_checkpointing=True recomputes activations in backward: same loss, same gradients."""
    grads, losses = {}, {}
    for checkpointing in (False, True):
        if stage == "dpo":
            module = DPOModule(
                str(model_dirs / "policy"),
                reference_model=str(model_dirs / "other"),
                gradient_checkpointing=checkpointing,
            )
            module.configure_model()
            loss = module.compute_loss(pair_batch(), "train")[0].loss
            model = module.policy
        else:
            module = RewardModule(str(model_dirs / "policy"), gradient_checkpointing=checkpointing)
            torch.manual_seed(0)  # the score head on a causal-LM folder is freshly initialised
            module.configure_model()
            chosen, rejected = module.score_pairs(pair_batch())
            loss = module.loss(chosen, rejected).loss
            model = module.reward_model
        flag = getattr(model, "is_activation_checkpointing", None)
        assert (model.is_gradient_checkpointing if flag is None else flag) == checkpointing
        loss.backward()
        losses[checkpointing] = loss.detach()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses[True], losses[False])
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, msg=name)


def test_each_prompt_runs_once_with_the_same_logps_and_gradients(tokenizer):
    """shared_prompts=True runs the B prompts once and the 2B responses on a duplicated KV cache: same
    log-probs and gradients as running every [prompt; response] row whole (prompts of different lengths)."""
    model = build_causal_lm("nano", tokenizer, seed=0).train()
    rows = [
        {
            "prompt_ids": [5, 6, 7],
            "chosen_ids": [8, 9, 1],
            "rejected_ids": [10, 1],
            "margin": 0.0,
            "index": 0,
        },
        {
            "prompt_ids": [11, 12, 13, 14, 15],
            "chosen_ids": [16, 1],
            "rejected_ids": [17, 18, 19, 20, 1],
            "margin": 0.0,
            "index": 1,
        },
        {
            "prompt_ids": [21],
            "chosen_ids": [22, 23, 24, 25, 26, 27, 1],
            "rejected_ids": [28, 1],
            "margin": 0.0,
            "index": 2,
        },
    ]
    batch = PreferenceCollator(0)(rows)
    assert shared_prompt_response_logps(model, batch, average=False) is not None
    results = {}
    for shared in (False, True):
        model.zero_grad()
        logps, per_token = response_logps(model, batch, average=False, shared_prompts=shared)
        logps.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[shared] = (logps.detach(), per_token.detach(), grads)
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-6, rtol=1e-5)
    for name, grad in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prompts_fall_back_for_other_layouts(tokenizer):
    """Rows whose prompts differ, or a left-padded batch, are not a shared-prompt layout: the plain path."""
    model = build_causal_lm("nano", tokenizer, seed=0)
    batch = pair_batch()  # rows i and B+i share prompts [10, 11] and [12, 13]
    assert shared_prompt_response_logps(model, batch, average=False) is not None
    other = {**batch, "input_ids": batch["input_ids"].clone()}
    other["input_ids"][2, 0] = 99  # the first rejected row's prompt differs from its chosen row's
    assert shared_prompt_response_logps(model, other, average=False) is None
    plain, _ = response_logps(model, other, average=False)
    fallback, _ = response_logps(model, other, average=False, shared_prompts=True)
    torch.testing.assert_close(fallback, plain)
    left = {k: v.flip(-1) if v.ndim == 2 else v for k, v in batch.items()}
    assert shared_prompt_response_logps(model, left, average=False) is None


@pytest.mark.parametrize("entropy", [False, True])
def test_head_log_probs_chunked_and_recomputed_match_float64_and_hold_no_full_logits(monkeypatch, entropy):
    """Above HEAD_RECOMPUTE_ELEMENTS the head runs in checkpointed chunks: same log-probs, entropies and
    gradients as a float64 log_softmax over the whole [N, V] logits, and no [N, V] tensor is kept for the
    backward."""
    import lightning_rlhf.models as models

    torch.manual_seed(0)
    n, hidden_size, vocab = 11, 8, 13
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    labels = torch.randint(vocab, (n,))
    weights = torch.randn(n)  # a per-token upstream gradient, as DPO and PPO losses give
    logits64 = (hidden.double() @ head.weight.double().T) / 0.7
    logp64 = logits64.log_softmax(-1)
    expected = logp64.gather(1, labels[:, None]).squeeze(1)
    objective = (expected * weights.double()).sum()
    if entropy:
        objective = objective + (-(logp64.exp() * logp64).sum(-1)).sum()
    want_hidden, want_weight = torch.autograd.grad(objective, (hidden, head.weight))

    monkeypatch.setattr(models, "HEAD_RECOMPUTE_ELEMENTS", 0)
    monkeypatch.setattr(models, "HEAD_CHUNK_ELEMENTS", 4 * vocab)  # chunks of 4 rows: 4 + 4 + 3
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        logps, entropies = models.head_token_logprobs(head, hidden, labels, temperature=0.7, entropy=entropy)
    assert not [shape for shape in saved if shape[-1] == vocab and shape[0] > 4]
    torch.testing.assert_close(logps.double(), expected, atol=1e-5, rtol=0)
    got = (logps * weights).sum() + (entropies.sum() if entropy else 0)
    got_hidden, got_weight = torch.autograd.grad(got, (hidden, head.weight))
    torch.testing.assert_close(got_hidden, want_hidden, atol=1e-5, rtol=1e-5)  # float64 math, float32 leaves
    torch.testing.assert_close(got_weight, want_weight, atol=1e-5, rtol=1e-5)

    monkeypatch.setattr(models, "HEAD_RECOMPUTE_ELEMENTS", n * vocab)  # at the threshold: one plain call
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        plain, _ = models.head_token_logprobs(head, hidden, labels, temperature=0.7)
    assert (n, vocab) in saved
    torch.testing.assert_close(plain, logps, atol=1e-6, rtol=0)


def test_entropy_for_logging_only_has_no_graph(tokenizer):
    """PPO with entropy_coef=0 only logs the entropy: it is computed without autograd (no backward through
    [N, V] softmax work), with the same values."""
    from lightning_rlhf.models import response_token_logprobs

    model = build_causal_lm("nano", tokenizer, seed=0)
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 1]])
    mask = torch.ones_like(ids)
    logps, entropy = response_token_logprobs(model, ids, mask, 2, entropy=True, temperature=0.8)
    logps_nograd, entropy_nograd = response_token_logprobs(
        model, ids, mask, 2, entropy=True, temperature=0.8, entropy_grad=False
    )
    assert entropy.requires_grad and logps_nograd.requires_grad and not entropy_nograd.requires_grad
    torch.testing.assert_close(entropy_nograd, entropy.detach())
    torch.testing.assert_close(logps_nograd, logps)

"""The vLLM rollout engine against the HF path on a tiny Llama (run in the vLLM environment: ``-m vllm``).

One engine serves the whole module (start-up ~20 s on CPU); every test first syncs the weights it needs.
"""

import copy

import pytest

vllm = pytest.importorskip("vllm")

import greedy  # noqa: E402
import torch  # noqa: E402

from lightning_rlhf.models import response_token_logprobs  # noqa: E402
from lightning_rlhf.rollout.collect import Placement, RewardSources, sample_and_score  # noqa: E402
from lightning_rlhf.rollout.generation import SamplingConfig, left_pad_prompts  # noqa: E402
from lightning_rlhf.rollout.types import select_rows  # noqa: E402
from lightning_rlhf.rollout.vllm_engine import VLLMEngine, VLLMSettings  # noqa: E402
from lightning_rlhf.testbed.models import build_causal_lm  # noqa: E402

pytestmark = pytest.mark.vllm

PROMPTS = ["alpha beta", "gamma", "delta epsilon zeta", "beta beta"]
GREEDY = greedy.greedy(max_new_tokens=8)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer):
    model = build_causal_lm("tiny", tokenizer, seed=0)
    path = tmp_path_factory.mktemp("policy")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def engine(policy_dir):
    # dtype "auto": the float32 of the policy's config (vLLM's own "auto" downcasts float32 models, which
    # the 1e-4 log-prob comparisons below are not meant to allow).
    return VLLMEngine(policy_dir, VLLMSettings(max_model_len=128))


def fresh_policy(tokenizer):
    return build_causal_lm("tiny", tokenizer, seed=0)  # the weights saved in policy_dir


def hf_greedy(model, tokenizer, prompts=PROMPTS):
    return greedy.hf_greedy(model, tokenizer, prompts, GREEDY.max_new_tokens)


def engine_greedy(engine, tokenizer, prompts=PROMPTS):
    return greedy.engine_greedy(engine, tokenizer, prompts, GREEDY.max_new_tokens)


def train_a_few_steps(model, tokenizer, steps=3):
    """A few AdamW updates on a fixed LM batch: weights far enough from the saved ones to change outputs."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    ids, mask = left_pad_prompts(tokenizer, PROMPTS * 2, torch.device("cpu"))
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def assert_same(ours, theirs, atol=1e-4):
    ids, mask, logprobs = ours
    want_ids, want_mask, want_logprobs = theirs
    assert torch.equal(ids, want_ids)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(logprobs, want_logprobs, atol=atol, rtol=0)


def test_engine_follows_the_policy_after_updates(engine, tokenizer):
    """After optimizer updates the synced engine samples what the training model would; a stale one not."""
    policy = fresh_policy(tokenizer)
    engine.sync_weights(policy)
    assert_same(engine_greedy(engine, tokenizer), hf_greedy(policy, tokenizer))

    train_a_few_steps(policy, tokenizer)
    stale, now = engine_greedy(engine, tokenizer), hf_greedy(policy, tokenizer)
    # The test can fail: the stale engine's tokens or log-probs are detected as different.
    with pytest.raises(AssertionError):
        assert_same(stale, now)

    engine.sync_weights(policy)
    assert_same(engine_greedy(engine, tokenizer), now)


def test_lora_policy_is_merged_on_the_fly(engine, tokenizer):
    """A PEFT policy syncs as base + B·A while its adapters stay unmerged and unchanged."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    policy = get_peft_model(fresh_policy(tokenizer), lora)
    train_a_few_steps(policy, tokenizer)  # lora_B leaves zero, so the merged weights differ from the base
    adapters = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k}
    engine.sync_weights(policy)
    assert_same(engine_greedy(engine, tokenizer), hf_greedy(policy, tokenizer))
    after = {k: v for k, v in policy.state_dict().items() if "lora_" in k}
    assert adapters.keys() == after.keys() and all(torch.equal(adapters[k], after[k]) for k in adapters)
    assert not any(getattr(m, "merged", False) for m in policy.modules())


def test_rollout_tensors_match_the_hf_path_with_eos(engine, tokenizer):
    """sample_and_score returns the same padded ids, mask (up to and including EOS) and texts either way.

    The EOS row of the LM head is set to 1.01 x the row of the token greedy decoding picks second in the
    first response, so that response ends with EOS at its second token and is padded after it.
    """
    policy = fresh_policy(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    second = int(hf_greedy(policy, tokenizer)[0][0, 1])
    with torch.no_grad():
        policy.lm_head.weight[eos] = policy.lm_head.weight[second] * 1.01
    engine.sync_weights(policy)
    ids, mask = left_pad_prompts(tokenizer, PROMPTS, torch.device("cpu"))
    common = {
        "policy": policy,
        "tokenizer": tokenizer,
        "prompt_ids": ids,
        "prompt_mask": mask,
        "prompts": PROMPTS,
        "rewards": RewardSources(
            reward_function=lambda prompts, responses: [float(len(r)) for r in responses]
        ),
    }
    hf = sample_and_score(sampling=GREEDY, **common)
    vllm_greedy = SamplingConfig(8, 0.0, generation_engine="vllm")
    ours = sample_and_score(sampling=vllm_greedy, placement=Placement(engine=engine), **common)
    assert hf.response_mask[0].tolist()[:3] == [1, 1, 0] and hf.response_ids[0, 1] == eos
    assert hf.response_ids[0, 2:].eq(pad).all()
    width = hf.response_ids.shape[1]
    assert torch.equal(ours.response_ids[:, :width], hf.response_ids)
    assert torch.equal(ours.response_mask[:, :width], hf.response_mask)
    assert ours.response_mask[:, width:].sum() == 0
    assert ours.texts == hf.texts and torch.equal(ours.ended, hf.ended)
    assert torch.equal(ours.raw_scores, hf.raw_scores)


def test_sampled_logprobs_are_the_forward_at_the_temperature(engine, tokenizer):
    """At temperature 0.7, vLLM's returned log-probs equal log_softmax(logits / 0.7) of a full forward."""
    policy = fresh_policy(tokenizer)
    engine.sync_weights(policy)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.7, generation_engine="vllm")
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    kw = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    response_ids, response_mask, logprobs = engine.generate(rows, sampling, seed=3, logprobs=True, **kw)
    ids, mask = left_pad_prompts(tokenizer, PROMPTS, torch.device("cpu"))
    input_ids, attention_mask, width = select_rows(
        ids, mask, response_ids, response_mask, torch.arange(len(PROMPTS))
    )
    with torch.no_grad():
        want = response_token_logprobs(
            policy, input_ids, attention_mask, input_ids.shape[1] - width, temperature=0.7
        )[0]
    torch.testing.assert_close(logprobs[:, :width], want * response_mask[:, :width], atol=1e-4, rtol=0)


def test_sampling_is_seeded_per_call_and_per_row(engine, tokenizer):
    """Same seed, same samples; another seed, other samples; a repeated prompt gets its own sample."""
    engine.sync_weights(fresh_policy(tokenizer))
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, generation_engine="vllm")
    rows = [tokenizer("alpha beta", add_special_tokens=False)["input_ids"]] * 8
    kw = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    first = engine.generate(rows, sampling, seed=1, **kw)[0]
    assert torch.equal(first, engine.generate(rows, sampling, seed=1, **kw)[0])
    assert not torch.equal(first, engine.generate(rows, sampling, seed=2, **kw)[0])
    assert len({tuple(r) for r in first.tolist()}) > 1


def test_truncated_sampling_refuses_sampled_logprobs(engine, tokenizer):
    sampling = SamplingConfig(max_new_tokens=4, temperature=1.0, top_k=5, generation_engine="vllm")
    with pytest.raises(ValueError, match="old_logprobs='forward'"):
        engine.generate([[5, 6]], sampling, eos_token_id=1, pad_token_id=0, seed=0, logprobs=True)


def test_policy_copy_is_left_alone(engine, tokenizer):
    """sync_weights reads the model; it changes no parameter (the trained model is not merged or moved)."""
    policy = fresh_policy(tokenizer)
    before = copy.deepcopy(policy.state_dict())
    engine.sync_weights(policy)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_vllm_rollouts_raise_held_out_gold_reward(word_rl_testbed, word_sft_start, tmp_path, method):
    """Seeded: from the SFT'd tiny testbed policy (tests/word_rl.py), PPO (critic, GAE) and GRPO (groups of
    4, no critic) with generation_engine='vllm' against the gold reward, with the settings and budget of
    their HF tests (test_ppo.py, test_critic_free.py); the held-out mean gold reward (sampled with HF from
    the trained policy) must rise clearly."""
    import lightning as L
    from word_rl import cpu_trainer

    from lightning_rlhf import GRPO, PPOModule, PromptDataModule
    from lightning_rlhf.testbed.evaluate import evaluate_policy
    from lightning_rlhf.testbed.reward import GoldReward

    testbed, start = word_rl_testbed, word_sft_start
    if method == "ppo":
        kwargs, prompts_per_rollout = {"critic_learning_rate": 1e-3}, 64
    else:
        kwargs, prompts_per_rollout = {"advantage": GRPO(), "num_generations": 4}, 16
    L.seed_everything(0, verbose=False)
    module = PPOModule(
        str(start.path),
        reward_function=GoldReward(str(testbed)),
        max_new_tokens=12,
        mini_batch_size=16,
        micro_batch_size=16,
        learning_rate=1e-4,
        kl_coef=0.05,
        generation_engine="vllm",
        vllm=VLLMSettings(dtype="float32", max_model_len=128),
        **kwargs,
    )
    fit = cpu_trainer(tmp_path, max_steps=4 * 30, enable_checkpointing=False, deterministic=True)
    data = PromptDataModule(
        str(start.path), str(testbed / "prompts_train.jsonl"), batch_size=prompts_per_rollout
    )
    fit.fit(module, data)
    after = evaluate_policy(
        module.policy, start.tokenizer, start.task, start.held_out, samples_per_prompt=2, seed=1
    )
    print(f"gold reward before / after {method} with vLLM rollouts:", start.before, after)
    assert after["gold_reward"] > start.before["gold_reward"] + 0.15, (start.before, after)
    assert module.engine is not None and "time/generation" in fit.callback_metrics
    assert (module.critic is None) == (method == "grpo")


def test_ppo_old_logprobs_from_vllm_pass_the_first_step_guard(tmp_path, tokenizer):
    """old_logprobs='sampling' takes vLLM's returned log-probs; in float32 they agree with the training
    forward to ~1e-6 (test_sampled_logprobs_are_the_forward_at_the_temperature), well inside the default
    first_step_tolerance of 1e-3, so the guard's ratio == 1 check passes on the first update."""
    import lightning as L

    from lightning_rlhf import PPOModule, PromptDataModule
    from lightning_rlhf.testbed.files import SplitSizes, write_testbed
    from lightning_rlhf.testbed.reward import GoldReward
    from lightning_rlhf.testbed.task import TaskConfig

    testbed = tmp_path / "tb"
    sizes = SplitSizes(sft_train=8, sft_eval=8, pairs_train=8, pairs_eval=8, prompts_train=32, prompts_eval=8)
    write_testbed(testbed, TaskConfig(seed=0), sizes, model_size="tiny")
    L.seed_everything(0, verbose=False)
    ppo = PPOModule(
        str(testbed / "init_policy"),
        reward_function=GoldReward(str(testbed)),
        max_new_tokens=8,
        temperature=0.8,
        mini_batch_size=16,
        micro_batch_size=16,
        old_logprobs="sampling",
        generation_engine="vllm",
        vllm=VLLMSettings(dtype="float32", max_model_len=64),
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_steps=2,
    )
    data = PromptDataModule(
        str(testbed / "init_policy"),
        str(testbed / "prompts_train.jsonl"),
        str(testbed / "prompts_eval.jsonl"),  # validation during fit samples with the engine too
        batch_size=16,
    )
    trainer.fit(ppo, data)
    assert ppo._first_step_pending is False and trainer.global_step == 2
    assert "val/score" in trainer.callback_metrics


def test_rollout_benchmark_script_runs(tmp_path):
    """benchmarks/gpu/vllm_rollout.py end to end on CPU in a tiny shape, so it cannot rot between GPU runs."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "vllm_rollout.py"
    out = tmp_path / "bench.json"
    args = ["--prompts", "4", "--new-tokens", "4", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["hf"]["tokens"] > 0 and result["vllm"]["tokens"] > 0
    assert "| vllm |" in proc.stdout


def test_dpo_iter_samples_with_vllm_and_the_engine_follows_its_updates(tmp_path):
    """DPO-Iter through the shared on-policy engine with generation_engine='vllm': its pairs come from the
    engine, which receives the policy's weights before each iteration's sampling; after training, a sync
    makes the engine's greedy continuations and log-probs equal the trained policy's, which moved."""
    import lightning as L
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_rlhf import IterativeDPOModule, PromptDataModule
    from lightning_rlhf.quickstart import read_prompts
    from lightning_rlhf.testbed.files import SplitSizes, write_testbed
    from lightning_rlhf.testbed.reward import GoldReward
    from lightning_rlhf.testbed.task import TaskConfig

    testbed = tmp_path / "tb"
    sizes = SplitSizes(sft_train=8, sft_eval=8, pairs_train=8, pairs_eval=8, prompts_train=24, prompts_eval=4)
    write_testbed(testbed, TaskConfig(seed=0), sizes, model_size="tiny")
    policy_dir = str(testbed / "init_policy")
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    L.seed_everything(0, verbose=False)
    module = IterativeDPOModule(
        policy_dir,
        reward_function=GoldReward(str(testbed)),
        num_samples=4,
        max_new_tokens=8,
        mini_batch_size=8,
        micro_batch_size=8,
        learning_rate=1e-2,
        generation_engine="vllm",
        vllm=VLLMSettings(dtype="float32", max_model_len=64),
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, PromptDataModule(policy_dir, str(testbed / "prompts_train.jsonl"), batch_size=8))
    assert module.engine is not None and trainer.global_step == 3
    assert float(trainer.callback_metrics["iteration/pairs"]) > 0
    prompts = read_prompts(testbed / "prompts_eval.jsonl")
    module.policy.eval()
    trained = hf_greedy(module.policy, tokenizer, prompts)
    untrained = hf_greedy(AutoModelForCausalLM.from_pretrained(policy_dir).eval(), tokenizer, prompts)
    with pytest.raises(AssertionError):  # the policy moved: a stale engine would be caught below
        assert_same(untrained, trained)
    module.sampling_arguments()  # what each iteration does before sampling: sync the engine
    assert_same(engine_greedy(module.engine, tokenizer, prompts), trained)


def test_evaluate_samples_with_vllm_like_hf_greedy(policy_dir, tmp_path):
    """`lightning-rlhf evaluate --generation_engine vllm`: an engine per policy folder; greedy, its
    responses and the summary equal HF's (same prompt tokenization and decoding)."""
    import json

    from lightning_rlhf.evaluate import evaluate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    settings = {"max_new_tokens": 8, "temperature": 0.0}
    kwargs = dict(
        reward_functions={"length": lambda p, r: [float(len(x)) for x in r]}, apply_chat_template=False
    )
    hf_summary, hf, _ = evaluate([policy_dir], str(prompts), sampling=SamplingConfig(**settings), **kwargs)
    vllm_summary, ours, _ = evaluate(
        [policy_dir],
        str(prompts),
        sampling=SamplingConfig(**settings, generation_engine="vllm"),
        vllm=VLLMSettings(max_model_len=128),
        **kwargs,
    )
    assert ours[0].responses == hf[0].responses and ours[0].ended == hf[0].ended
    assert any(r for r in hf[0].responses)  # something was generated
    assert vllm_summary == hf_summary

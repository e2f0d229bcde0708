"""PPO rollout maths and collection, without a Trainer: every number against a hand or float64 computation."""

import math

import pytest
import torch

from lightning_rlhf.models import load_causal_lm, load_reward_model
from lightning_rlhf.ops import gae
from lightning_rlhf.rewards.calling import call_reward_function
from lightning_rlhf.rollout.collect import Placement, RewardSources, ShapingConfig, collect_rollout
from lightning_rlhf.rollout.generation import (
    SampledLogprobs,
    SamplingConfig,
    left_pad_prompts,
    response_mask_from_ids,
)
from lightning_rlhf.rollout.shaping import (
    AdaptiveKLController,
    RunningMoments,
    kl_penalized_rewards,
    sequence_kl,
    shape_scores,
)
from lightning_rlhf.rollout.types import Rollout, length_order, select_rows
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.reward import GoldReward
from lightning_rlhf.testbed.task import TaskConfig


def test_kl_penalized_rewards_hand_worked():
    """k1 KL = logp - ref. Row 0: 3 tokens, kl = [0.5, -0.2, 0.1]; kl_coef 0.1, score 2 on the last token:
    rewards = [-0.05, 0.02, -0.01 + 2] = [-0.05, 0.02, 1.99]. Row 1: 1 token (then padding), kl 0.4, score -1:
    [-0.04 - 1, 0, 0] = [-1.04, 0, 0]. Row 2: no response token: all zeros, the score has nowhere to go."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.6, -9.0, -9.0], [-3.0, -3.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.8, -0.6], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.float)
    rewards, kl = kl_penalized_rewards(torch.tensor([2.0, -1.0, 5.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(
        rewards, torch.tensor([[-0.05, 0.02, 1.99], [-1.04, 0.0, 0.0], [0.0, 0.0, 0.0]])
    )
    torch.testing.assert_close(kl, torch.tensor([[0.5, -0.2, 0.1], [0.4, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(sequence_kl(kl, mask), torch.tensor([0.4, 0.4, 0.0]))


def test_kl_penalized_rewards_against_a_float64_loop():
    gen = torch.Generator().manual_seed(0)
    n, r = 6, 7
    logp, ref = -torch.rand(n, r, generator=gen) * 3, -torch.rand(n, r, generator=gen) * 3
    lengths = torch.randint(0, r + 1, (n,), generator=gen)
    mask = (torch.arange(r)[None] < lengths[:, None]).float()
    scores = torch.randn(n, generator=gen)
    for estimator in ("k1", "k2", "k3"):
        rewards, _ = kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.3, estimator=estimator)
        for i in range(n):
            for t in range(r):
                expected = 0.0
                if t < lengths[i]:
                    x = float(logp[i, t]) - float(ref[i, t])
                    kl = {"k1": x, "k2": 0.5 * x * x, "k3": math.exp(-x) + x - 1}[estimator]
                    expected = -0.3 * kl + (float(scores[i]) if t == lengths[i] - 1 else 0.0)
                assert float(rewards[i, t]) == pytest.approx(expected, abs=1e-5), (estimator, i, t)


def test_shape_scores_penalty_normalization_clip():
    """raw [3, -1, 10], ended [T, F, T], penalty 2 -> [3, -3, 10]; clip 5 -> [3, -3, 5].
    With running normalization of [3, -3, 10]: mean 10/3, population std of the three values."""
    raw, ended = torch.tensor([3.0, -1.0, 10.0]), torch.tensor([True, False, True])
    out = shape_scores(raw, ended, missing_eos_penalty=2.0, clip=5.0, moments=None)
    torch.testing.assert_close(out, torch.tensor([3.0, -3.0, 5.0]))
    moments = RunningMoments()
    out = shape_scores(raw, ended, missing_eos_penalty=2.0, clip=None, moments=moments)
    std = math.sqrt(((1 / 3) ** 2 + (19 / 3) ** 2 + (20 / 3) ** 2) / 3)
    torch.testing.assert_close(out, (torch.tensor([3.0, -3.0, 10.0]) - 10 / 3) / std)


def test_running_moments_match_the_whole_stream():
    gen = torch.Generator().manual_seed(1)
    chunks = [torch.randn(int(n), generator=gen) * 3 + 1 for n in torch.randint(1, 20, (10,), generator=gen)]
    moments = RunningMoments()
    for chunk in chunks:
        moments.update(chunk)
    everything = torch.cat(chunks).double()
    assert moments.mean == pytest.approx(float(everything.mean()), abs=1e-9)
    assert moments.std == pytest.approx(float(everything.std(unbiased=False)), abs=1e-9)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.state_dict() == moments.state_dict()


def test_adaptive_kl_controller_hand_worked():
    """value 0.1, target 6, horizon 1000. KL 9: error clip(0.5) = 0.2, n 100: 0.1 * (1 + 0.2 * 0.1) = 0.102.
    KL 3: error -0.5 -> -0.2: 0.102 * (1 - 0.02) = 0.09996."""
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(9.0, 100)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(3.0, 100)
    assert ctl.value == pytest.approx(0.09996)
    with pytest.raises(ValueError, match="target_kl > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 7, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    assert response_mask_from_ids(ids, eos_token_id=2).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]


def test_reward_function_output_is_checked():
    with pytest.raises(ValueError, match="returned 1 scores for 2 responses"):
        call_reward_function(lambda p, r: [1.0], ["a", "b"], ["x", "y"], None, "reward_function")
    with pytest.raises(ValueError, match="non-finite score nan for response 1"):
        call_reward_function(lambda p, r: [1.0, float("nan")], ["a", "b"], ["x", "y"], None, "reward")


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb")
    sizes = SplitSizes(sft_train=8, sft_eval=8, pairs_train=8, pairs_eval=8, prompts_train=16, prompts_eval=8)
    write_testbed(out, TaskConfig(seed=0), sizes, model_size="nano")
    return out


def test_collect_rollout_numbers(testbed):
    """Old and reference log-probs equal a per-sequence float64 recomputation without padding; the rewards
    sum to score - kl_coef * KL; advantages are GAE of those rewards and values."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(testbed / "tokenizer")
    policy = load_causal_lm(str(testbed / "init_policy"))
    critic = load_reward_model(str(testbed / "init_policy"))
    prompts = [
        line.split('"prompt": ')[1].rsplit('"', 1)[0].strip('"')
        for line in (testbed / "prompts_train.jsonl").read_text().splitlines()
    ][:6]
    prompt_ids, prompt_mask = left_pad_prompts(tok, prompts, torch.device("cpu"))
    torch.manual_seed(0)
    rollout = collect_rollout(
        policy=policy,
        reference=policy,
        critic=critic,
        tokenizer=tok,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        prompts=prompts,
        sampling=SamplingConfig(max_new_tokens=6),
        kl_coef=0.2,
        shaping=ShapingConfig(gamma=0.9, lam=0.8),
        rewards=RewardSources(reward_function=GoldReward(str(testbed))),
        placement=Placement(micro_batch_size=4),
    )
    gold = torch.tensor(GoldReward(str(testbed))(prompts, rollout.responses))
    torch.testing.assert_close(rollout.raw_scores, gold)
    assert torch.all(rollout.kl == 0) and torch.equal(rollout.logprobs, rollout.ref_logprobs)

    reference64 = load_causal_lm(str(testbed / "init_policy")).double()
    for i in range(len(prompts)):
        p = prompt_ids[i][prompt_mask[i] == 1]
        n = int(rollout.response_mask[i].sum())
        seq = torch.cat([p, rollout.response_ids[i, :n]])[None]
        logits = reference64(input_ids=seq).logits[0].log_softmax(-1)
        expected = torch.stack([logits[len(p) - 1 + t, seq[0, len(p) + t]] for t in range(n)])
        torch.testing.assert_close(rollout.logprobs[i, :n].double(), expected, atol=1e-5, rtol=1e-5)
        assert torch.all(rollout.logprobs[i, n:] == 0)
    mask = rollout.response_mask.float()
    torch.testing.assert_close(rollout.rewards.sum(1), rollout.scores * (mask.sum(1) > 0))
    advantages, returns = gae(rollout.rewards, rollout.values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(rollout.advantages, advantages)
    torch.testing.assert_close(rollout.returns, returns)
    assert rollout.ended.tolist() == [
        bool(r[int(m.sum()) - 1] == tok.eos_token_id)
        for r, m in zip(rollout.response_ids, rollout.response_mask, strict=True)
    ]


def test_select_rows_cuts_only_columns_that_are_padding_in_every_row():
    prompt_ids = torch.tensor([[0, 0, 0, 5], [0, 0, 6, 7], [0, 8, 9, 4]])
    prompt_mask = (prompt_ids != 0).long()
    response_ids = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0], [4, 5, 6, 2]])
    response_mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    ids, mask, width = select_rows(prompt_ids, prompt_mask, response_ids, response_mask, torch.tensor([1, 0]))
    assert width == 2  # row 0's two response tokens; the last two columns are padding in both rows
    assert ids.tolist() == [[6, 7, 3, 0], [0, 5, 1, 2]]  # prompt column 2 is the first with a real token
    assert mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    ids, mask, width = select_rows(prompt_ids, prompt_mask, response_ids, response_mask, torch.tensor([2]))
    assert (ids.tolist(), width) == ([[8, 9, 4, 4, 5, 6, 2]], 4)
    assert length_order(prompt_mask, response_mask).tolist() == [0, 1, 2]  # 3, 3 (stable), 7 tokens
    assert length_order(prompt_mask, torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1]])).tolist() == [1, 0, 2]


def test_rollout_minibatch_is_trimmed_consistently():
    prompt_mask = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 1]])
    response_mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    per_token = torch.arange(9.0).view(3, 3)
    rollout = Rollout(
        prompt_ids=prompt_mask * 7,
        prompt_mask=prompt_mask,
        response_ids=response_mask * 3,
        response_mask=response_mask,
        logprobs=per_token,
        ref_logprobs=per_token,
        values=per_token + 10,
        scores=torch.zeros(3),
        raw_scores=torch.zeros(3),
        ended=torch.zeros(3, dtype=torch.bool),
        kl=per_token,
        rewards=per_token,
        advantages=per_token + 20,
        returns=per_token + 30,
    )
    mb = rollout.minibatch(torch.tensor([0, 1]))
    assert mb["input_ids"].shape == (2, 4) and mb["response_mask"].tolist() == [[1, 0], [1, 1]]
    assert mb["input_ids"].shape[1] - mb["response_mask"].shape[1] == 2  # the cut prompt width
    assert mb["logprobs"].tolist() == [[0.0, 1.0], [3.0, 4.0]]
    assert mb["advantages"].tolist() == [[20.0, 21.0], [23.0, 24.0]]
    assert rollout.minibatch(torch.tensor([2]))["input_ids"].shape == (1, 6)


def _rollout(testbed, old_logprobs: str, n: int = 6, seed: int = 0):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(testbed / "tokenizer")
    policy = load_causal_lm(str(testbed / "init_policy"))
    prompts = [
        line.split('"prompt": ')[1].rsplit('"', 1)[0].strip('"')
        for line in (testbed / "prompts_train.jsonl").read_text().splitlines()
    ][:n]
    prompt_ids, prompt_mask = left_pad_prompts(tok, prompts, torch.device("cpu"))
    with torch.no_grad():  # make EOS likely (the untrained policy almost never ends a response)
        hidden = policy.model(input_ids=prompt_ids, attention_mask=prompt_mask).last_hidden_state
        mean = hidden[prompt_mask.bool()].mean(0)
        policy.get_output_embeddings().weight[tok.eos_token_id] += 2.0 * mean / mean.norm() ** 2
    torch.manual_seed(seed)
    return collect_rollout(
        policy=policy,
        reference=policy,
        critic=load_reward_model(str(testbed / "init_policy")),
        tokenizer=tok,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        prompts=prompts,
        sampling=SamplingConfig(max_new_tokens=24, temperature=0.7),
        kl_coef=0.2,
        shaping=ShapingConfig(),
        rewards=RewardSources(reward_function=GoldReward(str(testbed))),
        # A generate call per prompt: some end before max_new_tokens (padded).
        placement=Placement(micro_batch_size=4, generation_batch_size=1),
        old_logprobs=old_logprobs,
    )


def test_old_logprobs_read_from_sampling_equal_the_forward(testbed):
    """The log-probs recorded while sampling (KV cache, temperature 0.7) are the forward's, up to float noise;
    the samples themselves do not change (same seed), and the reference is still a forward."""
    forward, sampled = _rollout(testbed, "forward"), _rollout(testbed, "sampling")
    assert torch.equal(forward.response_ids, sampled.response_ids)
    lengths = sampled.response_mask.sum(1)
    assert lengths.min() < lengths.max() == sampled.response_mask.shape[1]  # some responses end early
    torch.testing.assert_close(sampled.logprobs, forward.logprobs, atol=2e-5, rtol=0)
    assert torch.all(sampled.logprobs[sampled.response_mask == 0] == 0)
    torch.testing.assert_close(sampled.ref_logprobs, forward.ref_logprobs)
    torch.testing.assert_close(sampled.values, forward.values)


def test_sampled_logprobs_refuse_a_call_they_did_not_record(testbed):
    policy = load_causal_lm(str(testbed / "init_policy"))
    recorder = SampledLogprobs(policy, temperature=1.0)
    with pytest.raises(RuntimeError, match="recorded 0 decoding steps for 3 response tokens"):
        recorder.finish(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature > 0"):
        SampledLogprobs(policy, temperature=0.0)

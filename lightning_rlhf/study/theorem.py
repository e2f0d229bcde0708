"""A bandit-sized illustration of Theorem 4.1 of Xu et al. (2024): DPO can move probability onto a response
that appears in no preference pair, where PPO's KL penalty (on the policy's *own* samples) holds it back.

The policy is the smallest autoregressive "language model" there is: a first token ``a`` or ``b``; after
``b`` the response ends, after ``a`` it ends (EOS) or repeats ``a``. So there are three responses,
``"a"``, ``"b"`` and ``"aa"``, and two tabular softmax heads (first token; continuation after ``a``).
``"a"`` and ``"aa"`` share the first token, just as LM responses share tokens and parameters.

* Preference data (limited, noisy): 3 pairs ``"a" > "b"`` and 1 pair ``"b" > "a"``. ``"aa"`` is in no pair.
* Gold reward: ``"a"`` 1, ``"b"`` 0, ``"aa"`` -1 (the unseen response is the worst).
* Reference (SFT) policy: ``P(a) = 0.1``; after ``a``, ``P(EOS) = 0.9``, so ``P("aa") = 0.01``.

DPO (``SigmoidDPOLoss``) only sees log-ratios of ``"a"`` and ``"b"``: raising ``log pi("a") - log pi("b")``
mostly raises the shared first token, and ``"aa"`` rises with it; nothing in the loss pulls it back (the
theorem: DPO's solution set contains policies with arbitrary mass on responses outside the data). PPO
maximises ``E_pi[r_hat] - beta * KL(pi || pi_ref)`` over *all* responses the policy can produce, with a
reward model ``r_hat`` fitted on the same pairs (``bradley_terry_loss``; it never sees ``"aa"``, so scores it
0); the KL term charges ``"aa"`` for every bit of probability it gains over the reference.

Both are optimised deterministically (full-batch gradient steps in float64, exact expectations instead of
sampled rollouts), so the printed probabilities are exact and tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_rlhf.losses import SigmoidDPOLoss, bradley_terry_loss

RESPONSES = ("a", "b", "aa")
GOLD_REWARD = {"a": 1.0, "b": 0.0, "aa": -1.0}
# (chosen, rejected) index pairs into RESPONSES: 3 x "a" > "b", 1 x "b" > "a".
PAIRS = ((0, 1), (0, 1), (0, 1), (1, 0))


@dataclass(frozen=True)
class BanditSettings:
    """Reference policy, beta and the optimisation schedule of the illustration."""

    reference_first_a: float = 0.1
    """P(first token = a) under the reference."""
    reference_stop_after_a: float = 0.9
    """P(EOS | a) under the reference; 1 minus it is P("aa") / P(first token = a)."""
    beta: float = 0.1
    """KL coefficient (PPO) and DPO beta: the paper's 0.1."""
    steps: int = 5000
    learning_rate: float = 1.0
    reward_steps: int = 2000
    reward_learning_rate: float = 0.5


def response_logps(first_logits: Tensor, after_a_logits: Tensor) -> Tensor:
    """log pi of ("a", "b", "aa") from the two heads: first token [a, b] and after-a [EOS, a]."""
    first, after_a = first_logits.log_softmax(-1), after_a_logits.log_softmax(-1)
    return torch.stack([first[0] + after_a[0], first[1], first[0] + after_a[1]])


def _reference_logits(s: BanditSettings) -> tuple[Tensor, Tensor]:
    p, q = s.reference_first_a, s.reference_stop_after_a
    as_logits = lambda x: torch.tensor([x, 1 - x], dtype=torch.float64).log()  # noqa: E731
    return as_logits(p), as_logits(q)


def _dpo_loss(logps: Tensor, reference: Tensor, beta: float) -> Tensor:
    chosen, rejected = torch.tensor([c for c, _ in PAIRS]), torch.tensor([r for _, r in PAIRS])
    loss = SigmoidDPOLoss(beta=beta)
    return loss(logps[chosen], logps[rejected], reference[chosen], reference[rejected]).loss


def train_dpo(s: BanditSettings) -> Tensor:
    """Gradient descent on the DPO loss of the pairs, from the reference; returns pi over RESPONSES."""
    first, after_a = (t.clone().requires_grad_(True) for t in _reference_logits(s))
    reference = response_logps(*_reference_logits(s))
    for _ in range(s.steps):
        loss = _dpo_loss(response_logps(first, after_a), reference, s.beta)
        grads = torch.autograd.grad(loss, (first, after_a))
        with torch.no_grad():
            first -= s.learning_rate * grads[0]
            after_a -= s.learning_rate * grads[1]
    return response_logps(first, after_a).detach().exp()


def fit_reward_model(s: BanditSettings) -> Tensor:
    """A tabular reward model over RESPONSES (zeros at the start) fitted with the Bradley-Terry loss."""
    reward = torch.zeros(len(RESPONSES), dtype=torch.float64, requires_grad=True)
    chosen, rejected = torch.tensor([c for c, _ in PAIRS]), torch.tensor([r for _, r in PAIRS])
    for _ in range(s.reward_steps):
        (grad,) = torch.autograd.grad(bradley_terry_loss(reward[chosen], reward[rejected]).loss, reward)
        with torch.no_grad():
            reward -= s.reward_learning_rate * grad
    return reward.detach()


def train_ppo(s: BanditSettings, reward: Tensor) -> Tensor:
    """Gradient ascent on E_pi[r_hat] - beta * KL(pi || pi_ref) (exact, over all responses), from the
    reference: the objective PPO's clipped updates climb in expectation."""
    first, after_a = (t.clone().requires_grad_(True) for t in _reference_logits(s))
    reference = response_logps(*_reference_logits(s))
    for _ in range(s.steps):
        logps = response_logps(first, after_a)
        probs = logps.exp()
        objective = (probs * reward).sum() - s.beta * (probs * (logps - reference)).sum()
        grads = torch.autograd.grad(-objective, (first, after_a))
        with torch.no_grad():
            first -= s.learning_rate * grads[0]
            after_a -= s.learning_rate * grads[1]
    return response_logps(first, after_a).detach().exp()


def run_theorem_illustration(settings: BanditSettings | None = None) -> dict:
    """Reference, DPO and PPO probabilities of every response, their gold rewards and the RM's scores."""
    s = settings or BanditSettings()
    reference = response_logps(*_reference_logits(s)).exp()
    reward = fit_reward_model(s)
    policies = {"reference": reference, "dpo": train_dpo(s), "ppo": train_ppo(s, reward)}
    gold = torch.tensor([GOLD_REWARD[y] for y in RESPONSES], dtype=torch.float64)
    return {
        "responses": list(RESPONSES),
        "pairs": [[RESPONSES[c], RESPONSES[r]] for c, r in PAIRS],
        "reward_model": dict(zip(RESPONSES, reward.tolist(), strict=True)),
        "policies": {
            name: {
                "probabilities": dict(zip(RESPONSES, probs.tolist(), strict=True)),
                "gold_reward": float((probs * gold).sum()),
            }
            for name, probs in policies.items()
        },
    }


def format_theorem_table(result: dict) -> str:
    """A markdown table: one row per policy, P(response) per column, then the expected gold reward."""
    names = result["responses"]
    header = "| policy | " + " | ".join(f'P("{y}")' for y in names) + " | gold reward |"
    lines = [header, "|" + "---|" * (len(names) + 2)]
    for policy, row in result["policies"].items():
        probs = " | ".join(f"{row['probabilities'][y]:.4f}" for y in names)
        lines.append(f"| {policy} | {probs} | {row['gold_reward']:.4f} |")
    return "\n".join(lines)

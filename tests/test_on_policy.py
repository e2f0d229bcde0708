"""The shared on-policy base (modules/on_policy.py): its arguments reach --help and the hyper-parameters of
PPO and DPO-Iter, and its one update loop takes exactly the optimizer steps a hand-written loop takes."""

import inspect

import lightning as L
import pytest
import torch

from lightning_rlhf import IterativeDPOModule, PPOModule
from lightning_rlhf.cli import build_cli
from lightning_rlhf.export import build_module
from lightning_rlhf.modules.on_policy import MicroStep, OnPolicyModule, mean_metrics

SHARED = [p for p in inspect.signature(OnPolicyModule.__init__).parameters if p != "self"]


def own_arguments(cls) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]


@pytest.mark.parametrize("cls", [PPOModule, IterativeDPOModule])
def test_help_lists_every_shared_and_own_argument_with_its_doc(cls, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--model.help", f"lightning_rlhf.{cls.__name__}"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    blocks = {}
    for block in text.split("\n  --model.")[1:]:
        name = block.split()[0]
        blocks[name] = " ".join(block.split()[1:])
    for name in {*SHARED, *own_arguments(cls)}:
        assert name in blocks, f"{cls.__name__} --help lacks --model.{name}"
        # Each flag carries its one-line doc before jsonargparse's "(type: ..., default: ...)".
        doc = blocks[name].split("(type:")[0]
        assert len(doc.split()) >= 3, f"--model.{name} has no doc: {blocks[name]!r:.120}"


def test_hyperparameters_hold_the_shared_defaults_and_the_subclass_values():
    ppo = PPOModule("m", reward_function=len, temperature=0.7, kl_coef=0.2)
    assert set(SHARED) - {"reward_function", "gold_function"} <= set(ppo.hparams)
    assert (ppo.hparams.temperature, ppo.hparams.kl_coef, ppo.hparams.micro_batch_size) == (0.7, 0.2, 8)
    assert ppo.sampling.temperature == 0.7 and "kwargs" not in ppo.hparams
    rebuilt = build_module(PPOModule, dict(ppo.hparams))  # as export rebuilds it from a checkpoint
    assert rebuilt.hparams == ppo.hparams and rebuilt.sampling == ppo.sampling
    dpo_iter = IterativeDPOModule("m", reward_function=len, num_samples=3, top_k=5)
    assert (dpo_iter.hparams.num_samples, dpo_iter.sampling.top_k) == (3, 5)
    assert dpo_iter.hparams.generation_batch_size == 64 and dpo_iter.hparams.zero3_generation == "gather"


def test_shared_arguments_are_checked_with_the_subclass_named():
    with pytest.raises(ValueError, match=r"IterativeDPOModule.*temperature"):
        IterativeDPOModule("m", reward_function=len, temperature=0.0)
    with pytest.raises(ValueError, match=r"PPOModule.*micro_batch_size"):
        PPOModule("m", reward_function=len, mini_batch_size=6, micro_batch_size=4)


def initial_weight() -> torch.Tensor:
    return torch.randn(1, 3, generator=torch.Generator().manual_seed(0))


class LinearOnPolicy(OnPolicyModule):
    """A linear model fitted by the shared update loop: loss = mean over rows of (w . x - y)^2."""

    def __init__(self, x, y, **kwargs):
        super().__init__("unused", reward_function=len, max_grad_norm=None, **kwargs)
        self.x, self.y = x, y
        self.stop_after: int | None = None
        self.minis: list[list[int]] = []  # the mini-batches' rows, in the order the loop drew them

    def configure_model(self):
        if self.policy is None:
            self.policy = torch.nn.Linear(self.x.shape[1], 1, bias=False)
            with torch.no_grad():
                self.policy.weight.copy_(initial_weight())

    def configure_optimizers(self):
        return torch.optim.SGD(self.policy.parameters(), lr=0.1)

    def micro_step(self, rows, mini):
        if not self.minis or self.minis[-1] != mini.tolist():
            self.minis.append(mini.tolist())
        error = self.policy(self.x[rows]).squeeze(1) - self.y[rows]
        loss = error.pow(2).mean()
        return MicroStep(loss, len(rows) / len(mini), {}, {"loss": loss.detach()})

    def training_step(self, batch, batch_idx):
        calls = []

        def stop(steps):
            calls.append(len(steps))
            return self.stop_after is not None and len(calls) >= self.stop_after

        self.taken, self.stopped = self.update_loop(len(self.x), 2, self.micro_step, should_stop=stop)

    def train_dataloader(self):
        return [0]


def fit_linear(micro_batch_size: int, stop_after: int | None = None, poison_row: int | None = None):
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, generator=torch.Generator().manual_seed(2))
    if poison_row is not None:
        x[poison_row, 0] = float("nan")
    module = LinearOnPolicy(x, y, mini_batch_size=4, micro_batch_size=micro_batch_size, nonfinite="skip")
    module.stop_after = stop_after
    L.seed_everything(3, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=-1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return module, x, y


def reference_loop(x, y, minis: list[list[int]], skip_rows: set = frozenset()):
    """The same SGD steps written out in float64 over the loop's mini-batches (its own shuffle)."""
    w = initial_weight().double()
    steps = 0
    for mini in minis:
        if skip_rows & set(mini):
            continue
        xs, ys = x[mini].double(), y[mini].double()
        grad = 2 * ((xs @ w.T).squeeze(1) - ys) @ xs / len(mini)
        w = w - 0.1 * grad
        steps += 1
    return w, steps


def assert_shuffled_passes(minis: list[list[int]], epochs: int) -> None:
    """Each pass is a permutation of the 8 rows in mini-batches of 4."""
    assert [len(m) for m in minis] == [4] * (2 * epochs)
    for epoch in range(epochs):
        assert sorted(minis[2 * epoch] + minis[2 * epoch + 1]) == list(range(8))


@pytest.mark.parametrize("micro_batch_size", [1, 2, 4])
def test_update_loop_equals_a_hand_written_loop_for_any_micro_batch_size(micro_batch_size):
    """2 epochs x 2 mini-batches of 4 rows: 4 SGD steps on the mini-batch mean, however it is split."""
    module, x, y = fit_linear(micro_batch_size)
    assert_shuffled_passes(module.minis, epochs=2)
    want, steps = reference_loop(x, y, module.minis)
    assert steps == 4 and not module.stopped
    assert len(module.taken) == 4 * (4 // micro_batch_size)
    assert module.policy.weight.detach().double() == pytest.approx(want, abs=1e-6)
    assert set(mean_metrics(module.taken)) == {"loss"}


def test_update_loop_stops_early_and_skips_a_nonfinite_mini_batch():
    module, x, y = fit_linear(2, stop_after=3)
    assert module.stopped and len(module.minis) == 3  # the 4th mini-batch is never drawn
    want, steps = reference_loop(x, y, module.minis)
    assert module.policy.weight.detach().double() == pytest.approx(want, abs=1e-6)
    module, x, y = fit_linear(2, poison_row=5)
    assert_shuffled_passes(module.minis, epochs=2)
    want, steps = reference_loop(x, y, module.minis, skip_rows={5})
    assert steps == 2 and module.nonfinite_skipped == 2  # row 5's mini-batch, once per epoch
    assert module.policy.weight.detach().double() == pytest.approx(want, abs=1e-6)

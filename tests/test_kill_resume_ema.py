"""A DPO run with an EMA reference killed with SIGKILL mid-training and resumed from its last checkpoint
ends with the same policy, reference and EMA counters as the uninterrupted run (real subprocesses)."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_rlhf.testbed.files import tokenizer_corpus
from lightning_rlhf.testbed.models import build_causal_lm
from lightning_rlhf.testbed.task import TaskConfig, WordTask
from lightning_rlhf.testbed.tokenizer import train_tokenizer

# The training job run in a subprocess. Every batch is the same, so a resumed loader (which restarts its
# epoch) sees exactly what the uninterrupted run saw; exact data-position resume is a separate concern.
JOB = textwrap.dedent(
    """
    import os, signal, sys
    import lightning as L, torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_rlhf import DPOModule, EMAReferenceUpdate

    model_dir, root, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)

    class KillAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint: a real crash

    chosen, rejected = [[10, 11, 20, 21, 1], [12, 13, 22, 1, 0]], [[10, 11, 30, 1, 0], [12, 13, 31, 32, 1]]
    attention = torch.tensor([[1] * m + [0] * (5 - m) for m in (5, 4, 4, 5)])
    response = attention.clone()
    response[:, :2] = 0
    batch = {"input_ids": torch.tensor(chosen + rejected), "attention_mask": attention,
             "response_mask": response, "index": torch.tensor([0, 1])}
    L.seed_everything(0)
    module = DPOModule(model_dir, learning_rate=1e-2, diagnostic_batches=0)
    ema = EMAReferenceUpdate(decay=0.2, every_n_steps=2)
    checkpoint = ModelCheckpoint(os.path.join(root, "ckpt"), filename="{step}", every_n_train_steps=1,
                                 save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root,
                        callbacks=[ema, checkpoint, KillAt()])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * 12, batch_size=None),
                ckpt_path=resume if resume != "-" else None)
    torch.save({"policy": module.policy.state_dict(), "reference": module.reference.state_dict(),
                "ema": ema.state_dict(), "step": trainer.global_step}, os.path.join(root, "final.pt"))
    """
)


def run_job(model_dir: Path, root: Path, kill_at: int = -1, resume: str = "-") -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", JOB, str(model_dir), str(root), str(kill_at), resume],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode not in (0, -signal.SIGKILL):
        pytest.fail(f"training subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode


def test_sigkill_and_resume_keeps_the_ema_reference(tmp_path):
    tokenizer = train_tokenizer(tokenizer_corpus(WordTask(TaskConfig(seed=0))))
    model_dir = tmp_path / "policy"
    build_causal_lm("nano", tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    assert run_job(model_dir, tmp_path / "full") == 0
    assert run_job(model_dir, tmp_path / "crashed", kill_at=5) == -signal.SIGKILL
    assert not (tmp_path / "crashed" / "final.pt").exists()
    # Lightning runs checkpoint callbacks last, so the kill at step 5 came before step 5 was saved.
    saved = sorted(p.name for p in (tmp_path / "crashed" / "ckpt").glob("*.ckpt"))
    assert saved == [f"step={k}.ckpt" for k in range(1, 5)]
    last = tmp_path / "crashed" / "ckpt" / "step=4.ckpt"
    assert run_job(model_dir, tmp_path / "resumed", resume=str(last)) == 0

    full = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert full["step"] == resumed["step"] == 6
    assert full["ema"] == resumed["ema"] == {"updates": 3, "last_update_step": 6}
    for part in ("policy", "reference"):
        for name, value in full[part].items():
            torch.testing.assert_close(resumed[part][name], value, atol=1e-6, rtol=0, msg=f"{part}.{name}")

"""A DPO run with an EMA reference killed with SIGKILL mid-training and resumed from its last checkpoint
ends with the same policy, reference and EMA counters as the uninterrupted run (real subprocesses)."""

import torch
from resume_helpers import crash_and_resume

from lightning_rlhf.testbed.files import tokenizer_corpus
from lightning_rlhf.testbed.models import build_causal_lm
from lightning_rlhf.testbed.task import TaskConfig, WordTask
from lightning_rlhf.testbed.tokenizer import train_tokenizer

# Every batch is the same here (a plain list loader, no datamodule); tests/test_kill_resume.py covers the
# data position with the package's own datamodules.
JOB = """
from lightning_rlhf import DPOModule, EMAReferenceUpdate

model_dir = sys.argv[4]
chosen, rejected = [[10, 11, 20, 21, 1], [12, 13, 22, 1, 0]], [[10, 11, 30, 1, 0], [12, 13, 31, 32, 1]]
attention = torch.tensor([[1] * m + [0] * (5 - m) for m in (5, 4, 4, 5)])
response = attention.clone()
response[:, :2] = 0
batch = {"input_ids": torch.tensor(chosen + rejected), "attention_mask": attention,
         "response_mask": response, "index": torch.tensor([0, 1])}
L.seed_everything(0)
module = DPOModule(model_dir, learning_rate=1e-2, diagnostic_batches=0)
ema = EMAReferenceUpdate(decay=0.2, every_n_steps=2)
trainer = trainer_for(6)
trainer.callbacks.insert(0, ema)
trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * 12, batch_size=None),
            ckpt_path=resume)
torch.save({"policy": module.policy.state_dict(), "reference": module.reference.state_dict(),
            "ema": ema.state_dict(), "step": trainer.global_step}, os.path.join(root, "final.pt"))
"""


def test_sigkill_and_resume_keeps_the_ema_reference(tmp_path):
    tokenizer = train_tokenizer(tokenizer_corpus(WordTask(TaskConfig(seed=0))))
    model_dir = tmp_path / "policy"
    build_causal_lm("nano", tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    full, _, resumed, resumed_from = crash_and_resume(JOB, tmp_path, str(model_dir), kill_at=5)
    assert resumed_from == 4

    full = torch.load(full / "final.pt", weights_only=True)
    resumed = torch.load(resumed / "final.pt", weights_only=True)
    assert full["step"] == resumed["step"] == 6
    assert full["ema"] == resumed["ema"] == {"updates": 3, "last_update_step": 6}
    for part in ("policy", "reference"):
        for name, value in full[part].items():
            torch.testing.assert_close(resumed[part][name], value, atol=1e-6, rtol=0, msg=f"{part}.{name}")

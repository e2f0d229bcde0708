"""Two nodes x one process, simulated on one machine: DPO through ``lightning-rlhf fit`` with
``--trainer.num_nodes 2 --trainer.devices 1``, each "node" a process given only what a cluster gives it
(``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``; Lightning works out the global rank and
joins them over gloo).

Each node runs in its own working directory and writes to the config's relative paths, as nodes with their
own disks do. Everything is written once, by global rank 0 (node 0): the checkpoint, the HFExport folder, the
config file and the reference log-prob cache; node 1's directory stays empty. The cache holds both ranks'
halves (each rank computes every other batch). The run then resumes from node 0's checkpoint: node 0 finds
its cache, node 1 (no such file on its disk) must not compute the table alone, which would leave the ranks'
collectives out of step.
"""

import os
import shlex
import time
from pathlib import Path

import pytest
import torch
import yaml
from fork_server import free_port
from resume_helpers import start_job_process
from safetensors.torch import load_file
from test_readme import bash_blocks

from lightning_rlhf import PreferenceDataModule
from lightning_rlhf.cli import cli_main
from lightning_rlhf.export import export_checkpoint
from lightning_rlhf.models import load_causal_lm, response_logps
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.task import TaskConfig

CLI = "from lightning_rlhf.cli import cli_main\ncli_main()\n"  # reads sys.argv, as the console script does
REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "dpo" / "testbed.yaml")


def fit_on_two_nodes(nodes: list, testbed, args: list[str], timeout_s: float = 120) -> None:
    """``lightning-rlhf fit`` on 2 simulated nodes (working directories ``nodes``), waiting for both."""
    policy = str(testbed / "init_policy")
    argv = [
        "fit",
        "--config",
        CONFIG,
        "--trainer.num_nodes=2",
        "--trainer.devices=1",
        "--trainer.strategy=ddp",  # gloo on CPU
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_epochs=-1",
        "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=2",
        f"--model.model={policy}",
        f"--data.train_file={testbed / 'pairs_train.jsonl'}",
        f"--data.val_file={testbed / 'pairs_eval.jsonl'}",
        "--data.batch_size=2",
        "--data.max_length=48",
        *args,
    ]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    procs = []
    for node, cwd in enumerate(nodes):
        cwd.mkdir(exist_ok=True)
        log = cwd.parent / f"{cwd.name}.log"  # outside the node's directory, which must stay empty
        procs.append(start_job_process(CLI, argv, {**env, "NODE_RANK": str(node)}, log, cwd=cwd))
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 1))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    codes = [proc.exitcode for proc in procs]
    if codes != [0, 0]:
        logs = "\n".join(f"--- {c.name}:\n{(c.parent / f'{c.name}.log').read_text()[-3000:]}" for c in nodes)
        pytest.fail(f"the nodes exited with {codes} (a hang is killed after {timeout_s} s):\n{logs}")


def files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    sizes = SplitSizes(sft_train=4, sft_eval=2, pairs_train=12, pairs_eval=4, prompts_train=4, prompts_eval=2)
    write_testbed(out, TaskConfig(seed=0), sizes, model_size="nano")
    return out


def test_two_nodes_write_each_file_once_and_resume(testbed, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    checkpoint = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath=ckpt"]
    checkpoint += ["--trainer.callbacks.filename={step}", "--trainer.callbacks.every_n_train_steps=2"]
    fit_on_two_nodes(nodes, testbed, ["--trainer.max_steps=2", *checkpoint])

    assert files(nodes[1]) == []
    written = files(nodes[0])
    cache = sorted(f for f in written if f.startswith("runs/dpo/reference_logps/"))
    assert [c.split("/")[-1].split("-")[0] for c in cache] == ["train", "val"]
    export = sorted(f for f in written if f.startswith("runs/testbed/dpo_policy/"))
    assert "runs/testbed/dpo_policy/model.safetensors" in export
    assert sorted(set(written) - set(cache) - set(export)) == ["ckpt/step=2.ckpt", "runs/dpo/config.yaml"]

    # The cache: every pair's reference log-probs, both ranks' halves (12 pairs in 6 batches, 3 per rank).
    policy = str(testbed / "init_policy")
    data = PreferenceDataModule(
        policy, str(testbed / "pairs_train.jsonl"), batch_size=2, max_length=48, apply_chat_template=False
    )
    data.setup("fit")
    reference = load_causal_lm(policy)
    want = torch.zeros(2, 12)
    with torch.no_grad():
        for batch in data.reference_dataloader():
            logps, _ = response_logps(reference, batch, average=False, shared_prompts=True)
            want[:, batch["index"]] = torch.stack(logps.chunk(2))
    got = torch.load(nodes[0] / cache[0], weights_only=True)
    torch.testing.assert_close(torch.stack([got["chosen"], got["rejected"]]), want)

    # The export holds the checkpoint's trained weights.
    exported = load_file(nodes[0] / "runs/testbed/dpo_policy/model.safetensors")
    from_checkpoint = export_checkpoint(nodes[0] / "ckpt/step=2.ckpt", tmp_path / "from_ckpt")
    for name, value in load_file(from_checkpoint / "model.safetensors").items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)

    # Resumed on both nodes from node 0's checkpoint; node 1 has no cache file on its disk.
    resume = [f"--ckpt_path={nodes[0] / 'ckpt/step=2.ckpt'}", "--trainer.max_steps=4", *checkpoint]
    fit_on_two_nodes(nodes, testbed, resume)
    assert files(nodes[1]) == []
    assert sorted(set(files(nodes[0])) - set(written)) == ["ckpt/step=4.ckpt"]


def test_the_multi_node_commands_in_the_docs_parse(capsys, monkeypatch):
    """docs/deepspeed.md's launch commands (Lightning's launcher, torchrun, SLURM) name flags and config
    files the CLI accepts: each parses, with --print_config, to the nodes and devices it says."""
    docs = (REPO / "docs" / "deepspeed.md").read_text()
    section = docs[docs.index("## Several nodes") : docs.index("## Exact resume on several ranks")]
    commands = [shlex.split(block.replace("\\\n", " "), comments=True) for block in bash_blocks(section)]
    assert len(commands) == 3
    monkeypatch.chdir(REPO)  # the commands name the configs relative to the repository
    monkeypatch.setattr("sys.argv", ["lightning-rlhf"])
    for words in commands:
        args = words[words.index("fit") :]
        with pytest.raises(SystemExit) as exit_info:
            cli_main([*args, "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        assert (printed["trainer"]["num_nodes"], int(printed["trainer"]["devices"])) == (2, 8)
        assert printed["model"]["class_path"] == "lightning_rlhf.PPOModule"

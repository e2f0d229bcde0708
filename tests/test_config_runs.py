"""Every YAML under configs/ runs, not just parses: a fit of a few steps on tiny models, settings as shipped.

tests/config_runs.py holds the only changes made to a file (tiny models and stand-in data for the inputs, CPU
and one device for the hardware, the CPU DeepSpeed strategy for DeepSpeed); a new config is covered as soon
as it is added, and one naming an input the tables do not know fails by name. The configs/deepspeed/
fragments run on top of each GPU stage config; the testbed chain is fit by test_configs.py instead.
"""

import json
from pathlib import Path

import pytest
import yaml
from config_runs import (
    CHAIN,
    DATA_KEYS,
    MODEL_PATHS,
    STEPS,
    TRAINER,
    UnknownInput,
    fit,
    fit_all_in_subprocess,
    swapped,
    workdir_for,
    write_inputs,
    write_swapped,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _name(path: Path) -> str:
    return str(path.relative_to(REPO / "configs"))


def _is_fragment(path: Path) -> bool:
    return path.parent.name == "deepspeed"  # strategy-only files, used as a later --config on a stage config


# configs/deepspeed/ fragments are "for any stage": each runs on top of every stage config written for GPUs.
GPU_STAGES = [
    p
    for p in CONFIGS
    if not _is_fragment(p) and yaml.safe_load(p.read_text()).get("trainer", {}).get("accelerator") == "gpu"
]
# The chain configs are fit by test_configs.py::test_cli_chain_of_testbed_configs (on trained models).
RUNS = [(p,) for p in CONFIGS if not _is_fragment(p) and _name(p) not in CHAIN]
RUNS += [(base, p) for p in CONFIGS if _is_fragment(p) for base in GPU_STAGES]


def _run_id(sources: tuple[Path, ...]) -> str:
    return "+".join(_name(p) for p in sources)


@pytest.fixture(scope="module")
def config_inputs(tmp_path_factory):
    """The tiny models and data every config runs on, written once (copied into each working folder)."""
    root = tmp_path_factory.mktemp("config_inputs")
    write_inputs(root)
    return root


@pytest.fixture(scope="module")
def deepspeed_records(request, config_inputs, tmp_path_factory):
    """The selected configs that run under DeepSpeed, fitted in two subprocesses side by side.

    Subprocesses keep DeepSpeed out of pytest and pay its imports and process group once each; each fit
    has its own working folder and record, and a failing one does not stop the others.
    """
    pytest.importorskip("deepspeed")
    selected = [
        item.callspec.params["sources"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_config_runs" and hasattr(item, "callspec")
    ]
    out = tmp_path_factory.mktemp("deepspeed_configs")
    jobs = {}
    for i, sources in enumerate(selected):
        workdir = workdir_for(config_inputs, out / str(i))
        files, deepspeed = write_swapped(list(sources), workdir, _run_id(sources))
        if deepspeed:
            record = str(workdir / "record.json")
            jobs[sources] = {"workdir": str(workdir), "files": [str(f) for f in files], "record": record}
    fit_all_in_subprocess(list(jobs.values()), out, timeout_s=900)
    log = (out / "fit_all.log").read_text()[-3000:]
    records = {}
    for sources, job in jobs.items():
        record = Path(job["record"])
        missing = {"error": f"the subprocess left no record; its log ends:\n{log}"}
        records[sources] = json.loads(record.read_text()) if record.is_file() else missing
    return records


def test_every_config_is_fit_here_or_in_the_chain():
    fitted = {_name(p) for sources in RUNS for p in sources} | set(CHAIN)
    assert fitted == {_name(p) for p in CONFIGS}
    assert GPU_STAGES, "no stage config for the configs/deepspeed/ fragments to run on"


@pytest.mark.parametrize("sources", RUNS, ids=_run_id)
def test_config_runs(sources, config_inputs, request, tmp_path, monkeypatch):
    """Each YAML (a fragment: after a stage config) is fit for STEPS optimizer steps; the DeepSpeed ones in
    deepspeed_records' subprocess."""
    workdir = workdir_for(config_inputs, tmp_path)
    files, deepspeed = write_swapped(list(sources), workdir, _run_id(sources))
    if deepspeed:
        record = request.getfixturevalue("deepspeed_records")[sources]
    else:
        monkeypatch.chdir(workdir)
        record = {"global_step": fit(files)}
    assert "error" not in record, record["error"]
    assert record["global_step"] >= STEPS  # PPO-style modules take a whole rollout's updates in one step


def _changed_keys(a, b, prefix: str = "") -> set[str]:
    """Dotted paths of the leaves that differ between two parsed YAMLs (added or removed ones too)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {
            k for key in set(a) | set(b) for k in _changed_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        }
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return {k for i, (x, y) in pairs for k in _changed_keys(x, y, f"{prefix}{i}.")}
    return set() if a == b else {prefix.rstrip(".")}


def test_only_inputs_and_hardware_are_swapped(config_inputs, tmp_path):
    """What test_config_runs changes in a YAML: model paths and data files, the TRAINER keys, a DeepSpeed
    strategy's class (its stage and offload settings kept) and an every-N-batches val_check_interval."""
    trainer = {
        f"trainer.{key}" for key in (*TRAINER, "val_check_interval", "strategy", "strategy.class_path")
    }
    for path in CONFIGS:
        workdir = workdir_for(config_inputs, tmp_path / _name(path).replace("/", "_"))
        original = yaml.safe_load(path.read_text())
        run = swapped(original, _name(path), workdir)
        changed = _changed_keys(original, run) - trainer
        assert {k for k in changed if k.rsplit(".", 1)[-1] not in (*MODEL_PATHS, *DATA_KEYS)} == set(), path
        strategy = original.get("trainer", {}).get("strategy")
        if isinstance(strategy, dict):
            assert run["trainer"]["strategy"]["init_args"] == strategy["init_args"], path


def test_an_unknown_model_key_or_dataset_fails_by_name(tmp_path):
    """A config naming an input that tests/config_runs.py has no stand-in for fails there, by name, instead of
    reaching for the hub."""
    judge = {"model": {"class_path": "x", "init_args": {"judge_model": "org/judge"}}}
    with pytest.raises(
        UnknownInput, match=r"new.yaml: model.init_args.judge_model = 'org/judge'.*MODEL_PATHS"
    ):
        swapped(judge, "new.yaml", tmp_path)
    data = {"data": {"class_path": "x", "init_args": {"train_file": "org/new-set"}}}
    with pytest.raises(UnknownInput, match=r"data.init_args.train_file = 'org/new-set'.*DATA_FILES"):
        swapped(data, "new.yaml", tmp_path)

"""Side-by-side benchmarks against TRL; writes benchmarks/RESULTS.md.

    python benchmarks/run.py            # full run (see RESULTS.md for its duration)
    python benchmarks/run.py --quick    # fewer pairs and steps
    python benchmarks/run.py --smoke    # seconds; what the test suite runs (numbers meaningless)
    python benchmarks/run.py --grpo-only --base-json benchmarks/results_full.json --json ...
                                        # only the GRPO comparison, merged into an earlier run's numbers

Needs the ``benchmarks`` extra (``pip install -e ".[benchmarks]"``: TRL 1.16, psutil). The PPO comparison
needs TRL 1.12 (the last release with PPO), which cannot share an environment with 1.16: it runs from its own
virtual environment, created under ``--work`` on first use (``--trl112-python`` points at an existing one,
``--skip-trl-ppo`` leaves it out). Every measurement runs in its own subprocess (peak RSS per side), the
sides are interleaved and their order alternates between repeats, and ratios are taken within a repeat, so
load from other processes on a shared machine hits both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import CONFIGS, write_fixtures  # noqa: E402
from benchmarks.grpo import AGGREGATIONS  # noqa: E402
from benchmarks.report import write_report  # noqa: E402


def run_worker(python: str, script: Path, args: list[str], *, timeout: float) -> dict:
    cmd = [python, str(script), *args]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"worker failed: {shlex.join(cmd)}\n{tail}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["process_seconds"] = time.perf_counter() - start
    return result


def ensure_trl112(work: Path, given: str | None) -> tuple[str | None, str]:
    """Python of a TRL 1.12 environment (created under ``work`` on first use), or None and the reason."""
    if given:
        return given, "given with --trl112-python"
    venv = work / "venv-trl112"
    python = venv / "bin" / "python"
    if not python.exists():
        torch_version = md.version("torch").split("+")[0]
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", f"torch=={torch_version}", "trl==1.12.*", "psutil"],
        ]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True)
            if proc.returncode != 0:
                return (
                    None,
                    f"could not build the TRL 1.12 environment ({shlex.join(step)}): {proc.stderr[-800:]}",
                )
    return str(python), f"virtual environment {venv}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer pairs and PPO steps")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, for tests (numbers mean nothing)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3, 2, 1)")
    parser.add_argument(
        "--ablation-repeats",
        type=int,
        default=None,
        help="repeats of the before/after runs (default: as --repeats)",
    )
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"), help="report file (Markdown)")
    parser.add_argument("--json", default=None, help="also write the raw measurements here")
    parser.add_argument("--work", default="/tmp/lightning_rlhf_bench", help="fixtures, caches, venvs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = default)")
    parser.add_argument("--trl112-python", default=None, help="python of an environment with trl==1.12")
    parser.add_argument("--skip-trl-ppo", action="store_true", help="leave out the TRL 1.12 PPO side")
    parser.add_argument("--no-trl", action="store_true", help="only our side (when trl is not installed)")
    parser.add_argument("--from-json", default=None, help="only rewrite the report from a --json file")
    parser.add_argument(
        "--grpo-only",
        action="store_true",
        help="run only the GRPO comparison; the other sections come from --base-json",
    )
    parser.add_argument("--base-json", default=None, help="with --grpo-only: the raw measurements to keep")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run workers in this process (for tests: fast, but peak RSS means nothing)",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        write_report(json.loads(Path(args.from_json).read_text()), Path(args.out))
        return
    if args.grpo_only and not args.base_json:
        parser.error("--grpo-only needs --base-json (the run whose other sections the report keeps)")

    started = time.perf_counter()
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = CONFIGS[name]
    repeats = args.repeats or {"full": 3, "quick": 2, "smoke": 1}[name]
    work = Path(args.work) / name
    meta = write_fixtures(cfg, work / "fixtures")
    meta_file = str(work / "fixtures" / "fixtures.json")
    timeout = 3600
    workers = HERE / "workers.py"

    def ours(task: str, *extra: str, **kw) -> dict:
        scratch = str(work / "scratch" / f"{task}{''.join(extra)}".replace("-", "_"))
        common = ["--meta", meta_file, "--work", scratch, "--threads", str(args.threads)]
        print(f"[bench] {task} {' '.join(extra)}", flush=True)
        if args.in_process:
            from benchmarks import workers as in_process

            return in_process.run([task, *common, *extra])
        return run_worker(sys.executable, workers, [task, *common, *extra], timeout=timeout)

    use_trl = not args.no_trl
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.grpo_only:
        results = json.loads(Path(args.base_json).read_text())
        earlier = results.get("grpo")
        results["grpo"] = grpo_section(ours, args, meta, use_trl, repeats, command)
        if earlier:  # a rerun (e.g. on a noisy machine) keeps the runs before it, for the record
            previous = earlier.pop("earlier", [])
            keep = ("command", "runs", "load_average_before", "load_average_after", "threads", "repeats")
            results["grpo"]["earlier"] = [*previous, {k: earlier[k] for k in keep}]
        finish(results, args)
        return
    results: dict = {
        "config": meta["config"],
        "meta": {k: meta[k] for k in ("vocab_size", "policy_parameters")},
    }

    # 1. Same numbers at step 1 (deterministic: the first batch in file order, initial weights).
    checks = {}
    for what in ("dpo", "rm"):
        checks[what] = {"ours": ours(f"ours_{what}_check")}
        if use_trl:
            checks[what]["trl"] = ours(f"trl_{what}_check")
    results["checks"] = checks

    # 2. Training throughput, interleaved; order flips every repeat.
    sides = [("ours_dpo", ()), ("ours_dpo_cached", ("--cached",)), ("ours_rm", ())]
    if use_trl:
        sides += [("trl_dpo", ()), ("trl_rm", ())]
    runs: dict[str, list[dict]] = {label: [] for label, _ in sides}
    for r in range(repeats):
        for label, extra in sides if r % 2 == 0 else list(reversed(sides)):
            task = label.replace("_cached", "")
            runs[label].append(ours(task, *extra))
    results["train"] = runs

    # 3. Optimisations, before (the code as it was, or the option off) and after, interleaved likewise.
    ablations = [
        ("dpo_full_logits", "ours_dpo", ("--full-logits",)),
        ("dpo_no_shared_prompts", "ours_dpo", ("--no-shared-prompts",)),
        ("dpo_no_grouping", "ours_dpo", ("--no-grouping",)),
        ("rm_no_grouping", "ours_rm", ("--no-grouping",)),
        ("dpo_looped_adamw", "ours_dpo", ("--looped-adamw",)),
        ("ppo_looped_adamw", "ours_ppo", ("--looped-adamw",)),
        ("ppo_no_trim", "ours_ppo", ("--no-trim",)),
        # Options (before = as shipped, after = the option on): they trade time for memory.
        ("dpo_head_recompute", "ours_dpo", ("--head-recompute",)),
        ("dpo_gradient_checkpointing", "ours_dpo", ("--gradient-checkpointing",)),
    ]
    if args.smoke:  # the test suite: one of each kind of before/after run is enough to keep them working
        kinds = ("dpo_full_logits", "dpo_looped_adamw", "ppo_no_trim", "dpo_head_recompute")
        ablations = [a for a in ablations if a[0] in kinds]
    results["ablations"] = {label: [] for label, _, _ in ablations}
    # Each before-run is paired with an after-run of the shipped code right next to it (order alternating),
    # so a change in the machine's load between phases cannot pass for a speed-up.
    results["ablation_bases"] = {label: [] for label, _, _ in ablations}
    ablation_repeats = args.ablation_repeats or repeats
    for r in range(ablation_repeats):
        for label, task, extra in ablations:
            pair = [("before", extra), ("after", ())] if r % 2 == 0 else [("after", ()), ("before", extra)]
            for which, flags in pair:
                run_ = ours(task, *flags)
                (results["ablations"] if which == "before" else results["ablation_bases"])[label].append(run_)

    # 4. PPO, ours (as shipped, and with TRL's way of taking the old log-probs) vs TRL 1.12 (own venv).
    results["ppo"] = {"ours": [], "ours_sampling": [], "trl": []}
    trl_python, how = (
        (None, "skipped (--skip-trl-ppo)")
        if args.skip_trl_ppo or not use_trl
        else (ensure_trl112(Path(args.work), args.trl112_python))
    )
    results["ppo"]["trl_env"] = how
    for _ in range(repeats):
        results["ppo"]["ours"].append(ours("ours_ppo"))
        results["ppo"]["ours_sampling"].append(ours("ours_ppo", "--old-logprobs", "sampling"))
        if trl_python:
            print("[bench] trl 1.12 ppo", flush=True)
            scratch = str(work / "scratch" / "trl_ppo")
            try:
                results["ppo"]["trl"].append(
                    run_worker(
                        trl_python,
                        HERE / "trl_ppo_worker.py",
                        ["--meta", meta_file, "--work", scratch, "--threads", str(args.threads)],
                        timeout=timeout,
                    )
                )
            except RuntimeError as err:
                results["ppo"]["trl_error"] = str(err)[-1500:]
                trl_python = None

    # 5. Generation overhead, scaling, and the machine's float32 matmul peak (the PPO roofline).
    results["matmul_peak"] = ours("matmul_peak")
    results["generation"] = ours("generation", "--repeats", str(max(3, repeats * 2)))
    results["scaling"] = ours("scaling", "--repeats", str(repeats))

    # 6. Profiles of the DPO step, ours and TRL, for the record of where time goes.
    results["profiles"] = {"ours_dpo": ours("ours_dpo", "--profile")}
    if use_trl:
        results["profiles"]["trl_dpo"] = ours("trl_dpo", "--profile")
    if not args.smoke:
        results["profiles"]["ours_ppo"] = ours("ours_ppo", "--profile")
    # ... and of what the DPO peak RSS is made of.
    results["memory"] = {"ours_dpo": ours("ours_dpo", "--memory-profile")}
    if use_trl:
        results["memory"]["trl_dpo"] = ours("trl_dpo", "--memory-profile")

    # 7. GRPO, ours vs TRL 1.16's GRPOTrainer (benchmarks/grpo.py).
    results["grpo"] = grpo_section(ours, args, meta, use_trl, repeats, command)

    results["environment"] = environment(trl_python)
    results["command"] = command
    results["seconds"] = time.perf_counter() - started
    results["repeats"] = repeats
    finish(results, args)


def finish(results: dict, args) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    write_report(results, Path(args.out))
    print(f"[bench] wrote {args.out}", flush=True)


def grpo_section(ours, args, meta: dict, use_trl: bool, repeats: int, command: str) -> dict:
    """Step-1 parity for each loss aggregation, then ours (as shipped, and with the old log-probs from the
    sampling logits) and TRL interleaved, order flipping every repeat; the machine's load around it."""
    started, load_before = time.perf_counter(), os.getloadavg()
    checks = {}
    # The smoke run (the test suite) checks one; tests/test_benchmarks.py compares all three with TRL.
    for aggregation in ["token_mean"] if args.smoke else AGGREGATIONS:
        flags = ("--check", "--aggregation", aggregation)
        checks[aggregation] = {"ours": ours("ours_grpo", *flags)}
        if use_trl:
            checks[aggregation]["trl"] = ours("trl_grpo", *flags)
    sides = [("ours", "ours_grpo", ()), ("ours_sampling", "ours_grpo", ("--old-logprobs", "sampling"))]
    if use_trl:
        sides.append(("trl", "trl_grpo", ()))
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in sides}
    for r in range(repeats):
        for label, task, extra in sides if r % 2 == 0 else list(reversed(sides)):
            runs[label].append(ours(task, *extra))
    memory = {label: ours(task, "--memory-profile") for label, task, extra in sides if not extra}
    profiles = {}
    if not args.smoke:  # torch.profiler's top operators of one run each, for the record of where time goes
        profiles = {
            label: ours(task, *extra, "--profile") for label, task, extra in sides if label != "ours_sampling"
        }
    return {
        "shape": meta["config"]["grpo"],
        "checks": checks,
        "runs": runs,
        "profiles": profiles,
        "memory": memory,
        "fixtures": {k: meta["grpo"][k] for k in ("vocab_size", "policy_parameters")},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "threads": args.threads,
        "repeats": repeats,
        "command": command,
        "seconds": time.perf_counter() - started,
        "versions": {
            name: _version(name) for name in ("torch", "transformers", "lightning", "trl", "accelerate")
        },
    }


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def environment(trl112_python: str | None) -> dict:
    version = _version
    env = {
        "load_average_at_end": os.getloadavg(),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.platform()}",
        "cpu": _cpu_name(),
        **{name: version(name) for name in ("torch", "transformers", "lightning", "trl", "accelerate")},
    }
    if trl112_python:
        out = subprocess.run(
            [
                trl112_python,
                "-c",
                "import trl, transformers; print(trl.__version__, transformers.__version__)",
            ],
            capture_output=True,
            text=True,
        )
        env["trl_ppo_env"] = out.stdout.strip() or out.stderr[-300:]
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()

"""The GRPO section of benchmarks/RESULTS.md (measurements: ``run.grpo_section``, workers: ``grpo.py``)."""

from __future__ import annotations

import statistics

from benchmarks.grpo import AGGREGATIONS
from benchmarks.report import (
    _ratios,
    _verdict,
    memory_report,
    parity_row,
    spread,
    steady_step_seconds,
)

SIDES = (
    ("ours", "ours as shipped (old log-probs from a policy forward)"),
    ("ours_sampling", 'ours, old log-probs from the sampling logits (`old_logprobs="sampling"`)'),
    ("trl", "TRL 1.16 `GRPOTrainer`"),
)
PHASES = ("generation", "scoring", "inference", "update")


def step_seconds(run: dict, cpu: bool = False) -> float:
    """Mean end-to-end seconds of the steps after the first: ours from one step's end to the next (loader
    and loop included), TRL from one ``on_step_end`` to the next; wall clock or process CPU time."""
    ours = "period_seconds" in run["steps"][0]
    key = (
        ("period_cpu_seconds" if cpu else "period_seconds") if ours else ("cpu_seconds" if cpu else "seconds")
    )
    return steady_step_seconds(run, key)


def ratio_rows(results: dict) -> list[tuple]:
    """GRPO rows of the report's table of ratios against the targets (see ``report.write_report``)."""
    runs = (results.get("grpo") or {}).get("runs") or {}
    if not runs.get("trl"):
        return []
    rows = []
    for label, name in (
        ("ours", "GRPO steps/s, ours as shipped / TRL 1.16 GRPOTrainer"),
        ("ours_sampling", "GRPO steps/s, ours with old log-probs from sampling / TRL 1.16 GRPOTrainer"),
    ):
        rows.append(
            (
                name,
                _ratios(runs["trl"], runs[label], step_seconds),
                _ratios(runs["trl"], runs[label], lambda r: step_seconds(r, cpu=True)),
                1.5,
                True,
            )
        )
    for label, name in (
        ("ours", "GRPO peak RSS, ours as shipped / TRL 1.16 GRPOTrainer"),
        ("ours_sampling", "GRPO peak RSS, ours with old log-probs from sampling / TRL 1.16"),
    ):
        rows.append((name, _ratios(runs[label], runs["trl"], lambda r: r["peak_rss_mb"]), None, 0.8, False))
    return rows


def grpo_report(w, results: dict) -> None:
    grpo = results.get("grpo")
    if not grpo:
        return
    shape, runs = grpo["shape"], grpo["runs"]
    group = shape["prompts"] * shape["generations"]
    before, after = grpo["load_average_before"], grpo["load_average_after"]
    w("## GRPO: ours vs TRL 1.16 `GRPOTrainer`\n")
    w(
        f"Measured by `{grpo['command']}` in {grpo['seconds'] / 60:.1f} min ({grpo['repeats']} interleaved "
        f"repeat(s) per side, order flipping between repeats; torch threads per worker: "
        f"{grpo['threads'] or 'torch default'}); load average (1 min) {before[0]:.1f} before and "
        f"{after[0]:.1f} after, on this machine's CPUs shared with other jobs. Versions: "
        + ", ".join(f"{k} {v}" for k, v in grpo["versions"].items())
        + "."
        + (
            " Run on its own (`--grpo-only`) and merged into the measurements of the run named at the top, "
            "which the other sections are."
            if "--grpo-only" in grpo["command"]
            else ""
        )
        + "\n"
    )
    w(
        f"- model: the word testbed's `{shape['model_size']}` Llama (`lightning-rlhf testbed --model-size "
        f"{shape['model_size']}`), {grpo['fixtures']['policy_parameters'] / 1e6:.1f}M parameters, vocab "
        f"{grpo['fixtures']['vocab_size']}, random initial weights, one folder loaded by both sides; fp32, "
        "CPU."
    )
    w(
        f"- a step: {shape['prompts']} testbed prompts x {shape['generations']} responses (the group) = "
        f"{group} sequences of up to {shape['new_tokens']} new tokens sampled at temperature 1 (no top-k / "
        f"top-p), scored by the testbed's gold reward of the decoded text (one Python object on both sides), "
        f"group-normalised advantages (std + 1e-4), one optimizer step over the rollout in micro-batches of "
        f"{shape['micro']} sequences (TRL: `per_device_train_batch_size={shape['micro']}`, "
        f"`gradient_accumulation_steps={group // shape['micro']}`), clipped ratio (epsilon 0.2), k3 KL to "
        f"the frozen initial policy in the loss with coefficient {shape['beta']} (TRL `beta`, ours `kl_coef` "
        'with `kl_penalty="loss"`), token-mean loss (TRL `loss_type="dapo"`, ours `loss_aggregation='
        '"token_mean"`), AdamW lr 1e-6, grad-norm clip 1.0.'
    )
    w(
        f"- {shape['steps']} steps a run, the first excluded from the means (warm-up); a step is timed end "
        "to end (ours from one training step's end to the next, TRL from one `on_step_end` to the next); "
        "peak RSS is the worker process's `ru_maxrss`. Settings mapping: `benchmarks/grpo.py`.\n"
    )

    w("### Same numbers at step 1\n")
    w(
        "Generation replaced on both sides by the same fixed completions (`completions.json`: testbed "
        "words, half ending with EOS at a random length, half cut at the length limit), one step on one "
        "step's worth of distinct prompts from the initial weights: the loss of that step (ours: the sum "
        "of the weighted micro-batch losses passed to `manual_backward`; TRL: its logged `loss`), the "
        "gradient norm before clipping (TRL: its logged `grad_norm`) and the mean reward. At step 1 the "
        "policy is its own reference and its own old policy, so the ratio is 1 and the KL 0: the loss is "
        "-(aggregated advantage), which for `sequence_mean` / `grpo` is 0 up to rounding (group-centred "
        "advantages); the gradient norm checks the log-probs and the aggregation through the model.\n"
    )
    w("| ours `loss_aggregation` | TRL `loss_type` | quantity | ours | TRL | abs. diff | within 1e-5 |")
    w("|---|---|---|---|---|---|---|")
    for aggregation, pair in grpo["checks"].items():
        if "trl" not in pair:
            continue
        for key in ("loss", "grad_norm", "reward"):
            cells = [aggregation, AGGREGATIONS[aggregation], key]
            w(parity_row(cells, pair["ours"][_check_key(key)], pair["trl"][_check_key(key)], "{:.9g}"))
    w("")

    w("### Throughput and memory\n")
    w("| side | steps/s (wall) | CPU s per step | response tokens/s | peak RSS MB | step-1 loss (sampled) |")
    w("|---|---|---|---|---|---|")
    for label, title in SIDES:
        if not runs.get(label):
            continue
        side = runs[label]
        w(
            f"| {title} | {spread([1 / step_seconds(r) for r in side], '{:.3f}')} | "
            f"{spread([step_seconds(r, cpu=True) for r in side])} | "
            f"{spread([_response_tokens(r) / step_seconds(r) for r in side], '{:.0f}')} | "
            f"{spread([r['peak_rss_mb'] for r in side], '{:.0f}')} | "
            f"{spread([r['loss_step1'] for r in side if r.get('loss_step1') is not None], '{:.4f}')} |"
        )
    w(
        "\nThe step-1 losses of the training runs differ: each side samples its own completions (and draws "
        "its own prompt order); the check above is the like-for-like one.\n"
    )
    rows = ratio_rows(results)
    earlier_runs(w, grpo.get("earlier") or [])
    if rows:
        w("| comparison | wall clock, median [min–max] | CPU time, median [min–max] | target | |")
        w("|---|---|---|---|---|")
        for name, wall, cpu, target, higher in rows:
            w(
                f"| {name} | {spread(wall)} | {spread(cpu) if cpu is not None else '–'} | "
                f"{'≥' if higher else '≤'} {target} | {_verdict(wall, cpu, target, higher=higher)} |"
            )
        w("")

    w("### Per-phase seconds per step\n")
    w(
        "Per-step means (steps after the first): the median over repeats, and the fastest repeat (the "
        "least disturbed by other jobs). Ours: `PPOModule`'s own "
        "timings (generation = `generate`; scoring = decoding + the reward function; inference = the no-grad "
        "forwards, the reference's and, as shipped, the policy's for the old log-probs; update = the "
        "micro-batch forward/backward passes, clipping and the optimizer step), other = the rest of the step "
        "(advantages, logging, the loop). TRL: its `_generate` (tokenising, `generate`, decoding), "
        "`_calculate_rewards`, its no-grad `_get_per_token_logps_and_entropies` calls (the reference's), and "
        "the rest of the step as update (so its update includes what ours counts as other).\n"
    )
    w(
        "| side | repeats | generation | scoring | inference (old / ref log-probs) | update | other "
        "| whole step | CPU s |"
    )
    w("|---|---|---|---|---|---|---|---|---|")
    for label, title in SIDES:
        if not runs.get(label):
            continue
        # The median over repeats, and the least disturbed repeat (the fastest: the machine is shared).
        fastest = min(runs[label], key=step_seconds)
        for which, chosen in (("median", runs[label]), ("fastest", [fastest])):
            phases = {key: statistics.median(steady_step_seconds(r, key) for r in chosen) for key in PHASES}
            whole = statistics.median(step_seconds(r) for r in chosen)
            cpu = statistics.median(step_seconds(r, cpu=True) for r in chosen)
            other = None
            if label != "trl":  # each run's remainder, then the median
                rest = [step_seconds(r) - sum(steady_step_seconds(r, k) for k in PHASES) for r in chosen]
                other = statistics.median(rest)
            w(
                f"| {title} | {which} | "
                + " | ".join(f"{phases[key]:.2f}" for key in PHASES)
                + f" | {'–' if other is None else f'{other:.2f}'} | {whole:.2f} | {cpu:.2f} |"
            )
    w("")
    gap_note(w, runs)
    memory_report(w, grpo.get("memory") or {}, "GRPO", ("ours", "trl"), "###")
    where_time_goes(w, grpo)
    for label, run in (grpo.get("profiles") or {}).items():
        if run.get("profile"):
            w(f"#### torch.profiler, {label} (top operators by self CPU time, one run)\n")
            w(f"```\n{run['profile']}\n```\n")


def earlier_runs(w, earlier: list[dict]) -> None:
    """One line per earlier run of the comparison that this one repeated (same fixtures and settings)."""
    if not earlier:
        return
    w("Earlier runs of the same comparison, repeated because the machine was noisy (medians [min–max]):\n")
    for old in earlier:
        rows = ratio_rows({"grpo": old})
        sides = zip(("as shipped", "old log-probs from sampling"), rows[:2], strict=False)
        cells = [f"{side}: wall {spread(row[1])}, CPU {spread(row[2])}" for side, row in sides]
        before, after = old["load_average_before"][0], old["load_average_after"][0]
        w(
            f"- `{old['command']}` ({old['repeats']} repeats, load average {before:.1f} before, {after:.1f} "
            f"after): steps/s ours / TRL, {'; '.join(cells)}; peak RSS ours as shipped / TRL "
            f"{spread(rows[2][1]) if len(rows) > 2 else 'n/a'}."
        )
    w("")


def gap_note(w, runs: dict) -> None:
    """Where the step times of ours (as shipped) and TRL differ, phase by phase (medians)."""
    if not runs.get("trl") or not runs.get("ours"):
        return

    def median(label: str, key: str) -> float:
        return statistics.median(steady_step_seconds(r, key) for r in runs[label])

    diffs = {key: median("trl", key) - median("ours", key) for key in PHASES}
    ours_whole = statistics.median(step_seconds(r) for r in runs["ours"])
    trl_whole = statistics.median(step_seconds(r) for r in runs["trl"])
    w(
        f"TRL minus ours (as shipped), seconds per step: whole step {trl_whole - ours_whole:+.2f} "
        f"({trl_whole:.2f} vs {ours_whole:.2f}); "
        + ", ".join(f"{key} {value:+.2f}" for key, value in diffs.items())
        + " (TRL's update includes what ours counts as other). "
        f"A 1.5x steps/s would need our step at {trl_whole / 1.5:.2f} s.\n"
    )


def where_time_goes(w, grpo: dict) -> None:
    """The reading of the tables above: where the time and the memory go, and what the targets would take."""
    runs, memory = grpo["runs"], grpo.get("memory") or {}
    if not all(runs.get(label) for label in ("ours", "ours_sampling", "trl")):
        return
    fast = {label: min(runs[label], key=step_seconds) for label in ("ours", "ours_sampling", "trl")}

    def phase(label: str, key: str) -> float:
        return steady_step_seconds(fast[label], key)

    def cpu(label: str) -> float:
        return statistics.median(step_seconds(r, cpu=True) for r in runs[label])

    whole = {label: step_seconds(run) for label, run in fast.items()}
    steps = [s for r in runs["ours"] for s in r["steps"]]
    prompt, new = sum(s["tokens"] for s in steps) / sum(s["rows"] for s in steps), grpo["shape"]["new_tokens"]
    other = whole["ours"] - sum(phase("ours", key) for key in PHASES)
    w("### Where the time and the memory go\n")
    w(
        "In the least disturbed repeat of each side (the fastest rows above) generation takes "
        f"{phase('ours', 'generation'):.2f} s (ours) and {phase('trl', 'generation'):.2f} s (TRL): both call "
        "the same `generate` on the same model and rows. The update takes "
        f"{phase('ours', 'update'):.2f} s and {phase('trl', 'update'):.2f} s (TRL's with its loop and "
        "logging): the same micro-batch forward and backward passes. What our loop adds around the model "
        f"(other) is {other:.2f} s. The torch.profiler tables below agree operator for operator. The one "
        "difference in work is the old log-probs: as shipped ours runs one more policy forward over the "
        f"rollout for them (inference {phase('ours', 'inference'):.2f} s against TRL's "
        f"{phase('trl', 'inference'):.2f} s, the reference's forward alone). With one update per rollout "
        "(`steps_per_generation` = accumulation steps, `num_iterations=1`) TRL takes the update's own "
        "log-probs, detached, as the old ones (the ratio is 1 by construction) and runs no such forward; "
        '`old_logprobs="sampling"` reads them from the sampling logits instead (a log-softmax per decoded '
        f"token, inside generation). CPU seconds per step (medians): ours as shipped {cpu('ours'):.2f}, ours "
        f"with sampled old log-probs {cpu('ours_sampling'):.2f}, TRL {cpu('trl'):.2f}.\n"
    )
    w(
        f"A 1.5x step would be {whole['trl'] / 1.5:.2f} s, {whole['trl'] - whole['trl'] / 1.5:.2f} s below "
        "TRL's fastest: it cannot come from the loop around the model, which is already near zero, only from "
        "less work in the model than TRL does. Candidates, none of them in this change: skip the "
        "old-log-prob forward when a rollout gets exactly one update, as TRL does (the difference between "
        "our two rows); a preallocated KV cache for generation (`aten::cat` is the second operator in both "
        "profiles, and most of it is the dynamic KV cache growing by one token a step: measured once in "
        "this session outside the harness, the same 64-row, 64-token `generate` under torch.profiler spent "
        "45 % of its CPU time in `aten::cat` and took 2.15 s, and 1.42 s with "
        '`cache_implementation="static"`, which TRL users can set as well); one forward of each prompt '
        f"for its whole group (the prompts here are about {prompt:.0f} of up to {prompt + new:.0f} tokens, "
        "so little); or a leaner decoding loop than `generate` "
        "for models this small.\n"
    )
    if {"ours", "trl"} <= memory.keys() and memory["ours"].get("memory") and memory["trl"].get("memory"):
        ours, trl = memory["ours"]["memory"], memory["trl"]["memory"]
        w(
            f"Peak RSS: at its peak ours has less memory in use by malloc than TRL "
            f"({ours['malloc_in_use_mb']:.0f} against {trl['malloc_in_use_mb']:.0f} MB: tensors) but more "
            f"free inside the heap ({ours['heap_free_mb']:.0f} against {trl['heap_free_mb']:.0f} MB) and "
            f"more of the rest ({ours['rest_mb']:.0f} against {trl['rest_mb']:.0f} MB: the imported "
            "libraries; Lightning, `torch._dynamo` and torchmetrics, see the DPO breakdown above). 0.8x "
            f"TRL would be {0.8 * trl['rss_mb']:.0f} MB, {ours['rss_mb'] - 0.8 * trl['rss_mb']:.0f} MB "
            "below ours.\n"
        )
    w(
        "Settings that differ from a side's defaults, the same on both: TRL's default `beta` is 0, which "
        "loads no reference model and runs no reference forward; ours always holds and runs a reference "
        "(it measures the KL even at `kl_coef: 0`), so both run it here (beta 0.04, the same objective). "
        "One torch thread per worker: with torch's default of two on these two cores, shared with other "
        "jobs, the two OpenMP threads wait for each other and the times lose their meaning (in this "
        "session the same 64-row, 64-token `generate` took 12-42 s with two threads and 2.3-3.5 s with one, "
        "at a load average of about 6).\n"
    )


def _check_key(key: str) -> str:
    return {"loss": "loss_step1", "grad_norm": "grad_norm_step1", "reward": "reward_step1"}[key]


def _response_tokens(run: dict) -> float:
    steps = run["steps"][1:] if len(run["steps"]) > 1 else run["steps"]
    return statistics.mean(s["response_tokens"] for s in steps)

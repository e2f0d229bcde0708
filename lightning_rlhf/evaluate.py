"""``lightning-rlhf evaluate``: sample k responses per prompt from one or more policies and compare them.

Each policy answers every prompt ``num_samples`` times (same seed for every policy); the responses are
scored by any of a reward model, named reward functions (row-aware: ``f(prompts, responses, **columns)``
with the prompt file's other columns) or a test-case reward such as ``CodeExecutionReward``. The report
holds, per policy: the mean of each score, the win rate against the first policy under one scorer (paired
by prompt and sample, ties 1/2), pass@k for a list of k (a response passes when its score reaches
``pass_threshold``), the EOS rate and the mean response length. It is printed as a markdown table and
written as ``evaluation.json`` and ``evaluation.md``.

This is the command to compare, say, a DPO and a PPO model on your own prompts::

    lightning-rlhf evaluate --policies [runs/dpo, runs/ppo] --prompts data/eval.jsonl \\
        --reward_model runs/rm --num_samples 4 --out runs/eval
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_rlhf.data.prompts import PromptDataModule
from lightning_rlhf.metrics import Submission, mean_pass_at_k, n_at_k, win_rate
from lightning_rlhf.models import load_causal_lm, load_reward_model, load_tokenizer
from lightning_rlhf.rewards.calling import call_reward_function, repeat_columns, select_columns
from lightning_rlhf.rollout.generation import SamplingConfig, generate_texts
from lightning_rlhf.rollout.scoring import score_texts
from lightning_rlhf.rollout.vllm_engine import VLLMEngine, VLLMSettings
from lightning_rlhf.validation import ConfigError

RM_SCORER = "reward_model"


@dataclass
class PolicySamples:
    """A policy's responses (prompt-major: prompt i's samples at ``i * k .. i * k + k - 1``) and scores."""

    name: str
    responses: list[str]
    ended: list[bool]
    lengths: list[int]
    scores: dict[str, list[float]] = field(default_factory=dict)
    submissions: list[Submission] | None = None  # for n@k, from a reward function's ``submissions``


def summarize(
    samples: Sequence[PolicySamples],
    *,
    num_samples: int,
    pass_k: Sequence[int] = (),
    pass_scorer: str | None = None,
    pass_threshold: float | None = None,
    win_scorer: str | None = None,
    n_at_k_pairs: Sequence[tuple[int, int]] = (),
) -> list[dict[str, float | str]]:
    """One row per policy: ``score/<scorer>``, ``win_rate`` (vs the first policy), ``pass@k``, ``n@k``,
    ``eos_rate``, ``response_tokens``. Pure: the numbers come only from ``samples``."""
    rows = []
    for policy in samples:
        row: dict[str, float | str] = {"policy": policy.name}
        for scorer, values in policy.scores.items():
            row[f"score/{scorer}"] = sum(values) / len(values)
        if win_scorer is not None:
            row[f"win_rate/{win_scorer}"] = win_rate(policy.scores[win_scorer], samples[0].scores[win_scorer])
        if pass_k:
            values = policy.scores[pass_scorer]
            correct = [
                sum(v >= pass_threshold for v in values[i : i + num_samples])
                for i in range(0, len(values), num_samples)
            ]
            for k in pass_k:
                row[f"pass@{k}"] = mean_pass_at_k([num_samples] * len(correct), correct, k)
        if n_at_k_pairs:
            subs = policy.submissions or []
            problems = [subs[i : i + num_samples] for i in range(0, len(subs), num_samples)]
            for n, k in n_at_k_pairs:
                row[f"{n}@{k}"] = n_at_k(problems, n, k)
        row["eos_rate"] = sum(policy.ended) / len(policy.ended)
        row["response_tokens"] = sum(policy.lengths) / len(policy.lengths)
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, float | str]]) -> str:
    """The summary as a markdown table, numbers to 4 decimals."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _check_settings(
    policies: Sequence[str],
    scorers: Sequence[str],
    num_samples: int,
    pass_k: Sequence[int],
    pass_scorer: str | None,
    pass_threshold: float | None,
    win_scorer: str | None,
) -> tuple[str | None, str | None]:
    """Validate the flags against each other; return the (pass, win) scorers, defaults filled in."""
    if not policies:
        raise ConfigError("evaluate: give at least one policy (--policies)")
    if not scorers:
        raise ConfigError("evaluate: give a scorer: --reward_model and/or --reward_functions")
    if RM_SCORER in scorers[1:]:
        raise ConfigError(
            f"evaluate: {RM_SCORER!r} names the reward model; pick another reward_functions key"
        )
    if num_samples < 1:
        raise ConfigError(f"evaluate: num_samples must be >= 1 (got {num_samples})")
    bad_k = [k for k in pass_k if not 1 <= k <= num_samples]
    if bad_k:
        raise ConfigError(
            f"evaluate: pass_k {bad_k[0]} needs 1 <= k <= num_samples ({num_samples}); raise num_samples"
        )
    win_scorer = win_scorer or scorers[0]
    pass_scorer = (pass_scorer or scorers[-1]) if pass_k else None
    for flag, name in (("win_scorer", win_scorer), ("pass_scorer", pass_scorer)):
        if name is not None and name not in scorers:
            raise ConfigError(f"evaluate: {flag} {name!r} is not a scorer (scorers: {list(scorers)})")
    if pass_k and pass_threshold is None:
        raise ConfigError(
            "evaluate: pass_k needs pass_threshold, the score at which a response counts as correct "
            "(e.g. 10 for CodeExecutionReward's default pass_score)"
        )
    return pass_scorer, win_scorer


def evaluate(
    policies: Sequence[str],
    prompts: str,
    *,
    reward_model: str | None = None,
    reward_functions: Mapping[str, Callable[..., Any]] | None = None,
    num_samples: int = 1,
    pass_k: Sequence[int] = (),
    pass_scorer: str | None = None,
    pass_threshold: float | None = None,
    win_scorer: str | None = None,
    n_at_k: Sequence[str] = (),
    submission_scorer: str | None = None,
    sampling: SamplingConfig | None = None,
    prompt_field: str = "prompt",
    columns: list[str] | None = None,
    max_prompt_length: int = 256,
    apply_chat_template: bool | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    vllm: VLLMSettings | None = None,
) -> tuple[list[dict[str, float | str]], list[PolicySamples], list[str]]:
    """Sample, score and summarize; returns (summary rows, per-policy samples, the prompts as rendered).

    ``pass_scorer`` defaults to the last reward function (else the reward model), ``win_scorer`` to the
    reward model (else the first reward function). With ``sampling.generation_engine == "vllm"`` each policy
    samples through a vLLM engine built from its folder with the ``vllm`` settings.
    """
    functions = dict(reward_functions or {})
    scorers = ([RM_SCORER] if reward_model else []) + list(functions)
    pass_scorer, win_scorer = _check_settings(
        policies, scorers, num_samples, pass_k, pass_scorer, pass_threshold, win_scorer
    )
    n_at_k_pairs = parse_n_at_k(n_at_k, num_samples)
    submitter = None
    if n_at_k_pairs:
        submission_scorer = _submission_scorer(functions, submission_scorer)
        submitter = functions[submission_scorer].submissions
    sampling = sampling or SamplingConfig()
    rm = load_reward_model(reward_model) if reward_model else None
    rm_tokenizer = load_tokenizer(reward_model) if reward_model else None
    results: list[PolicySamples] = []
    rendered: list[str] = []
    for path in policies:
        data = PromptDataModule(
            path,
            prompts,
            prompt_field=prompt_field,
            columns=columns,
            max_prompt_length=max_prompt_length,
            apply_chat_template=apply_chat_template,
            batch_size=batch_size,
            drop_last=False,
        )
        data.setup("validate")
        rows = data.datasets["train"]
        texts = [r["prompt"] for r in rows for _ in range(num_samples)]
        row_columns = repeat_columns(
            {n: [r["columns"][n] for r in rows] for n in rows[0]["columns"]}, num_samples
        )
        if sampling.generation_engine == "vllm":
            # An engine per policy, built from its folder (vLLM batches all prompts in one call itself).
            engine = VLLMEngine(path, vllm)
            out = engine.generate_texts(data.tokenizer, texts, sampling, seed=seed)
            del engine
        else:
            model = load_causal_lm(path)
            label = f"sampling {path} ({len(rows)} prompts x {num_samples})" if progress else None
            out = generate_texts(
                model, data.tokenizer, texts, sampling, batch_size=batch_size, seed=seed, progress=label
            )
            del model
        result = PolicySamples(name=path, responses=out.texts, ended=out.ended, lengths=out.lengths)
        if rm is not None:
            result.scores[RM_SCORER] = score_texts(rm, rm_tokenizer, texts, out.texts).tolist()
        for name, fn in functions.items():
            values = call_reward_function(fn, texts, out.texts, row_columns, f"reward_functions[{name!r}]")
            result.scores[name] = values.tolist()
        if submitter is not None:
            what = f"reward_functions[{submission_scorer!r}].submissions"
            result.submissions = list(
                submitter(texts, out.texts, **select_columns(submitter, row_columns, what))
            )
        results.append(result)
        rendered = rendered or texts[::num_samples]
    summary = summarize(
        results,
        num_samples=num_samples,
        pass_k=pass_k,
        pass_scorer=pass_scorer,
        pass_threshold=pass_threshold,
        win_scorer=win_scorer,
        n_at_k_pairs=n_at_k_pairs,
    )
    return summary, results, rendered


def parse_n_at_k(values: Sequence[str], num_samples: int) -> list[tuple[int, int]]:
    """``["10@64", ...]`` -> ``[(10, 64), ...]``, each with 1 <= n <= k <= num_samples."""
    pairs = []
    for value in values:
        n_text, _, k_text = str(value).partition("@")
        if not (n_text.isdigit() and k_text.isdigit()):
            raise ConfigError(
                f"evaluate: n_at_k entries look like '10@64' (n submissions of k samples); got {value!r}"
            )
        n, k = int(n_text), int(k_text)
        if not 1 <= n <= k <= num_samples:
            raise ConfigError(
                f"evaluate: n_at_k {value!r} needs 1 <= n <= k <= num_samples ({num_samples}); "
                "raise num_samples"
            )
        pairs.append((n, k))
    return pairs


def _submission_scorer(functions: Mapping[str, Callable[..., Any]], name: str | None) -> str:
    """The reward function that gives n@k its submissions: ``name``, else the last one that can."""
    able = [key for key, fn in functions.items() if callable(getattr(fn, "submissions", None))]
    if name is None:
        if not able:
            raise ConfigError(
                "evaluate: n_at_k needs a reward function with a submissions() method (public tests, a "
                "behaviour cluster and hidden tests per response), e.g. the program testbed's ProgramReward"
            )
        return able[-1]
    if name not in able:
        raise ConfigError(
            f"evaluate: submission_scorer {name!r} has no submissions() method (those that do: {able})"
        )
    return name


def write_report(
    out: str | Path, summary: list[dict[str, float | str]], samples: list[PolicySamples], prompts: list[str]
) -> Path:
    """``evaluation.json`` (summary + every response and score) and ``evaluation.md`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "summary": summary,
        "prompts": prompts,
        "policies": [
            {
                "name": s.name,
                "responses": s.responses,
                "ended": s.ended,
                "lengths": s.lengths,
                "scores": s.scores,
                **(
                    {
                        "submissions": [
                            {"public": x.passes_public, "hidden": x.passes_hidden} for x in s.submissions
                        ]
                    }
                    if s.submissions is not None
                    else {}
                ),
            }
            for s in samples
        ],
    }
    (out / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "evaluation.md").write_text(markdown_table(summary))
    return out


def evaluate_command(
    *,
    policies: list[str],
    prompts: str,
    out: str = "runs/evaluate",
    reward_model: str | None = None,
    reward_functions: dict[str, Callable[[list[str], list[str]], Any]] | None = None,
    num_samples: int = 1,
    pass_k: list[int] | None = None,
    pass_scorer: str | None = None,
    pass_threshold: float | None = None,
    win_scorer: str | None = None,
    n_at_k: list[str] | None = None,
    submission_scorer: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    prompt_field: str = "prompt",
    columns: list[str] | None = None,
    max_prompt_length: int = 256,
    apply_chat_template: bool | None = None,
    batch_size: int = 64,
    seed: int = 0,
    generation_engine: Literal["hf", "vllm"] = "hf",
    vllm: VLLMSettings | None = None,
) -> None:
    """Compare policies on a prompts file: mean scores, win rate vs the first policy, pass@k, EOS rate.

    Args:
        policies: Policy folders or hub names; the first is the baseline of the win rate.
        prompts: Prompts file (.jsonl/.json/.csv/.parquet, or a dataset folder) in PromptDataModule's formats.
        out: Folder for evaluation.json (every response and score) and evaluation.md (the table).
        reward_model: A reward model folder to score with (scorer name 'reward_model').
        reward_functions: Named reward functions, each by class_path or import path; row-aware ones get the
            prompt file's other columns (e.g. CodeExecutionReward reads its test cases from 'tests').
        num_samples: Responses per prompt and policy (n of pass@k).
        pass_k: The k of pass@k to report (each <= num_samples).
        pass_scorer: Scorer that decides a pass (default: the last reward function).
        pass_threshold: Score at which a response passes (e.g. 10 for CodeExecutionReward's pass_score).
        win_scorer: Scorer of the win rate (default: the reward model, else the first reward function).
        n_at_k: AlphaCode's n@k to report, as 'n@k' strings (e.g. 10@64; k <= num_samples): of each prompt's
            first k samples, keep those passing the public tests, cluster them by behaviour, submit one from
            each of the n largest clusters; solved if one passes the hidden tests.
        submission_scorer: The reward function whose submissions() gives n@k its public / cluster / hidden
            verdicts (default: the last one that has it, e.g. the program testbed's ProgramReward).
        max_new_tokens: Longest response in tokens.
        temperature: Sampling temperature (0 = greedy).
        top_k: Top-k sampling (0 = off).
        top_p: Nucleus sampling mass (1 = off).
        prompt_field: Column with the prompt.
        columns: Other columns given to the reward functions (default: all).
        max_prompt_length: Longest prompt in tokens (longer ones keep their end).
        apply_chat_template: Render plain-string prompts as a user turn with the policy's chat template
            (as PromptDataModule's argument: the policy should see prompts as it was trained on them).
        batch_size: Prompts per generation batch.
        seed: Sampling seed, the same for every policy.
        generation_engine: Who samples: HF ``generate`` (``hf``) or a vLLM engine built from each policy's
            folder (``vllm``; needs vllm installed).
        vllm: Settings of the vLLM engine (dtype, max_model_len, seed, memory share).
    """
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generation_engine=generation_engine,
    )
    summary, samples, rendered = evaluate(
        policies,
        prompts,
        reward_model=reward_model,
        reward_functions=reward_functions,
        num_samples=num_samples,
        pass_k=pass_k or (),
        pass_scorer=pass_scorer,
        pass_threshold=pass_threshold,
        win_scorer=win_scorer,
        n_at_k=n_at_k or (),
        submission_scorer=submission_scorer,
        sampling=sampling,
        prompt_field=prompt_field,
        columns=columns,
        max_prompt_length=max_prompt_length,
        apply_chat_template=apply_chat_template,
        batch_size=batch_size,
        seed=seed,
        vllm=VLLMSettings.build(vllm),
    )
    folder = write_report(out, summary, samples, rendered)
    print(markdown_table(summary), end="")
    print(f"evaluation written to {folder / 'evaluation.json'} and {folder / 'evaluation.md'}")


def main(argv: list[str]) -> None:
    from jsonargparse import CLI

    with torch.no_grad():  # scoped: an in-process caller's autograd state is left as it was
        CLI(evaluate_command, args=argv, prog="lightning-rlhf evaluate")

"""The list-program synthesis task: the code analogue of the word testbed, checked exactly and in-process.

An input is a short list of digits. A *program* is 1-4 operations from a tiny language of 16 one-token list
operations (:data:`OPS`), applied left to right. A prompt shows 3 public input -> output examples::

    Examples: 3 1 4 -> 4 1 3 | 5 5 2 -> 2 5 5 | 7 0 -> 0 7
    Program:

The response is the program, space-separated op tokens (``" rev"``), ending in EOS. The row also carries 8
hidden tests. Checking is semantic: a response passes if its outputs equal the expected ones on every hidden
test, so any equivalent program passes.

Tests use the APPS / CodeContests stdin -> stdout form, ``{"inputs": ["3 1 4\\n", ...], "outputs":
["4 1 3\\n", ...]}`` (a list printed as its digits separated by single spaces, then a newline; the empty list
is an empty line), so the very rows can also be scored by running :func:`render_python` in a sandbox.

Difficulty tiers by the *minimal* depth of the program (APPS analogue): ``intro`` = 1 operation,
``interview`` = 2, ``competition`` = 3-4. A sampled program whose semantics (its outputs on a fixed probe set)
equals a shorter program's is rejected, so the tier is the real depth; programs whose public examples are
degenerate (every output equals its input, or every output is empty) are rejected too. Inputs are lists of 5
digits.

Calibration targets, stated before any training (README "The program testbed"): a tiny SFT model gets pass@1
about 50 / 15 / 3 % on intro / interview / competition, with pass@64 well above pass@1 on competition (the
sparse-success regime where RL has signal to work with). The tiers, the fixed list length and the SFT
budget (``lightning_rlhf.pipeline.PROGRAM_SETTINGS``) are the outcome of that one calibration; the measured
numbers are in README.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache


def _cumsum(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total = (total + x) % 10
        out.append(total)
    return out


def _dedup(xs: list[int]) -> list[int]:
    """Drop repeated values, keeping the first occurrence of each."""
    seen: set[int] = set()
    return [x for x in xs if not (x in seen or seen.add(x))]


OPS: dict[str, Callable[[list[int]], list[int]]] = {
    "rev": lambda xs: xs[::-1],
    "sort": sorted,
    "sortd": lambda xs: sorted(xs, reverse=True),
    "add1": lambda xs: [(x + 1) % 10 for x in xs],
    "add3": lambda xs: [(x + 3) % 10 for x in xs],
    "dbl": lambda xs: [(2 * x) % 10 for x in xs],
    "sq": lambda xs: [(x * x) % 10 for x in xs],
    "evens": lambda xs: [x for x in xs if x % 2 == 0],
    "odds": lambda xs: [x for x in xs if x % 2 == 1],
    "take3": lambda xs: xs[:3],
    "drop1": lambda xs: xs[1:],
    "dedup": _dedup,
    "cums": _cumsum,
    "rotl": lambda xs: xs[1:] + xs[:1],
    "rotr": lambda xs: xs[-1:] + xs[:-1],
    "swap": lambda xs: xs[1::-1] + xs[2:],
}
"""The language: op token -> pure function on a list of digits (every value stays in 0..9)."""

TIERS: dict[str, tuple[int, ...]] = {"intro": (1,), "interview": (2,), "competition": (3, 4)}
"""Tier name -> the program depths it holds."""

MAX_PROGRAM_OPS = 8
"""A response longer than this does not parse (keeps a runaway policy sample cheap to check)."""

# Fixed probe inputs that define a program's semantics for dedup and minimal-depth checks.
_PROBE_RNG = random.Random("program-probes")
_PROBES: tuple[tuple[int, ...], ...] = tuple(
    tuple(_PROBE_RNG.randrange(10) for _ in range(_PROBE_RNG.randint(3, 8))) for _ in range(48)
)


def run_program(program: Sequence[str], xs: Sequence[int]) -> list[int]:
    """Apply ``program``'s ops to ``xs`` left to right (raises KeyError on an unknown op)."""
    out = list(xs)
    for op in program:
        out = list(OPS[op](out))
    return out


def format_list(xs: Sequence[int]) -> str:
    """The stdin/stdout form of a list: ``"3 1 4\\n"``; the empty list is ``"\\n"``."""
    return " ".join(str(x) for x in xs) + "\n"


def parse_list(text: str) -> list[int]:
    """Inverse of :func:`format_list` (whitespace-tolerant)."""
    return [int(tok) for tok in text.split()]


def fingerprint(program: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """A program's outputs on the fixed probe inputs: equal fingerprints means (nearly surely) equivalent.

    The outputs of every program of at most 3 ops are tabulated once (:func:`_shallow_table`); a longer
    program runs only its ops past the third, on its 3-op prefix's outputs (ops apply left to right). Sampling
    the program testbed spent most of its time here (48 probes x every op, three times per problem).
    """
    outputs = _shallow_table()[0]
    head = outputs[tuple(program[:3])]  # KeyError on an unknown op, as run_program
    if len(program) <= 3:
        return head
    tail = program[3:]
    return tuple(tuple(run_program(tail, out)) for out in head)


@lru_cache(maxsize=1)
def _shallow_table() -> tuple[dict[tuple[str, ...], tuple], dict[tuple, int]]:
    """(program -> fingerprint, fingerprint -> the smallest depth reaching it) over the 1 + 16 + 256 + 4096
    programs of at most 3 ops, each built from its prefix's outputs by one more op; built once."""
    outputs: dict[tuple[str, ...], tuple] = {(): _PROBES}
    depths: dict[tuple, int] = {_PROBES: 0}
    for depth in (1, 2, 3):
        for program in itertools.product(OPS, repeat=depth):
            op = OPS[program[-1]]
            outputs[program] = tuple(tuple(op(list(out))) for out in outputs[program[:-1]])
            depths.setdefault(outputs[program], depth)
    return outputs, depths


def minimal_depth(program: Sequence[str]) -> int:
    """The fewest ops of any program with the same semantics (``len(program)`` when none of depth <= 3 is)."""
    return min(_shallow_table()[1].get(fingerprint(program), len(program)), len(program))


def parse_program(response: str, eos_token: str | None = None) -> list[str] | None:
    """The op tokens of a response, or None when it is empty, too long, or holds a non-op token."""
    text = response.split(eos_token)[0] if eos_token else response
    tokens = text.split()
    if not tokens or len(tokens) > MAX_PROGRAM_OPS or any(t not in OPS for t in tokens):
        return None
    return tokens


def load_tests(tests: object, what: str = "tests") -> tuple[list[str], list[str]]:
    """``(inputs, outputs)`` of an APPS-style test column given as a dict or a JSON string."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as err:
            raise ValueError(f"column {what!r} is not valid JSON: {err}") from None
    if not isinstance(tests, dict) or "inputs" not in tests or "outputs" not in tests:
        raise ValueError(f'column {what!r} must be {{"inputs": [...], "outputs": [...]}}, got {tests!r:.80}')
    inputs, outputs = list(tests["inputs"]), list(tests["outputs"])
    if len(inputs) != len(outputs) or not inputs:
        raise ValueError(
            f"column {what!r} needs as many outputs as inputs (>= 1); got {len(inputs)} / {len(outputs)}"
        )
    for field, values in (("inputs", inputs), ("outputs", outputs)):
        for i, value in enumerate(values):
            if not isinstance(value, str) or not all(tok.isdigit() for tok in value.split()):
                raise ValueError(
                    f"column {what!r}, {field}[{i}] must be a line of space-separated digits, "
                    f"got {value!r:.40}"
                )
    return inputs, outputs


def passes(program: Sequence[str] | None, tests: object) -> bool:
    """Whether ``program`` prints every expected output of ``tests`` (whitespace-tolerant comparison)."""
    if program is None:
        return False
    inputs, outputs = load_tests(tests)
    pairs = zip(inputs, outputs, strict=True)
    return all(run_program(program, parse_list(i)) == parse_list(o) for i, o in pairs)


def render_python(program: Sequence[str]) -> str:
    """``program`` as a standalone Python script: reads one list from stdin, prints the output list.

    Its stdout has the exact form of the ``tests`` outputs, so a sandboxed run agrees with :func:`passes`.
    """
    bodies = {
        "rev": "xs = xs[::-1]",
        "sort": "xs = sorted(xs)",
        "sortd": "xs = sorted(xs, reverse=True)",
        "add1": "xs = [(x + 1) % 10 for x in xs]",
        "add3": "xs = [(x + 3) % 10 for x in xs]",
        "dbl": "xs = [(2 * x) % 10 for x in xs]",
        "sq": "xs = [(x * x) % 10 for x in xs]",
        "evens": "xs = [x for x in xs if x % 2 == 0]",
        "odds": "xs = [x for x in xs if x % 2 == 1]",
        "take3": "xs = xs[:3]",
        "drop1": "xs = xs[1:]",
        "dedup": "xs = [x for i, x in enumerate(xs) if x not in xs[:i]]",
        "cums": "xs = [sum(xs[: i + 1]) % 10 for i in range(len(xs))]",
        "rotl": "xs = xs[1:] + xs[:1]",
        "rotr": "xs = xs[-1:] + xs[:-1]",
        "swap": "xs = xs[1::-1] + xs[2:]",
    }
    lines = ["import sys", "xs = [int(t) for t in sys.stdin.read().split()]"]
    lines += [f"{bodies[op]}  # {op}" for op in program]
    lines.append('print(" ".join(str(x) for x in xs))')
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ProgramsConfig:
    """Knobs of the program task."""

    seed: int = 0
    """Seed for every program and input drawn."""
    num_public: int = 3
    """Public examples shown in the prompt."""
    num_hidden: int = 8
    """Hidden tests per row (the reward's tests)."""
    min_len: int = 5
    """Shortest input list."""
    max_len: int = 5
    """Longest input list."""
    unseen_eval_programs: bool = False
    """Held-out prompts ask only for programs (by semantics) that no training file demonstrates (a test of
    composition; the intro tier has only 16 programs, so at most 16 intro held-out prompts). False: they are
    new problems (new examples) drawn like the training ones, as APPS test problems are new problems over
    familiar skills; only the held-out prompt texts are kept out of training."""
    tiers: tuple[str, ...] = tuple(TIERS)
    """The tiers every file holds, rows cycling through them in this order (e.g. ``("intro",)``)."""

    def __post_init__(self) -> None:
        bad = [t for t in self.tiers if t not in TIERS]
        if bad or not self.tiers:
            raise ValueError(f"ProgramsConfig.tiers must name some of {list(TIERS)} (got {list(self.tiers)})")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(
                f"ProgramsConfig needs 1 <= min_len <= max_len (got {self.min_len}, {self.max_len})"
            )


@dataclass(frozen=True)
class ProgramProblem:
    """One problem: the reference program, its tier and its public / hidden tests."""

    program: tuple[str, ...]
    tier: str
    public_tests: dict
    tests: dict

    @property
    def prompt(self) -> str:
        shown = " | ".join(
            f"{i.strip()} -> {o.strip()}"
            for i, o in zip(self.public_tests["inputs"], self.public_tests["outputs"], strict=True)
        )
        return f"Examples: {shown}\nProgram:"


class ProgramTask:
    """Samples problems of a tier; all randomness comes from the ``rng`` passed in (seeded by the caller)."""

    def __init__(self, config: ProgramsConfig | None = None) -> None:
        self.config = config or ProgramsConfig()

    def _inputs(self, rng: random.Random, count: int) -> list[list[int]]:
        return [
            [rng.randrange(10) for _ in range(rng.randint(self.config.min_len, self.config.max_len))]
            for _ in range(count)
        ]

    def sample(self, tier: str, rng: random.Random, seen: set | None = None) -> ProgramProblem:
        """A problem of ``tier`` whose program is minimal and (when ``seen`` is given) semantically new."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {sorted(TIERS)}, got {tier!r}")
        for _ in range(10_000):
            depth = rng.choice(TIERS[tier])
            program = tuple(rng.choice(list(OPS)) for _ in range(depth))
            if minimal_depth(program) != depth:
                continue
            key = fingerprint(program)
            if seen is not None and key in seen:
                continue
            public = self._inputs(rng, self.config.num_public)
            outs = [run_program(program, xs) for xs in public]
            if all(o == i for o, i in zip(outs, public, strict=True)) or all(not o for o in outs):
                continue
            hidden = self._inputs(rng, self.config.num_hidden)
            if seen is not None:
                seen.add(key)
            return ProgramProblem(
                program=program,
                tier=tier,
                public_tests=_tests(program, public),
                tests=_tests(program, hidden),
            )
        raise ValueError(f"could not sample a new {tier} problem; the tier's programs are exhausted")


def _tests(program: Sequence[str], inputs: list[list[int]]) -> dict:
    return {
        "inputs": [format_list(xs) for xs in inputs],
        "outputs": [format_list(run_program(program, xs)) for xs in inputs],
    }


class ProgramReward:
    """Row-aware exact reward: ``pass_score`` when the response's program passes all of its row's ``tests``.

    Called as ``f(prompts, responses, tests=[...], **other_columns)``; ``tests`` holds one APPS-style test
    dict (or JSON string) per response. A response that does not parse scores ``fail_score``.
    """

    def __init__(
        self, pass_score: float = 10.0, fail_score: float = 0.0, eos_token: str | None = None
    ) -> None:
        """
        Args:
            pass_score: reward of a program that passes every hidden test (the paper's 10).
            fail_score: reward of any other response.
            eos_token: text cut off the response before parsing (None: the response is already cut).
        """
        self.pass_score = float(pass_score)
        self.fail_score = float(fail_score)
        self.eos_token = eos_token
        self._last: dict[str, float] = {}

    def __call__(
        self, prompts: list[str], responses: list[str], tests: list | None = None, **columns: object
    ) -> list[float]:
        if tests is None:
            raise ValueError("ProgramReward needs the rows' 'tests' column (keep it in the prompts file)")
        if len(tests) != len(responses):
            raise ValueError(f"got {len(responses)} responses but {len(tests)} 'tests' values")
        _check_rows(tests, "tests")
        programs = [parse_program(r, self.eos_token) for r in responses]
        ok = [passes(p, t) for p, t in zip(programs, tests, strict=True)]
        n = max(len(responses), 1)
        self._last = {
            "pass_rate": sum(ok) / n,
            "parse_rate": sum(p is not None for p in programs) / n,
        }
        return [self.pass_score if o else self.fail_score for o in ok]

    def metrics(self) -> dict[str, float]:
        """``pass_rate`` and ``parse_rate`` of the last call (empty before the first)."""
        return dict(self._last)

    def submissions(
        self,
        prompts: list[str],
        responses: list[str],
        tests: list | None = None,
        public_tests: list | None = None,
        **columns: object,
    ) -> list:
        """Each response as n@k sees it (:class:`lightning_rlhf.metrics.Submission`): passes the row's
        ``public_tests`` (all pass the filter when the rows have none), its cluster (its outputs on the fixed
        probe inputs: equivalent programs share one) and whether it passes the hidden ``tests``. A response
        that does not parse passes nothing."""
        from lightning_rlhf.metrics import Submission

        if tests is None:
            raise ValueError("ProgramReward.submissions needs the rows' 'tests' column")
        _check_rows(tests, "tests")
        if public_tests is not None:
            _check_rows(public_tests, "public_tests")
        public = public_tests if public_tests is not None else [None] * len(responses)
        out = []
        for response, hidden, shown in zip(responses, tests, public, strict=True):
            program = parse_program(response, self.eos_token)
            if program is None:
                out.append(Submission(passes_public=False, cluster=None, passes_hidden=False))
                continue
            ok_public = True if shown is None else passes(program, shown)
            out.append(Submission(ok_public, fingerprint(program), passes(program, hidden)))
        return out


class PythonProgramReward:
    """The same exact reward through the code path: each response's program is rendered as Python
    (:func:`render_python`) and run by :class:`~lightning_rlhf.rewards.CodeExecutionReward` in the sandbox
    on its row's ``tests``, one subprocess per test. A response that does not parse renders as no code (a
    ``no_code`` failure). Slower than :class:`ProgramReward` and equal to it (a test checks); it exercises
    what a user's APPS-style run does. ``metrics()`` are the execution rates (``pass_rate``, ...)."""

    def __init__(self, eos_token: str | None = None, **execution: object) -> None:
        """
        Args:
            eos_token: text cut off the response before parsing (None: the response is already cut).
            execution: :class:`~lightning_rlhf.rewards.CodeExecutionReward` arguments (``pass_score``,
                ``timeout_s``, ``num_workers``, ...).
        """
        from lightning_rlhf.rewards.code import CodeExecutionReward

        self.eos_token = eos_token
        self.execution = CodeExecutionReward(**execution)

    def __call__(self, prompts: list[str], responses: list[str], **columns: object) -> list[float]:
        programs = [parse_program(r, self.eos_token) for r in responses]
        code = [render_python(p) if p is not None else "" for p in programs]
        return self.execution(prompts, code, **columns)

    def metrics(self) -> dict[str, float]:
        return self.execution.metrics()


def _check_rows(column: list, name: str) -> None:
    """Validate every row's tests before scoring any, so a bad row is named instead of scoring 0."""
    for row, tests in enumerate(column):
        try:
            load_tests(tests, name)
        except ValueError as err:
            raise ValueError(
                f"ProgramReward: row {row} of the batch: {err}; fix the prompt file's row"
            ) from None

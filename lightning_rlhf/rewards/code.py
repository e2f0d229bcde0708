"""Score generated Python programs by running them against each row's test cases (APPS / CodeContests).

The reward is the paper's exact one: ``pass_score`` (10) when every test passes, else ``fail_score`` (0), or
with ``partial_credit`` ``fail + (pass - fail) * passed / total``. Every program runs in
:func:`lightning_rlhf.rewards.sandbox.run_program` (its own subprocess with limits); nothing generated ever
runs in the training process, and the expected outputs are compared here, after the program has exited.

Test formats (one spec per response, a JSON string or a dict):

- stdin -> stdout: ``{"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}`` (an input or output may also be a
  list of lines);
- call-based: ``{"fn_name": "add", "inputs": [[1, 2], ...], "outputs": [3, ...]}``: each input is the
  argument list; the function is a top-level ``def`` or a method of a ``class Solution`` (LeetCode style).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Queue

from lightning_rlhf.data.loading import DataError
from lightning_rlhf.rewards.sandbox import ProgramResult, run_program
from lightning_rlhf.validation import check, check_choice

STATUSES = ("passed", "failed", "timeout", "memory", "runtime_error", "syntax_error", "no_code")
FLOAT_TOL = 1e-6  # absolute and relative tolerance for numeric tokens (checkers commonly accept 1e-6)
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n", re.IGNORECASE)
_RESULT_MARK = "\x00lightning-rlhf-result\x00"


class TestSpecError(DataError):
    """A row's test cases are missing or malformed (the message names the row and the column)."""

    __test__ = False  # not a pytest class, despite the name


@dataclass(frozen=True)
class TestCases:
    """One row's tests: stdin strings and expected stdout strings, or argument lists and return values."""

    __test__ = False

    inputs: list
    outputs: list
    fn_name: str | None = None


@dataclass(frozen=True)
class ExecutionRecord:
    """How one response did: ``status`` is one of :data:`STATUSES` (the first failing test's kind)."""

    status: str
    passed: int
    total: int
    runtime_s: float
    detail: str = ""


def extract_code(response: str, block: str = "last") -> str | None:
    """The program in ``response``: the last (or first) fenced block, else the raw text; None if empty.

    Like TRL's and AReaL's code rewards we take the *last* ```` ```python ```` block by default: a model that
    first sketches and then corrects itself means the final one. A fence opened but never closed (the
    generation hit its length limit) yields the text after it.
    """
    blocks = _FENCE.findall(response)
    if blocks:
        code = blocks[-1] if block == "last" else blocks[0]
    else:
        opened = list(_OPEN_FENCE.finditer(response))
        code = response[opened[-1].end() :] if opened else response
    return code if code.strip() else None


def _as_text(value: object) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def parse_tests(spec: object, row: int, column: str = "tests") -> TestCases:
    """Validate one row's test spec (JSON string or dict); errors name the row, the column and the fix."""
    where = f"CodeExecutionReward: row {row}, column {column!r}"
    fix = 'give {"inputs": [...], "outputs": [...]} (and "fn_name" for call-based tests)'
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise TestSpecError(f"{where}: the row has no tests; {fix}")
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise TestSpecError(f"{where}: the tests are not valid JSON ({err}); {fix}") from None
    if not isinstance(spec, dict):
        raise TestSpecError(f"{where}: expected a JSON object, got {type(spec).__name__}; {fix}")
    inputs, outputs, fn_name = spec.get("inputs"), spec.get("outputs"), spec.get("fn_name")
    for name, value in (("inputs", inputs), ("outputs", outputs)):
        if not isinstance(value, list):
            raise TestSpecError(f"{where}: field {name!r} must be a list (got {type(value).__name__}); {fix}")
    if not inputs:
        raise TestSpecError(f"{where}: field 'inputs' is empty: the row has no tests; {fix}")
    if len(inputs) != len(outputs):
        raise TestSpecError(
            f"{where}: fields 'inputs' and 'outputs' differ in length ({len(inputs)} vs {len(outputs)}); "
            "each input needs its expected output"
        )
    if fn_name is not None and (not isinstance(fn_name, str) or not fn_name.isidentifier()):
        raise TestSpecError(f"{where}: field 'fn_name' must be a Python identifier (got {fn_name!r})")
    if fn_name is None:
        return TestCases([_as_text(x) for x in inputs], [_as_text(y) for y in outputs])
    bad = next((i for i, x in enumerate(inputs) if not isinstance(x, list)), None)
    if bad is not None:
        raise TestSpecError(f"{where}: field 'inputs'[{bad}] must be the argument list for {fn_name!r}")
    return TestCases(list(inputs), list(outputs), fn_name)


def _token_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=FLOAT_TOL, abs_tol=FLOAT_TOL)


def stdout_matches(actual: str, expected: str) -> bool:
    """Whitespace-tolerant token comparison with numeric tolerance, as APPS-style checkers do.

    Both texts are split on any whitespace (so trailing spaces, blank lines and ``\\r\\n`` do not matter);
    the token lists must have the same length and agree token by token, where two tokens that both parse as
    floats agree when ``isclose(rel_tol=abs_tol=FLOAT_TOL)``. ``"1.0000001"`` matches ``"1"``; ``"1 2"`` does
    not match ``"12"``.
    """
    got, want = actual.split(), expected.split()
    return len(got) == len(want) and all(_token_equal(a, b) for a, b in zip(got, want, strict=True))


def _value_equal(a: object, b: object) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b  # True is not the answer 1
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=FLOAT_TOL, abs_tol=FLOAT_TOL)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_value_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_value_equal(a[k], b[k]) for k in a)
    return a == b


def return_matches(actual: object, expected: object) -> bool:
    """Call-based comparison after a JSON round trip (tuples are lists); APPS often wraps the value in a
    one-element list, so ``[value]`` is accepted for ``value``. Numbers compare with :data:`FLOAT_TOL`."""
    if _value_equal(actual, expected):
        return True
    return isinstance(expected, list) and len(expected) == 1 and _value_equal(actual, expected[0])


def _call_program(code: str, fn_name: str) -> str:
    """The response's code between a prologue that reads the arguments and an epilogue that calls it."""
    prologue = "import sys as _lr_sys, json as _lr_json\n_lr_args = _lr_json.loads(_lr_sys.stdin.read())\n"
    epilogue = (
        f"\n\n_lr_f = globals().get({fn_name!r})\n"
        f"if _lr_f is None and 'Solution' in globals():\n    _lr_f = getattr(Solution(), {fn_name!r})\n"
        "_lr_r = _lr_f(*_lr_args)\n"
        "_lr_conv = lambda o: sorted(o) if isinstance(o, (set, frozenset)) else repr(o)\n"
        f"_lr_sys.stdout.write('\\n' + {_RESULT_MARK!r} + _lr_json.dumps(_lr_r, default=_lr_conv) + '\\n')\n"
    )
    return prologue + code + epilogue


def _failure_kind(result: ProgramResult) -> str | None:
    """Why the run itself failed (None when it exited cleanly and the output decides)."""
    if result.timed_out:
        return "timeout"
    if result.memory_exceeded:
        return "memory"
    if result.output_exceeded:
        return "failed"
    if result.returncode != 0:
        last = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        if last[0].startswith(("SyntaxError", "IndentationError", "TabError")):
            return "syntax_error"
        return "runtime_error"
    return None


class CodeExecutionReward:
    """Reward = run each response's Python program on its row's tests in a sandbox (see module docstring).

    Call as ``reward(prompts, responses, **columns)``; ``columns[tests_column]`` holds one test spec per
    response. :meth:`run` returns the per-response :class:`ExecutionRecord`; :meth:`metrics` the rates of
    the last call (``pass_rate``, ``timeout_rate``, ...), which PPO / DPO-Iter log as ``rollout/<key>``.
    """

    def __init__(
        self,
        tests_column: str = "tests",
        pass_score: float = 10.0,
        fail_score: float = 0.0,
        partial_credit: bool = False,
        timeout_s: float = 4.0,
        memory_mb: int = 512,
        max_output_bytes: int = 1 << 20,
        max_processes: int = 8,
        num_workers: int = 4,
        code_block: str = "last",
    ) -> None:
        """
        Args:
            tests_column: the dataset column holding each row's tests (JSON string or object).
            pass_score: the reward when every test passes (the paper uses 10).
            fail_score: the reward when any test fails (the paper uses 0).
            partial_credit: score ``fail + (pass - fail) * passed / total`` instead of all-or-nothing.
            timeout_s: wall-clock limit per test run, seconds (the CPU-time limit is its ceiling).
            memory_mb: address-space limit per run (RLIMIT_AS), MiB.
            max_output_bytes: stdout cap per run; a program printing more is killed and fails.
            max_processes: processes a program may have at once (enforced only in a PID namespace).
            num_workers: programs run in parallel (threads, each launching sandboxed subprocesses).
            code_block: which fenced ```python block to run when there are several: ``last`` or ``first``.
        """
        owner = "CodeExecutionReward"
        if not isinstance(tests_column, str) or not tests_column:
            raise DataError(f"{owner}: tests_column must be a column name (got {tests_column!r})")
        check(owner, "pass_score", pass_score)
        check(owner, "fail_score", fail_score)
        check(owner, "timeout_s", timeout_s, gt=0, le=600)
        check(owner, "memory_mb", memory_mb, ge=32, integer=True)
        check(owner, "max_output_bytes", max_output_bytes, ge=1, integer=True)
        check(owner, "max_processes", max_processes, ge=1, integer=True)
        check(owner, "num_workers", num_workers, ge=1, le=256, integer=True)
        check_choice(owner, "code_block", code_block, ("last", "first"))
        check_choice(owner, "partial_credit", partial_credit, (True, False))
        self.tests_column, self.pass_score, self.fail_score = tests_column, pass_score, fail_score
        self.partial_credit, self.timeout_s, self.memory_mb = partial_credit, timeout_s, memory_mb
        self.max_output_bytes, self.max_processes = max_output_bytes, max_processes
        self.num_workers, self.code_block = num_workers, code_block
        self._last: list[ExecutionRecord] = []
        self._lock = threading.Lock()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **columns: object) -> list[float]:
        return [self.score(r) for r in self.run(prompts, responses, **columns)]

    def score(self, record: ExecutionRecord) -> float:
        if self.partial_credit:
            fraction = record.passed / max(record.total, 1)
            return self.fail_score + (self.pass_score - self.fail_score) * fraction
        return self.pass_score if record.status == "passed" else self.fail_score

    def run(
        self, prompts: Sequence[str], responses: Sequence[str], **columns: object
    ) -> list[ExecutionRecord]:
        """Run every response against its row's tests; all specs are validated before anything runs."""
        if self.tests_column not in columns:
            raise TestSpecError(
                f"CodeExecutionReward: no column {self.tests_column!r} reached the reward (got "
                f"{sorted(columns) or 'none'}); set tests_column or keep that column in the prompt data"
            )
        specs = columns[self.tests_column]
        if len(specs) != len(responses):
            raise TestSpecError(
                f"CodeExecutionReward: column {self.tests_column!r} has {len(specs)} values for "
                f"{len(responses)} responses"
            )
        tests = [parse_tests(s, i, self.tests_column) for i, s in enumerate(specs)]
        slots: Queue[int] = Queue()
        for slot in range(self.num_workers):
            slots.put(slot)  # each worker runs as its own uid, so process counts do not add up

        def one(i: int) -> ExecutionRecord:
            slot = slots.get()
            try:
                return self._run_one(responses[i], tests[i], slot)
            finally:
                slots.put(slot)

        with ThreadPoolExecutor(max_workers=self.num_workers) as pool:
            records = list(pool.map(one, range(len(responses))))
        with self._lock:
            self._last = records
        return records

    def _run_one(self, response: str, tests: TestCases, slot: int) -> ExecutionRecord:
        total = len(tests.inputs)
        code = extract_code(response, self.code_block)
        if code is None:
            return ExecutionRecord("no_code", 0, total, 0.0, "no program in the response")
        program = code if tests.fn_name is None else _call_program(code, tests.fn_name)
        passed, runtime, first_failure = 0, 0.0, None
        for given, expected in zip(tests.inputs, tests.outputs, strict=True):
            stdin = given if tests.fn_name is None else json.dumps(given)
            result = run_program(
                program,
                stdin,
                timeout_s=self.timeout_s,
                memory_mb=self.memory_mb,
                max_output_bytes=self.max_output_bytes,
                max_processes=self.max_processes,
                slot=slot,
            )
            runtime += result.elapsed_s
            kind = _failure_kind(result)
            if kind is None and not self._output_ok(result.stdout, expected, tests):
                kind = "failed"
            if kind is None:
                passed += 1
                continue
            if first_failure is None:
                first_failure = (kind, result.stderr.decode("utf-8", "replace")[-300:])
            if not self.partial_credit or kind in ("syntax_error", "timeout"):
                break  # all-or-nothing needs no more runs; a syntax error or a hang would repeat
        if first_failure is None:
            return ExecutionRecord("passed", passed, total, runtime)
        return ExecutionRecord(first_failure[0], passed, total, runtime, first_failure[1])

    @staticmethod
    def _output_ok(stdout: bytes, expected: object, tests: TestCases) -> bool:
        try:
            text = stdout.decode("utf-8")  # binary or invalid UTF-8 is a wrong answer, not a crash
        except UnicodeDecodeError:
            return False
        if tests.fn_name is None:
            return stdout_matches(text, expected)
        _, mark, tail = text.rpartition(_RESULT_MARK)
        if not mark:
            return False
        try:
            return return_matches(json.loads(tail), expected)
        except json.JSONDecodeError:
            return False

    def metrics(self) -> dict[str, float]:
        """Rates over the responses of the last call, and their mean runtime (seconds, summed over tests)."""
        with self._lock:
            records = list(self._last)
        n = max(len(records), 1)
        out = {f"{s}_rate": sum(r.status == s for r in records) / n for s in STATUSES if s != "failed"}
        out["pass_rate"] = out.pop("passed_rate")
        out["mean_runtime_s"] = sum(r.runtime_s for r in records) / n
        return out

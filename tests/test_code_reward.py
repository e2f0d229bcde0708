"""CodeExecutionReward: test formats, output comparison, scoring modes, bad input, and the parallel pool."""

import json

import pytest

from lightning_rlhf.data.loading import DataError
from lightning_rlhf.rewards import (
    CodeExecutionReward,
    TestSpecError,
    extract_code,
    parse_tests,
    return_matches,
    stdout_matches,
)
from lightning_rlhf.validation import ConfigError

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_TESTS = {"inputs": ["1 2\n", "5 7\n", "-3 3\n"], "outputs": ["3\n", "12\n", "0\n"]}
CALL_TESTS = {"fn_name": "add", "inputs": [[1, 2], [5, 7]], "outputs": [[3], 12]}


def fenced(code, lang="python"):
    return f"Here is my solution:\n```{lang}\n{code}```\nDone."


# --- code extraction ---------------------------------------------------------------------------------


def test_extract_code_takes_last_block_by_default_and_first_on_request():
    text = "```python\nprint(1)\n```\nbetter:\n```python\nprint(2)\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code(text, "first") == "print(1)\n"


def test_extract_code_raw_text_unclosed_fence_and_empty():
    assert extract_code("print(3)") == "print(3)"
    assert extract_code("```py\nprint(4)\n") == "print(4)\n"  # truncated generation: fence never closed
    assert extract_code("```python\n   \n```") is None
    assert extract_code("  \n") is None


# --- comparison (hand-worked) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "actual, expected, ok",
    [
        ("3\n", "3", True),  # trailing newline ignored
        ("1 2  \r\n\n", "1 2\n", True),  # trailing spaces, CRLF, blank line ignored
        ("1\n2\n", "1 2", True),  # token compare: line breaks are whitespace
        ("12", "1 2", False),  # ... but tokens must not merge
        ("0.3333333", "0.333333333", True),  # |diff| = 3.3e-8 <= 1e-6
        ("0.334", "0.333", False),  # |diff| = 1e-3 > 1e-6 and rel 3e-3 > 1e-6
        ("1000000.5", "1000000", True),  # rel diff 5e-7 <= 1e-6
        ("YES", "yes", False),  # case matters
        ("3 4", "3", False),  # extra token
        ("", "", True),
    ],
)
def test_stdout_matches(actual, expected, ok):
    assert stdout_matches(actual, expected) is ok


def test_return_matches():
    assert return_matches(3, [3])  # APPS wraps the value in a one-element list
    assert return_matches([1, 2], [1, 2])
    assert return_matches([1, 2], [[1, 2]])
    assert return_matches(0.1 + 0.2, 0.3)  # 5.6e-17 off
    assert not return_matches(True, 1)  # a bool is not a number answer
    assert not return_matches([3], 3)
    assert return_matches({"a": [1.0]}, {"a": [1]})
    assert not return_matches("3", 3)


# --- test-spec parsing and bad input -----------------------------------------------------------------


def test_parse_tests_json_string_dict_and_line_lists():
    a = parse_tests(json.dumps(ADD_TESTS), 0)
    b = parse_tests(ADD_TESTS, 0)
    assert a == b and a.fn_name is None and len(a.inputs) == 3
    lines = parse_tests({"inputs": [["1 2", "3"]], "outputs": [["x", "y"]]}, 0)
    assert lines.inputs == ["1 2\n3"] and lines.outputs == ["x\ny"]
    call = parse_tests(CALL_TESTS, 0)
    assert call.fn_name == "add" and call.inputs == [[1, 2], [5, 7]]


@pytest.mark.parametrize(
    "spec, words",
    [
        (None, "no tests"),
        ("", "no tests"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"inputs": [], "outputs": []}, "'inputs' is empty"),
        ({"inputs": ["1"], "outputs": ["1", "2"]}, "differ in length (1 vs 2)"),
        ({"inputs": "1", "outputs": ["1"]}, "'inputs' must be a list"),
        ({"inputs": ["1"]}, "'outputs' must be a list"),
        ({"fn_name": "f", "inputs": [1], "outputs": [1]}, "'inputs'[0] must be the argument list"),
        ({"fn_name": "not valid", "inputs": [[1]], "outputs": [1]}, "identifier"),
    ],
)
def test_bad_specs_name_row_and_column(spec, words):
    reward = CodeExecutionReward(tests_column="cases")
    good = json.dumps(ADD_TESTS)
    with pytest.raises(TestSpecError) as err:
        reward(["p"] * 3, [ADD] * 3, cases=[good, good, spec])
    assert isinstance(err.value, DataError)
    assert "row 2" in str(err.value) and "'cases'" in str(err.value) and words in str(err.value)


def test_missing_column_and_length_mismatch():
    reward = CodeExecutionReward()
    with pytest.raises(TestSpecError, match="no column 'tests'.*answer"):
        reward(["p"], [ADD], answer=["3"])
    with pytest.raises(TestSpecError, match="1 values for 2 responses"):
        reward(["p"] * 2, [ADD] * 2, tests=[ADD_TESTS])


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"timeout_s": 0}, "timeout_s"),
        ({"memory_mb": 1}, "memory_mb"),
        ({"num_workers": 0}, "num_workers"),
        ({"max_output_bytes": 1.5}, "max_output_bytes"),
        ({"code_block": "middle"}, "code_block"),
        ({"pass_score": float("nan")}, "pass_score"),
    ],
)
def test_constructor_validation(kwargs, flag):
    with pytest.raises(ConfigError, match=f"CodeExecutionReward: {flag}"):
        CodeExecutionReward(**kwargs)


# --- running and scoring -----------------------------------------------------------------------------


def test_statuses_scores_and_metrics():
    """Six responses, one of each kind: scores 10/0 and each rate is 1/6."""
    reward = CodeExecutionReward(timeout_s=2, num_workers=2)
    responses = [
        fenced(ADD),  # passed
        "print(3)",  # failed: right on the first test only
        "print(",  # syntax_error
        "raise ValueError('boom')",  # runtime_error
        "No code here, sorry.\n```python\n\n```",  # no_code
        "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe3\\n')",  # invalid UTF-8: a counted failure
    ]
    records = reward.run(["p"] * 6, responses, tests=[ADD_TESTS] * 6)
    assert [r.status for r in records] == [
        "passed",
        "failed",
        "syntax_error",
        "runtime_error",
        "no_code",
        "failed",
    ]
    assert (records[0].passed, records[0].total) == (3, 3)
    assert records[1].passed == 1  # all-or-nothing stops at the first failure
    assert reward(["p"] * 6, responses, tests=[ADD_TESTS] * 6) == [10.0, 0, 0, 0, 0, 0]
    m = reward.metrics()
    assert m["pass_rate"] == pytest.approx(1 / 6)
    for key in ("syntax_error_rate", "runtime_error_rate", "no_code_rate"):
        assert m[key] == pytest.approx(1 / 6)
    assert m["timeout_rate"] == 0 and m["memory_rate"] == 0 and m["mean_runtime_s"] > 0


def test_partial_credit_and_custom_scores():
    """print(3) passes 1 of 3 tests: partial score = -1 + (2 - -1) * 1/3 = 0; all-or-nothing = -1."""
    tests = [ADD_TESTS]
    partial = CodeExecutionReward(pass_score=2.0, fail_score=-1.0, partial_credit=True)
    assert partial(["p"], ["print(3)"], tests=tests) == [pytest.approx(0.0)]
    assert partial.run(["p"], ["print(3)"], tests=tests)[0].passed == 1
    strict = CodeExecutionReward(pass_score=2.0, fail_score=-1.0)
    assert strict(["p"], ["print(3)"], tests=tests) == [-1.0]
    assert strict(["p"], [ADD], tests=tests) == [2.0]


def test_call_based_function_and_solution_class():
    reward = CodeExecutionReward()
    responses = [
        "def add(a, b):\n    print('debug output is ignored')\n    return a + b\n",
        fenced("class Solution:\n    def add(self, a, b):\n        return a + b\n"),
        "def add(a, b):\n    return a - b\n",
        "def plus(a, b):\n    return a + b\n",  # wrong name: runtime error
    ]
    records = reward.run(["p"] * 4, responses, tests=[json.dumps(CALL_TESTS)] * 4)
    assert [r.status for r in records] == ["passed", "passed", "failed", "runtime_error"]


def test_call_based_result_cannot_be_forged_by_prompt_leak():
    """The program sees its arguments, never the expected value: printing a guess does not help."""
    reward = CodeExecutionReward()
    code = "def add(a, b):\n    return None\n"
    assert reward(["p"], [code], tests=[CALL_TESTS]) == [0.0]


def test_parallel_pool_matches_one_worker():
    responses = [ADD, "print(3)", "print(", fenced(ADD), "x = 1/0", "print(12)"] * 2
    tests = [ADD_TESTS] * len(responses)
    one = CodeExecutionReward(num_workers=1, partial_credit=True)
    many = CodeExecutionReward(num_workers=4, partial_credit=True)
    a = one.run(["p"] * len(responses), responses, tests=tests)
    b = many.run(["p"] * len(responses), responses, tests=tests)
    assert [(r.status, r.passed, r.total) for r in a] == [(r.status, r.passed, r.total) for r in b]
    assert one(["p"] * len(responses), responses, tests=tests) == many(
        ["p"] * len(responses), responses, tests=tests
    )


def test_degraded_mode_without_namespaces_still_scores(monkeypatch):
    """Where namespaces are not permitted the run falls back to rlimits only, says so, and still scores."""
    import sys

    from lightning_rlhf.rewards import sandbox

    degraded = sandbox.Isolation(False, "rlimits only; NOT enforced: process count", sys.executable)
    monkeypatch.setattr(sandbox, "_isolation", degraded)
    assert sandbox.isolation() is degraded
    reward = CodeExecutionReward(timeout_s=2)
    assert reward(["p"] * 2, [ADD, "print(3)"], tests=[ADD_TESTS] * 2) == [10.0, 0.0]


def test_namespace_probe_failure_warns_once_and_describes(monkeypatch):
    from lightning_rlhf.rewards import sandbox

    monkeypatch.setattr(sandbox, "_isolation", None)
    monkeypatch.setattr(sandbox, "_namespaces_work", lambda python: False)
    with pytest.warns(RuntimeWarning, match="namespaces are not permitted"):
        iso = sandbox.isolation()
    assert not iso.namespaces and "NOT enforced: process count" in iso.enforced
    assert sandbox.isolation() is iso  # detected once

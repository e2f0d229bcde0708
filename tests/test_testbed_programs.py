"""The list-program testbed: op semantics, semantic checking, tiers, agreement with the Python rendering."""

import random
import subprocess
import sys

import pytest

from lightning_rlhf.testbed.programs import (
    OPS,
    TIERS,
    ProgramReward,
    ProgramTask,
    fingerprint,
    minimal_depth,
    parse_program,
    passes,
    render_python,
    run_program,
)


@pytest.mark.parametrize(
    ("op", "xs", "expected"),
    [
        ("rev", [3, 1, 4], [4, 1, 3]),
        ("sort", [3, 1, 4, 1], [1, 1, 3, 4]),
        ("sortd", [3, 1, 4, 1], [4, 3, 1, 1]),
        ("add1", [9, 0, 5], [0, 1, 6]),  # 9+1 = 10 -> 0
        ("add3", [8, 7, 1], [1, 0, 4]),  # 11 -> 1, 10 -> 0
        ("dbl", [6, 2, 5], [2, 4, 0]),  # 12 -> 2, 10 -> 0
        ("sq", [3, 4, 9], [9, 6, 1]),  # 16 -> 6, 81 -> 1
        ("evens", [1, 2, 3, 4, 0], [2, 4, 0]),
        ("odds", [1, 2, 3, 4, 0], [1, 3]),
        ("take3", [5, 6, 7, 8], [5, 6, 7]),
        ("drop1", [5, 6, 7, 8], [6, 7, 8]),
        ("dedup", [2, 1, 2, 3, 1], [2, 1, 3]),
        ("cums", [4, 5, 3, 9], [4, 9, 2, 1]),  # 4, 9, 12 -> 2, 11 -> 1
        ("rotl", [1, 2, 3], [2, 3, 1]),
        ("rotr", [1, 2, 3], [3, 1, 2]),
        ("swap", [1, 2, 3], [2, 1, 3]),
    ],
)
def test_each_op_on_a_hand_worked_list(op, xs, expected):
    assert run_program([op], xs) == expected


def test_every_op_is_tested_and_ops_compose_left_to_right():
    assert len(OPS) == 16
    # take3 then rev: [5, 6, 7, 8] -> [5, 6, 7] -> [7, 6, 5]; rev then take3: [8, 7, 6].
    assert run_program(["take3", "rev"], [5, 6, 7, 8]) == [7, 6, 5]
    assert run_program(["rev", "take3"], [5, 6, 7, 8]) == [8, 7, 6]


def _tests_of(program, inputs):
    return {
        "inputs": [" ".join(map(str, xs)) + "\n" for xs in inputs],
        "outputs": [" ".join(map(str, run_program(program, xs))) + "\n" for xs in inputs],
    }


def test_checker_is_semantic_equivalent_programs_pass_and_a_mutant_fails():
    inputs = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7], [0, 0, 1, 2]]
    tests = _tests_of(["sort", "rev"], inputs)
    assert passes(["sortd"], tests)  # sort then reverse == sort descending
    assert passes(["rev", "sortd"], tests)
    assert passes(["add1", "add1", "add1", "sort", "rev"], {**tests}) is False
    assert passes(["sort"], tests) is False
    reward = ProgramReward(pass_score=10.0, fail_score=0.0)
    scores = reward(["p"] * 4, [" sortd", " sort rev", " sort add1", " nonsense"], tests=[tests] * 4)
    assert scores == [10.0, 10.0, 0.0, 0.0]
    assert reward.metrics() == {"pass_rate": 0.5, "parse_rate": 0.75}


def test_parse_program_cuts_eos_and_rejects_bad_tokens():
    assert parse_program(" rev sort</s>junk", eos_token="</s>") == ["rev", "sort"]
    assert parse_program("") is None
    assert parse_program("rev frobnicate") is None
    assert parse_program(" ".join(["rev"] * 9)) is None


def test_fingerprint_is_the_outputs_on_the_probes_at_every_length():
    """The tabulated fingerprint (3-op prefixes precomputed) against running each program on every probe:
    every program of up to 2 ops, and 300 random ones of 3 to 8 ops."""
    from lightning_rlhf.testbed.programs import _PROBES

    def brute_force(program):
        return tuple(tuple(run_program(program, probe)) for probe in _PROBES)

    rng = random.Random(0)
    programs = [[]] + [[a] for a in OPS] + [[a, b] for a in OPS for b in OPS]
    programs += [[rng.choice(list(OPS)) for _ in range(rng.randint(3, 8))] for _ in range(300)]
    for program in programs:
        assert fingerprint(program) == brute_force(program), program
        assert fingerprint(tuple(program)) == brute_force(program), program
    assert fingerprint(["rev", "rev"]) == fingerprint([]) != fingerprint(["rev"])
    with pytest.raises(KeyError):
        fingerprint(["rev", "rev", "rev", "frobnicate"])
    with pytest.raises(KeyError):
        fingerprint(["frobnicate"])


def test_add3_four_times_is_minimal_depth_two_not_four():
    """add3 x4 adds 12 = 2 mod 10: the same as add1 add1, so its minimal depth is 2."""
    assert minimal_depth(["add3", "add3", "add3", "add3"]) == 2
    assert minimal_depth(["rev", "rev"]) == 0
    assert minimal_depth(["sort", "rev"]) == 1


def test_sampled_problems_have_their_tier_depth_are_distinct_and_pass_their_own_tests():
    task, rng, seen = ProgramTask(), random.Random(0), set()
    for tier, depths in TIERS.items():
        for _ in range(5):
            problem = task.sample(tier, rng, seen)
            assert len(problem.program) in depths
            assert minimal_depth(problem.program) == len(problem.program)
            assert passes(problem.program, problem.tests) and passes(problem.program, problem.public_tests)
            assert len(problem.tests["inputs"]) == 8 and len(problem.public_tests["inputs"]) == 3
            assert problem.prompt.count("->") == 3
    assert len(seen) == 15


def test_render_python_agrees_with_the_in_process_checker(tmp_path):
    """Trusted, generated code: run the rendering with a plain subprocess and compare to run_program."""
    programs = [
        ["rev"],
        ["dedup", "cums"],
        ["evens", "rotr", "sq"],
        ["take3", "swap", "add3", "sortd"],
        list(OPS),
    ]
    inputs = [[3, 1, 4, 1, 5, 9], [1, 3, 5], [8, 8, 0, 2, 7]]
    for k, program in enumerate(programs):
        script = tmp_path / f"prog{k}.py"
        script.write_text(render_python(program))
        for xs in inputs:
            text = " ".join(map(str, xs)) + "\n"
            out = subprocess.run(
                [sys.executable, str(script)],
                input=text,
                capture_output=True,
                text=True,
                timeout=30,
                cwd=tmp_path,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout == " ".join(map(str, run_program(program, xs))) + "\n"


def test_the_sandboxed_runner_agrees_with_the_in_process_checker():
    """The same rows scored two ways: ProgramReward on the op tokens, CodeExecutionReward on the programs
    rendered as Python and run in the sandbox against the same `tests` column. Correct programs, equivalent
    rewrites (sortd = sort rev) and one-op mutants must get the same 10 / 0 from both."""
    from lightning_rlhf.rewards import CodeExecutionReward
    from lightning_rlhf.testbed.programs import OPS, ProgramReward, ProgramTask, render_python

    rng = random.Random(3)
    task = ProgramTask()
    programs, tests = [], []
    for tier in ("intro", "interview", "competition"):
        for _ in range(2):
            problem = task.sample(tier, rng)
            mutant = list(problem.program)
            mutant[rng.randrange(len(mutant))] = rng.choice(list(OPS))
            for program in (list(problem.program), mutant):
                programs.append(program)
                tests.append(problem.tests)
    programs.append(["sort", "rev"])
    tests.append({"inputs": ["3 1 2\n", "5 5 0\n"], "outputs": ["3 2 1\n", "5 5 0\n"]})  # sortd's outputs
    in_process = ProgramReward()([""] * len(programs), [" ".join(p) for p in programs], tests=tests)
    sandboxed = CodeExecutionReward(timeout_s=5.0, num_workers=2)(
        [""] * len(programs), [render_python(p) for p in programs], tests=tests
    )
    assert list(map(float, sandboxed)) == list(map(float, in_process))
    assert 10.0 in in_process and 0.0 in in_process  # both outcomes occur, so agreement is not vacuous


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (None, r"row 1 of the batch: column 'tests' must be"),
        ("{not json", r"row 1 of the batch: column 'tests' is not valid JSON"),
        ({"inputs": ["1 2\n"], "outputs": []}, r"row 1 of the batch: column 'tests' needs as many outputs"),
        ({"inputs": ["1 2\n"], "outputs": ["\x00\x01"]}, r"row 1 .*outputs\[0\] must be a line of"),
    ],
)
def test_program_reward_names_the_bad_row_instead_of_scoring_zero(bad, message):
    """A malformed row fails with its row and column, even when the response would not parse anyway."""
    from lightning_rlhf.testbed.programs import ProgramReward

    good = {"inputs": ["3 1\n"], "outputs": ["1 3\n"]}
    with pytest.raises(ValueError, match=message):
        ProgramReward()(["p", "q"], [" sort", " garbage"], tests=[good, bad])

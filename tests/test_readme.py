"""README's commands are the ones CI runs."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.strip() == "```bash":
            inside, current = True, []
        elif line.strip() == "```" and inside:
            inside = False
            blocks.append("\n".join(current))
        elif inside:
            current.append(line)
    return blocks


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    test_command = next(b for b in bash_blocks(readme) if "pytest" in b).strip()
    ci = (REPO / ".ci/run").read_text()
    assert test_command in ci.splitlines(), "README's test command and .ci/run have drifted apart"


def test_ci_runs_the_readme_vllm_test_command():
    """The vLLM environment's command in README (its own bash block) is the one .ci/run runs, indented in a
    subshell there."""
    readme = (REPO / "README.md").read_text()
    vllm_command = next(b for b in bash_blocks(readme) if "-m vllm" in b).strip()
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()]
    assert vllm_command in ci, "README's vLLM test command and .ci/run have drifted apart"


def test_readme_main_command_runs_the_quickstart():
    main_command = bash_blocks((REPO / "README.md").read_text())[0].strip()
    assert main_command.endswith("lightning-rlhf quickstart")
    assert "pip install torch==2.13.0" in main_command

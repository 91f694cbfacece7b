"""The README's two set-up commands stay true: CI runs the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()
    assert "road-export model.onnx" in main_job
    test_part = tests.split("torch==2.13.0 && ", 1)[1]
    assert test_part in (ROOT / ".ci" / "run").read_text()

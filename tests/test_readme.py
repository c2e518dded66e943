"""The README's Quickstart has exactly two commands, and CI runs the second one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def quickstart_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    install_and_run, install_and_test = quickstart_commands()
    assert "marcache generate" in install_and_run and "pip install" in install_and_run
    assert "pytest" in install_and_test and "pip install" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci

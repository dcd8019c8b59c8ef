"""The README's set-up commands are the ones CI runs."""
import re

from .util import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2, "the README starts with two set-up commands: main job, tests"
    ci_lines = [l for l in (REPO / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd ", "export "))]
    assert ci_lines == [commands[1]]
    assert "torch==2.14.1 torchvision==0.29.1" in commands[0] and "torch==2.14.1 torchvision==0.29.1" in commands[1]

"""Every shell command README.md shows works as shown.

Each line of the README's ```bash blocks runs with bash in a copy of this checkout (so nothing
here changes), with this environment's bin folder first on PATH, as in an activated .venv, and
must exit 0. Not run, and reported as skipped with their reason:

  * commands whose comment begins with "needs" (the network, a GPU, many minutes): the comment
    is the reason, written beside the command for readers too;
  * ``./scripts/setup.sh``, which made the environment these tests run in, and the README's
    test command, which is this very run: CI (.ci/run) runs both from a clean clone, and a test
    below checks that it runs the README's test command verbatim.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SETUP = "./scripts/setup.sh"
TEST_COMMAND = f"{SETUP} && .venv/bin/python -m pytest"


@dataclass(frozen=True)
class Command:
    text: str  # the command as a shell reads it
    comment: str  # the comment beside it, without '#'
    line: int  # where it is in README.md

    @property
    def skip_reason(self) -> str | None:
        if self.text == TEST_COMMAND:
            return "the README's test command: this very run (CI runs it from a clean clone)"
        if re.match(r"needs\b", self.comment):
            return self.comment
        return None

    @property
    def runnable(self) -> str:
        """The text to run: without the setup step that made this environment."""
        return self.text.removeprefix(f"{SETUP} && ")


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment): the comment starts at a '#' after whitespace, outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i + 1 :].strip()
    return line.strip(), ""


def readme_commands(text: str) -> list[Command]:
    commands, in_bash, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        fence = line.strip()
        if fence.startswith("```"):
            in_bash = not in_bash and fence in ("```bash", "```sh", "```shell")
            continue
        if not in_bash:
            continue
        command, comment = split_comment(line)
        if not pending:
            start = number
        if command.endswith("\\"):
            pending += command[:-1].strip() + " "
            continue
        command, pending = (pending + command).strip(), ""
        if command:
            commands.append(Command(command, comment, start))
    return commands


COMMANDS = readme_commands(README.read_text())


def test_the_readme_shows_its_two_first_commands_first():
    first, second = COMMANDS[:2]
    assert first.text == f"{SETUP} && .venv/bin/gpufit mnist"
    assert second.text == TEST_COMMAND


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert TEST_COMMAND in ci


def test_comments_and_continuations_are_read_as_a_shell_would():
    text = "```bash\nlockgen check --gpu 'RTX #1'  # a note\nls \\\n  -l   # long\n```\n"
    assert readme_commands(text) == [
        Command("lockgen check --gpu 'RTX #1'", "a note", 2),
        Command("ls -l", "long", 3),
    ]


@pytest.fixture(scope="module")
def checkout_copy(tmp_path_factory):
    """The checkout's files (tracked and new, as git lists them) and its built library, with
    .venv pointing at this environment."""
    if not (Path(sys.prefix) / "bin" / "gpufit").exists():
        pytest.skip("needs gpufit installed in this environment (pip install -e .)")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        pytest.skip("needs a git checkout (to know which files it holds)")
    copy = tmp_path_factory.mktemp("readme") / "checkout"
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    for library in (REPO / "gpufit").glob("_C*.so"):
        shutil.copy2(library, copy / "gpufit" / library.name)
    (copy / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[f"line {c.line}" for c in COMMANDS])
def test_readme_command_works(command, checkout_copy, tmp_path):
    if command.skip_reason:
        pytest.skip(f"README line {command.line}: {command.skip_reason}")
    bin_dir = str(Path(sys.prefix) / "bin")
    env = {
        **os.environ,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "VIRTUAL_ENV": sys.prefix,
        # the copy's packages, not the editable install's
        "PYTHONPATH": os.pathsep.join(
            str(checkout_copy / p) for p in (".", "lockgen/src", "fsatomic/src")
        ),
        "GPUFIT_CACHE_DIR": str(tmp_path / "cache"),
        "LOCKGEN_ENVS": str(checkout_copy / "envs"),
    }
    env.pop("GPUFIT_BACKEND", None)
    result = subprocess.run(
        ["bash", "-c", command.runnable],
        cwd=checkout_copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (
        f"README line {command.line}: `{command.runnable}` exited {result.returncode}\n"
        f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )

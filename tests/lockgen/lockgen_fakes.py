"""Fake machines for the lockgen tests, built from recorded outputs under fixtures/: a root
folder standing for / (for /sys and /proc) and a command runner answering from files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lockgen.probe import NVCC, NVIDIA_SMI, NVIDIA_SMI_LIST, NVIDIA_SMI_QUERY, CommandResult, Prober

FIXTURES = Path(__file__).parent / "fixtures"
PYTHON = "python-under-test"
TIMEOUT = "<timeout>"  # answer for a command that hangs
FAIL = "<fail>"  # answer (FAIL, returncode, output file) for a command that exits non-zero


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()


class FakeRunner:
    """Answers commands from recorded files; unknown commands are 'not found'."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.calls: list[tuple[tuple[str, ...], float]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        argv = tuple(argv)
        self.calls.append((argv, timeout))
        key = "torch" if argv[0] == PYTHON else argv
        if key not in self.answers:
            return CommandResult(None, not_found=True)
        answer = self.answers[key]
        if answer == TIMEOUT:
            return CommandResult(None, timed_out=True)
        if isinstance(answer, tuple) and answer[0] == FAIL:
            return CommandResult(answer[1], fixture_text(answer[2]))
        return CommandResult(0, fixture_text(answer))


def fake_machine(
    tmp_path: Path,
    *,
    sys_driver=None,
    proc_driver=None,
    smi=None,
    query=None,
    gpu_list=None,
    torch=None,
    nvcc=None,
    python="3.11.9",
) -> tuple[Prober, FakeRunner]:
    """A Prober over a fake root and recorded command outputs (file names in fixtures/)."""
    root = tmp_path / "root"
    root.mkdir()
    for rel, name in (
        ("sys/module/nvidia/version", sys_driver),
        ("proc/driver/nvidia/version", proc_driver),
    ):
        if name:
            (root / rel).parent.mkdir(parents=True)
            (root / rel).write_text(fixture_text(name))
    answers: dict = {}
    for cmd, name in (
        (NVIDIA_SMI, smi),
        (NVIDIA_SMI_QUERY, query),
        (NVIDIA_SMI_LIST, gpu_list),
        (NVCC, nvcc),
        ("torch", torch),
    ):
        if name is not None:
            answers[cmd] = name
    runner = FakeRunner(answers)
    nvcc_path = "/usr/local/cuda/bin/nvcc" if nvcc else None
    return Prober(
        root=root,
        run=runner,
        python_exe=PYTHON,
        python_version=python,
        platform="linux-64",
        which=lambda name: nvcc_path if name == "nvcc" else None,
    ), runner

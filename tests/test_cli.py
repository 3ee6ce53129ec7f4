"""The `gpufit` command line and the benchmarks' at their edges: help answers without importing
torch, and a bad GPUFIT_BACKEND / GPUFIT_JIT is one line naming the valid values or the cause."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Runs a command line's main() with torch made unimportable: any import of it fails the run.
WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
sys.modules["numpy"] = None
module = __import__(sys.argv[1], fromlist=["main"])
sys.exit(module.main(sys.argv[2:]))
"""


def run_python(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=300
    )


@pytest.mark.parametrize(
    "module, argv, shown",
    [
        ("gpufit.__main__", ["--help"], "mnist"),
        ("gpufit.__main__", ["mnist", "--help"], "(default: 10)"),
        ("benchmarks.mnist", ["--help"], "(default: 3)"),
        ("benchmarks.linear_relu", ["--help"], "(default: 7)"),
    ],
)
def test_help_answers_without_importing_torch(module, argv, shown):
    result = run_python("-c", WITHOUT_TORCH, module, *argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shown in result.stdout


def test_mnist_help_shows_every_default():
    result = run_python("-c", WITHOUT_TORCH, "gpufit.__main__", "mnist", "--help")
    text = " ".join(result.stdout.split())
    for default in ("(default: gpufit)", "(default: 64)", "(default: 0.001)", "(default: 0)"):
        assert default in text
    assert "(default: 1, the fastest" in text  # --threads


def test_usage_errors_answer_without_importing_torch():
    result = run_python("-c", WITHOUT_TORCH, "gpufit.__main__", "mnist", "--lr", "1e308")
    assert result.returncode == 2
    assert "--lr: 1e+308 must be at most 1.0" in result.stderr


BOGUS = "GPUFIT_BACKEND='bogus' is not one of auto, compiled, jit, reference"


@pytest.mark.parametrize(
    "command, env, message",
    [
        (["info"], {"GPUFIT_BACKEND": "bogus"}, BOGUS),
        (["mnist", "--epochs", "1"], {"GPUFIT_BACKEND": "bogus"}, BOGUS),
        (
            ["info"],
            {"GPUFIT_BACKEND": "jit", "GPUFIT_JIT": "0"},
            "GPUFIT_BACKEND=jit cannot be used: JIT builds are disabled (GPUFIT_JIT=0)",
        ),
        (
            ["info"],
            {"GPUFIT_JIT": "no"},
            "GPUFIT_JIT='no' is not 0 (never build on import) or 1 (the default)",
        ),
    ],
)
def test_bad_backend_settings_are_one_line_without_traceback(command, env, message):
    result = run_python("-m", "gpufit", *command, env=env)
    assert result.returncode == 2
    assert result.stderr == f"gpufit: error: {message}\n"


def test_compiled_backend_that_is_missing_is_one_line(tmp_path):
    # a copy of the package without the built library, as in a fresh clone
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class _NoCompiled:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'gpufit._C':\n"
        "            raise ImportError('not built')\n"
        "sys.meta_path.insert(0, _NoCompiled())\n"
    )
    result = run_python(
        "-m",
        "gpufit",
        "info",
        env={"GPUFIT_BACKEND": "compiled", "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("gpufit: error: GPUFIT_BACKEND=compiled cannot be used: ")
    assert "gpufit._C is not importable" in result.stderr and "Traceback" not in result.stderr


def test_import_gpufit_is_lazy_and_its_names_resolve():
    code = (
        "import sys, gpufit; assert 'torch' not in sys.modules; "
        "assert 'fuse' in dir(gpufit); "
        "print(gpufit.fuse.__module__, gpufit.ops.__name__, type(gpufit.info()).__name__)"
    )
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["gpufit.nn", "gpufit.ops", "Info"]

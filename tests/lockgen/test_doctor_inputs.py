"""`doctor` and `verify` on bad interpreters and bad paths: a true one-line reason each
(issue 22, U7)."""

import io
import os
import sys

import pytest

from lockgen.cli import main
from lockgen.probe import MAX_COMMAND_OUTPUT, CommandResult, Prober, run_command


def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _bad_interpreters(tmp_path):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    return {
        "missing": (str(tmp_path / "nonexistent"), "No such file"),
        "loop": (str(loop), "symbolic links"),
        "folder": (str(tmp_path), "is a folder"),
        "not on PATH": ("no-such-python-here", "No such file"),
    }


@pytest.mark.parametrize("case", ["missing", "loop", "folder", "not on PATH"])
def test_doctor_on_an_interpreter_that_cannot_run_says_so(tmp_path, case):
    exe, says = _bad_interpreters(tmp_path)[case]
    rc, out, err = cli("doctor", "--python-exe", exe)
    assert rc == 2 and out == ""
    assert err.startswith("lockgen: error: --python-exe ") and says in err
    assert err.count("\n") == 1 and "torch" not in err


@pytest.mark.parametrize(
    "body",
    [
        "yes",  # the program itself prints forever
        "(yes &) ; sleep 600",  # a child it started prints forever
        "yes >&2",  # on stderr
        "head -c 2000000 /dev/zero; sleep 600",  # over the cap, then hangs
    ],
)
def test_endless_output_is_stopped_and_said(tmp_path, body):
    exe = _script(tmp_path, "yes.sh", body)
    res = run_command([str(exe)], timeout=300)
    assert res.overflowed and not res.timed_out and res.returncode is None
    p = Prober(python_exe=str(exe), run=run_command, torch_timeout=300)
    info, why = p.torch()
    assert info is None and "printed more than" in why and str(exe) in why
    assert any("printed more than" in x for x in p.problems)


def test_output_under_the_cap_comes_back_whole(tmp_path):
    exe = _script(
        tmp_path, "some.sh", f"head -c {MAX_COMMAND_OUTPUT - 10} /dev/zero; echo done >&2"
    )
    res = run_command([str(exe)], timeout=300)
    assert res.ok and len(res.stdout) == MAX_COMMAND_OUTPUT - 10 and res.stderr == "done\n"


def test_a_not_executable_file_is_named(tmp_path):
    p = Prober(python_exe="/dev/null/x", run=run_command)
    info, why = p.torch()
    assert info is None and "/dev/null/x cannot be run" in why


def test_a_runner_that_raises_without_a_message_is_named():
    def runner(argv, timeout):
        raise MemoryError()

    p = Prober(python_exe=sys.executable, run=runner)
    res = p._run(["nvidia-smi"])
    assert res == CommandResult(None, stderr="MemoryError")
    assert p.problems == ["nvidia-smi failed: MemoryError"]


def test_verify_names_a_symlink_loop(tmp_path):
    loop = tmp_path / "cu121.lock"
    os.symlink(loop, loop)
    rc, out, err = cli("verify", str(loop))
    assert rc == 2 and "symbolic links" in err and "does not exist" not in err


@pytest.mark.parametrize("body", ["yes", "exec 2>&-; yes"])
def test_doctor_blames_the_interpreter_not_torch(tmp_path, body):
    exe = _script(tmp_path, "yes.sh", body)
    rc, out, err = cli("doctor", "--python-exe", str(exe))
    assert rc == 1 and out.startswith("verdict: broken")
    assert "printed more than 1 MiB" in out and "is it a Python interpreter?" in out
    assert "torch is not importable" not in out and "pip install" not in out
    assert "fix: point --python-exe at the Python interpreter" in out

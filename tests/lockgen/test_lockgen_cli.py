"""The CLI end to end: exit codes and output, in process and through `python -m lockgen`."""

import argparse
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from checkout import ENVS
from lockgen_fakes import fake_machine

from lockgen.cli import COMMANDS, main
from lockgen.errors import LockgenError

REPO = Path(__file__).resolve().parents[2]


def cli(*argv, **inject):
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), out=out, err=err, **inject)
    return rc, out.getvalue(), err.getvalue()


def test_help_teaches_the_workflow(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    positions = [text.index(f"lockgen {name}") for name in ("matrix", "check", "doctor")]
    assert positions == sorted(positions)
    for later in ("render", "lock", "verify", "install", "flake"):
        assert later in text
    for cmd in COMMANDS:
        assert cmd.name in text


def test_no_command_prints_help():
    rc, out, _ = cli()
    assert rc == 2 and "workflow" in out


def test_check_tutorial_combination_fails():
    rc, out, err = cli(
        "check", "--torch", "1.10.1", "--cuda", "11.1", "--cudnn", "8.9.2", "--python", "3.8"
    )
    assert rc == 1 and err == ""
    assert out.startswith("incompatible:")
    assert "nearest valid combinations:" in out
    assert "torch 2.1 + torchvision 0.16 + CUDA 12.1 + cuDNN 8.9.2.26 + Python 3.8" in out


def test_check_real_combination_passes():
    rc, out, _ = cli(
        "check",
        "--torch",
        "2.1.2",
        "--cuda",
        "cu121",
        "--python",
        "3.11",
        "--driver",
        "535",
        "--gpu",
        "RTX 3090",
    )
    assert rc == 0 and out.startswith("compatible:")


def test_check_json():
    rc, out, _ = cli(
        "check", "--torch", "2.14.1", "--cuda", "13.0", "--gpu", "sm_70", "--format", "json"
    )
    data = json.loads(out)
    assert rc == 1 and data["ok"] is False
    assert [c["code"] for c in data["conflicts"] if c["severity"] == "error"] == ["gpu"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["check", "--torch", "2.1.x"], "bad torch version '2.1.x'"),
        (["check", "--cuda", "twelve"], "bad CUDA version 'twelve'"),
        (["check", "--gpu", "Voodoo"], "unknown GPU 'Voodoo'"),
        (["check"], "nothing to check"),
        (["targets", "cu999"], "unknown target 'cu999'"),
        (["matrix", "--torch", "3.1"], "torch 3.1 is not in the matrix"),
        (["matrix", "--torch", "2.8", "--cuda", "11.8"], "no build of the matrix matches"),
        (["--matrix", "/nonexistent/matrix.toml", "matrix"], "file not found"),
    ],
)
def test_bad_input_is_a_clear_error(argv, needle):
    rc, out, err = cli(*argv)
    assert rc == 2
    assert err.startswith("lockgen: error:") and needle in err
    assert "Traceback" not in err


def test_unknown_subcommand_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_matrix_table_and_filters():
    rc, out, _ = cli("matrix", "--torch", "2.1.2")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:5] == ["torch", "vision", "python", "cuda", "cudnn"]
    rows = [ln.split() for ln in lines[1:] if ln.startswith("2.1 ")]
    assert [r[3] for r in rows] == ["11.8", "12.1"]
    assert rows[1][4] == "8.9.2.26" and rows[1][5] == "530.30.02"


def test_matrix_json_cuda_filter():
    rc, out, _ = cli("matrix", "--cuda", "cu118", "--format", "json")
    rows = json.loads(out)
    assert rc == 0 and rows
    assert {r["cuda"] for r in rows} == {"11.8"}
    assert [r["torch"] for r in rows] == ["2.0", "2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "2.7"]


def test_targets_json_exposes_what_render_needs():
    rc, out, _ = cli("targets", "cu129", "--format", "json")
    t = json.loads(out)
    assert rc == 0
    assert t["pip_index_url"] == "https://download.pytorch.org/whl/cu129"
    assert t["virtual_packages"]["linux-64"]["__cuda"] == "12.9"
    assert "cuda-version 12.9.*" in t["conda_specs"]
    assert t["install"]["conda"]["status"] in ("locked", "no lock")


def test_doctor_with_injected_machine(tmp_path):
    prober, _ = fake_machine(
        tmp_path,
        proc_driver="proc-driver-535.txt",
        smi="nvidia-smi-535-old-banner.txt",
        query="query-rtx3090.txt",
        torch="torch-2.14.1-cu130-nogpu.json",
    )
    rc, out, _ = cli("doctor", prober=prober)
    assert rc == 1
    lines = out.splitlines()
    assert lines[0] == "verdict: broken"
    assert lines[-2].startswith("fix: install the CUDA 12.6 build of torch 2.14.1 (target cu126)")
    assert "upgrade the NVIDIA driver to >= 580.65.06" in lines[-2]
    assert lines[-1].strip().startswith("pip install torch==2.14.1")


def test_doctor_json_with_injected_machine(tmp_path):
    prober, _ = fake_machine(tmp_path, torch="torch-2.14.1-cpu.json")
    rc, out, _ = cli("doctor", "--format", "json", prober=prober)
    data = json.loads(out)
    assert rc == 0 and data["verdict"] == "works" and data["fix"]["target"] is None


# -- through a subprocess ------------------------------------------------------------------


def run_module(*argv):
    return subprocess.run(
        [sys.executable, "-m", "lockgen", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_python_m_lockgen_check():
    # a bare branch stands for its released drivers: R525 runs CUDA 12.8 from 525.60.13 on
    p = run_module("check", "--torch", "2.8", "--cuda", "12.8", "--driver", "525")
    assert p.returncode == 0 and p.stdout.startswith("compatible with warnings:")
    assert "525.60.13" in p.stdout and "Traceback" not in p.stderr
    p = run_module("check", "--torch", "2.8", "--cuda", "12.8", "--driver", "520.61.05")
    assert p.returncode == 1 and "525.60.13" in p.stdout


def test_python_m_lockgen_bad_input():
    p = run_module("targets", "nope")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "lockgen: error: unknown target 'nope' (known targets: cpu, "
        "cu118, cu121, cu124, cu126, cu128, cu129, cu130, sft-cu130, sft-cu128-xformers, "
        "trl-vllm-cu130)"
    )


def test_one_target_is_a_table_by_default():
    rc, out, _ = cli("targets", "cu130")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("cu130: torch 2.14.1 + torchvision 0.29.1")
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines[1:])
    assert rows["pip index"] == "https://download.pytorch.org/whl/cu130"
    assert "__cuda=13.0" in rows["virtual packages"]
    assert rows["GPU archs"].endswith("12.0+PTX")
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_install_given_a_pip_hash_lock_says_what_install_takes(tmp_path):
    lock = tmp_path / "cu130.requirements.txt"
    lock.write_text(
        "# comment\n--index-url https://pypi.org/simple\n\ntorch==2.14.1 \\\n"
        "    --hash=sha256:" + "a" * 64 + "\n"
    )
    rc, out, err = cli("install", str(lock), "--prefix", str(tmp_path / "env"))
    assert rc == 2 and out == ""
    assert "is a pip requirements file; lockgen install takes a conda lockfile" in err
    assert f"pip install --require-hashes -r {lock}" in err
    assert not (tmp_path / "env").exists()


def test_a_misspelt_seam_fails_instead_of_running_the_real_thing(tmp_path):
    prober, _ = fake_machine(tmp_path, torch="torch-2.14.1-cpu.json")
    with pytest.raises(TypeError, match="probr"):
        main(["doctor"], out=io.StringIO(), probr=prober)


@pytest.mark.parametrize("command", ["doctor", "verify envs/cu130.requirements.txt"])
def test_json_flag_names_its_one_spelling(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command.split(), "--json"], out=io.StringIO())
    assert exc.value.code == 2
    assert "lockgen: error: --json is now --format json" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["matrix", "targets", "check", "doctor", "verify"])
def test_every_command_with_machine_output_takes_format_json(command):
    parser = next(c for c in COMMANDS if c.name == command)
    p = argparse.ArgumentParser()
    parser.configure(p)
    assert "json" in next(a for a in p._actions if a.dest == "format").choices


@pytest.mark.parametrize(
    "channel, why",
    [
        ("http://[::1", "is not a URL (Invalid IPv6 URL)"),
        ("https://example.invalid:99999/x", "is not a URL (Port out of range"),
        ("ftp://example.invalid/conda", "a channel is an http(s) or file URL"),
    ],
)
def test_lock_names_a_bad_channel_url_not_the_env_file(channel, why, capsys):
    """Issue 22 U3: `--channel 'http://[::1'` blamed envs/cu121.yml; it is the flag's value."""
    with pytest.raises(SystemExit) as exit_:
        main(["lock", "cu121", "--channel", channel], out=io.StringIO())
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert why in err and "argument --channel" in err and ".yml" not in err


def test_an_error_of_several_lines_is_printed_as_one(tmp_path, capsys):
    """Issue 22 U3: errors from the engines underneath ("...\\nCaused by: ...") are one line."""

    class Solver:
        def solve(self, job):
            raise LockgenError("could not read the channel\nCaused by: no such file\n")

    for spec in ("cu121.yml", "cu121.virtual-packages.yml"):  # what `lockgen render` wrote
        (tmp_path / spec).write_text((ENVS / spec).read_text())
    rc = main(["lock", "cu121", "--envs", str(tmp_path)], out=io.StringIO(), solver=Solver())
    err = capsys.readouterr().err
    assert (
        rc == 2 and err == "lockgen: error: could not read the channel; Caused by: no such file\n"
    )

"""`check`: rejects what no release shipped or this hardware cannot run, accepts real ones."""

import pytest

from lockgen.check import Request, check, format_check
from lockgen.errors import LockgenError
from lockgen.versions import Version


def run(matrix, **kw):
    return check(matrix, Request.from_strings(matrix, **kw))


def fields(result, severity="error"):
    return {c.field for c in result.conflicts if c.severity == severity}


def test_tutorial_combination_is_rejected_with_the_right_reasons(matrix):
    r = run(matrix, torch="1.10.1", cuda="11.1", cudnn="8.9.2", python="3.8")
    assert not r.ok and r.verdict == "incompatible"
    assert fields(r) == {"torch", "cuda", "cudnn"}
    msgs = {c.field: c.message for c in r.errors}
    assert "older than the oldest release the matrix covers (1.13)" in msgs["torch"]
    assert "CUDA 11.1" in msgs["cuda"]
    # cuDNN 8.9.2 shipped only with the CUDA 12.1 builds of torch 2.1-2.3
    assert "CUDA 12.1 builds of torch 2.1-2.3" in msgs["cudnn"]
    assert "never with CUDA 11.1" in msgs["cudnn"]
    # suggestions are real combinations that themselves pass the check
    assert r.suggestions
    for s in r.suggestions:
        again = run(
            matrix, torch=s.torch.raw, cuda=s.cuda.raw, cudnn=s.cudnn.raw, python=s.python.raw
        )
        assert again.ok, format_check(again)
    best = r.suggestions[0]
    assert (best.torch, best.cuda, best.cudnn) == (
        Version.parse("2.1"),
        Version.parse("12.1"),
        Version.parse("8.9.2.26"),
    )
    assert best.python == Version.parse("3.8")
    assert any(s.torch == Version.parse("1.13") for s in r.suggestions)


def test_real_combination_is_accepted(matrix):
    r = run(matrix, torch="2.1.2", cuda="cu121", python="3.11", driver="535")
    assert r.ok and not r.warnings, format_check(r)
    assert r.build.cudnn == Version.parse("8.9.2.26")
    assert not r.suggestions


@pytest.mark.parametrize(
    "kw",
    [
        dict(
            torch="2.1.2",
            cuda="12.1",
            cudnn="8.9.2",
            python="3.11",
            driver="535.104.05",
            gpu="RTX 3090",
        ),
        dict(
            torch="2.14.1",
            cuda="13.0",
            cudnn="9.24.0",
            python="3.12",
            driver="580.95.05",
            gpu="H100",
        ),
        dict(torch="2.8.0", cuda="12.8", python="3.13", gpu="sm_70", driver="570.26"),
        dict(torch="1.13.1", cuda="11.7", python="3.10", driver="470.82", gpu="T4"),
        dict(torch="2.5.1", cuda="cpu", python="3.12"),
        dict(torch="2.11", cuda="13.0", cudnn="9.17.1.4"),  # the RELEASE.md cuDNN, noted
    ],
)
def test_more_real_combinations_pass(matrix, kw):
    r = run(matrix, **kw)
    assert r.ok, format_check(r)


def test_volta_is_rejected_for_cuda_13(matrix):
    r = run(matrix, torch="2.14.1", cuda="13.0", gpu="V100")
    assert fields(r) == {"gpu"}
    assert "sm_70" in r.errors[0].message
    # the nearest valid combinations keep a Volta-capable build
    assert r.suggestions
    for s in r.suggestions:
        assert s.cuda is not None and s.cuda < Version.parse("13.0")
        assert run(matrix, torch=s.torch.raw, cuda=s.cuda.raw, gpu="V100").ok
    assert r.suggestions[0].torch == Version.parse("2.14")  # keeps the torch release


def test_newer_gpu_of_same_major_runs_older_minor_code(matrix):
    # 8.9 (RTX 4090) is not in cu121's arch list but runs its sm_86 code
    r = run(matrix, torch="2.1", cuda="12.1", gpu="RTX 4090")
    assert r.ok and not r.warnings


def test_blackwell_is_rejected_before_cu128(matrix):
    r = run(matrix, torch="2.6", cuda="12.6", gpu="RTX 5090")
    assert fields(r) == {"gpu"}
    assert all(s.cuda >= Version.parse("12.8") for s in r.suggestions)


def test_driver_525_is_rejected_for_cu128(matrix):
    r = run(matrix, torch="2.8", cuda="cu128", driver="525")
    assert fields(r) == {"driver"}
    msg = r.errors[0].message
    assert "525.60.13" in msg and "570.26" in msg
    assert r.suggestions and all(s.cuda.major == 11 for s in r.suggestions)


def test_driver_between_floor_and_toolkit_driver_warns(matrix):
    r = run(matrix, torch="2.8", cuda="12.8", driver="535.104.05")
    assert r.ok and fields(r, "warning") == {"driver"}
    assert "minor version compatibility" in r.warnings[0].message
    assert r.verdict == "compatible with warnings"


def test_driver_ignored_for_cpu_build(matrix):
    assert run(matrix, torch="2.8", cuda="cpu", driver="390.1").ok


def test_python_outside_the_wheels(matrix):
    r = run(matrix, torch="2.9", cuda="12.8", python="3.9")
    assert fields(r) == {"python"}
    got = {(s.torch.raw, s.python.raw) for s in r.suggestions}
    assert ("2.9", "3.10") in got  # keeps torch and CUDA, nearest Python
    assert ("2.8", "3.9") in got  # keeps CUDA and Python, nearest torch
    assert fields(run(matrix, torch="2.2", python="3.12"), "warning") == {"python"}


def test_wrong_cudnn_for_a_real_build(matrix):
    r = run(matrix, torch="2.1", cuda="12.1", cudnn="8.7.0")
    assert fields(r) == {"cudnn"}
    assert "ships cuDNN 8.9.2.26" in r.errors[0].message


def test_missing_build(matrix):
    r = run(matrix, torch="2.8", cuda="11.8")
    assert fields(r) == {"cuda"}
    assert "torch 1.13" not in r.errors[0].message
    assert "2.0-2.7" in r.errors[0].message


def test_torchvision_pairing(matrix):
    assert fields(run(matrix, torch="2.1", torchvision="0.15")) == {"torchvision"}
    assert run(matrix, torch="2.1.2", torchvision="0.16.2").ok


def test_local_version_label_gives_the_build(matrix):
    r = run(matrix, torch="2.14.1+cu130", gpu="V100")
    assert r.request.cuda == Version.parse("13.0") and not r.ok
    assert run(matrix, torch="2.14.1+cpu", gpu="V100").request.cpu


@pytest.mark.parametrize(
    "kw", [dict(torch="2.1.x"), dict(cuda="twelve"), dict(gpu="Voodoo 5"), dict(driver="R535")]
)
def test_malformed_input_raises_clear_errors(matrix, kw):
    with pytest.raises(LockgenError):
        Request.from_strings(matrix, **kw)


def test_no_valid_combination_says_so(matrix):
    # a Kepler sm_35 device with a driver that runs nothing in the matrix
    r = run(matrix, torch="2.1", cuda="11.8", driver="400.1", gpu="sm_35")
    assert not r.ok and not r.suggestions
    assert "no valid combination" in format_check(r)


def test_json_shape(matrix):
    data = run(matrix, torch="2.8", cuda="12.8", driver="525").to_json()
    assert data["ok"] is False and data["verdict"] == "incompatible"
    assert data["conflicts"][0]["field"] == "driver"
    assert set(data["suggestions"][0]) == {
        "torch",
        "torchvision",
        "cuda",
        "cudnn",
        "python",
        "target",
        "keeps",
    }


def test_driver_alone_says_what_it_runs(matrix):
    r = run(matrix, driver="535.104.05")
    assert r.ok
    text = " ".join(c.message for c in r.conflicts)
    assert "up to 12.2 fully" in text and "CUDA 12.x" in text
    r = run(matrix, driver="400")
    assert r.ok and fields(r, "warning") == {"driver"}
    assert "450.80.02" in r.warnings[0].message

"""`check` judges what the user said, down to the detail: a local tag, every GPU, only the
releases the matrix knows, a missing fact as unverified, and true reasons."""

import io

import pytest

from lockgen.check import Request, check, format_check
from lockgen.cli import main
from lockgen.errors import LockgenError


def run(matrix, **kw):
    return check(matrix, Request.from_strings(matrix, **kw))


def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


# -- a local tag is what the user said --------------------------------------------------------


@pytest.mark.parametrize(
    "kw, tag, other",
    [
        ({"torch": "2.5.1+cu124", "cuda": "11.8"}, "CUDA 12.4", "CUDA 11.8"),
        ({"torch": "2.14.1+cpu", "cuda": "13.0", "gpu": "sm_90"}, "CPU build", "CUDA 13.0"),
        ({"torch": "2.14.1+cu130", "cuda": "cpu"}, "CUDA 13.0", "CPU build"),
        ({"torch": "2.14.1+cu130", "cuda": "cu126"}, "CUDA 13.0", "CUDA 12.6"),
        ({"torchvision": "0.23.0+cu126", "cuda": "12.8"}, "CUDA 12.6", "CUDA 12.8"),
        ({"torch": "2.5.1+cu124", "torchvision": "0.20.1+cu121"}, "CUDA 12.1", "CUDA 12.4"),
        ({"torch": "2.5.1+cpu", "torchvision": "0.20.1+cu124"}, "CUDA 12.4", "CPU build"),
    ],
)
def test_a_local_tag_that_contradicts_the_build_is_refused(matrix, kw, tag, other):
    with pytest.raises(LockgenError) as e:
        Request.from_strings(matrix, **kw)
    assert tag in str(e.value) and other in str(e.value)


@pytest.mark.parametrize(
    "kw, cuda",
    [
        ({"torch": "2.5.1+cu124", "cuda": "12.4"}, "12.4"),
        ({"torch": "2.5.1+cu124", "cuda": "cu124"}, "12.4"),
        ({"torchvision": "0.20.1+cu121"}, "12.1"),
        ({"torch": "2.5.1+cu124", "torchvision": "0.20.1+cu124"}, "12.4"),
    ],
)
def test_a_local_tag_that_agrees_names_the_build(matrix, kw, cuda):
    r = run(matrix, **kw)
    assert r.ok and {mt.candidate.cuda.raw for mt in r.matches} == {cuda}


def test_a_cpu_tag_alone_asks_for_the_cpu_build(matrix):
    r = run(matrix, torchvision="0.20.1+cpu")
    assert r.ok and all(mt.candidate.build is None for mt in r.matches)


# -- every GPU given ----------------------------------------------------------------------------

MIXED = [
    "NVIDIA H100 80GB HBM3\nTesla V100-SXM2-32GB",
    "NVIDIA H100 80GB HBM3\r\nTesla V100-SXM2-32GB\n",
    "H100, V100",
    "sm_90,sm_70",
    "V100; H100",
]


@pytest.mark.parametrize("gpu", MIXED)
def test_every_gpu_is_judged(matrix, gpu):
    r = run(matrix, torch="2.14", cuda="13.0", gpu=gpu)
    assert not r.ok
    assert any("sm_70" in c.message for c in r.errors)
    assert len(r.request.gpus) == 2


def test_several_gpus_that_all_run_are_compatible(matrix):
    r = run(matrix, torch="2.14", cuda="13.0", gpu="A100, H100")
    assert r.ok and {g.sm for g in r.request.gpus} == {"sm_80", "sm_90"}
    # without a CUDA version, only builds that run on both are listed
    r = run(matrix, torch="2.14", gpu="H100\nV100")
    assert r.ok and {mt.candidate.cuda.raw for mt in r.matches} == {"12.6"}


def test_an_unknown_gpu_among_several_is_named(matrix):
    with pytest.raises(LockgenError, match="Frobnicator"):
        Request.from_strings(matrix, gpu="H100, Frobnicator 9000")
    with pytest.raises(LockgenError, match="no GPU"):
        Request.from_strings(matrix, gpu=" ,\n")


# -- only the releases the matrix knows ---------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"torch": "2.5.9"},
        {"torch": "2.1.99", "cuda": "12.1"},
        {"torch": "2.8.0rc3"},
        {"torch": "2.15.0a0"},
        {"torch": "2.8.0.post1"},
        {"torch": "2.8.0.dev20250101"},
        {"torch": "2.8.0.1"},
        {"torch": "2.12.3"},
        {"torch": "2.6.1", "cuda": "12.4", "python": "3.12"},
        {"torch": "2.5.1rc1+cu124"},
        {"torchvision": "0.23.0rc1"},
    ],
)
def test_an_unknown_release_is_never_compatible(matrix, kw):
    r = run(matrix, **kw)
    assert not r.ok and not r.matches
    assert any("unknown release" in c.message for c in r.errors), format_check(r)


@pytest.mark.parametrize("torch", ["2.5", "2.5.0", "2.5.1", "2.1.2", "2.14.1", "2.12.0", "2.9.1"])
def test_known_releases_still_pass(matrix, torch):
    assert run(matrix, torch=torch).ok


# -- a missing fact is unverified, not a refusal -----------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"platform": "win-64", "cuda": "13.0", "driver": "999.99"},
        {"platform": "win-64", "torch": "2.14", "driver": "999.99", "gpu": "RTX 5090"},
    ],
)
def test_a_missing_driver_floor_is_unverified(matrix, kw):
    r = run(matrix, **kw)
    assert r.ok, format_check(r)
    assert any("driver floor" in u for u in r.unverified)


def test_a_missing_floor_keeps_the_gpu_window(matrix):
    # the GPU's own driver window still rules: a driver that predates Blackwell cannot run it
    r = run(matrix, platform="win-64", cuda="13.0", driver="400", gpu="RTX 5090")
    assert not r.ok


# -- no CUDA build left for a driver or GPU the user gave ---------------------------------------


@pytest.mark.parametrize(
    "kw, floor",
    [
        ({"torch": "2.14", "driver": "470"}, "525"),
        ({"torch": "2.14", "driver": "470.57.02", "python": "3.12"}, "525"),
        ({"driver": "400"}, "450.80.02"),
    ],
)
def test_no_cuda_build_left_is_incompatible(matrix, kw, floor):
    r = run(matrix, **kw)
    assert not r.ok and r.verdict == "incompatible"
    msg = " ".join(c.message for c in r.errors)
    assert "CPU build" in msg and floor in msg
    # never quotes a floor the driver meets
    if kw["driver"].startswith("470"):
        assert "450.80.02" not in msg
        assert "CUDA 11.8" in msg  # what that driver does run


def test_no_cuda_build_left_exits_1():
    rc, out, _ = cli("check", "--torch", "2.14", "--driver", "470")
    assert rc == 1 and out.startswith("incompatible")
    assert "compatible with warnings" not in out


# -- true reasons --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"platform": "osx-arm64", "gpu": "sm_80"},
        {"platform": "osx-64", "gpu": "RTX 3090"},
        {"platform": "osx-arm64", "driver": "535"},
        {"platform": "osx-64", "driver": "550.54.14", "torch": "2.2"},
    ],
)
def test_macos_says_it_has_no_cuda(matrix, kw):
    r = run(matrix, **kw)
    assert not r.ok
    msg = " ".join(c.message for c in r.errors)
    assert "macOS has no CUDA" in msg and "sm_37" not in msg and "too old" not in msg


@pytest.mark.parametrize("python", ["3.14t", "3.13t", " 3.13t "])
def test_free_threaded_python_is_named(matrix, python):
    with pytest.raises(LockgenError, match="free-threaded"):
        Request.from_strings(matrix, python=python)


@pytest.mark.parametrize(
    "kw", [{"torch": "2.8", "cuda": "12.8"}, {"torch": "2.5", "cuda": "12.1"}, {"torch": "2.14"}]
)
def test_windows_never_names_a_linux_only_target(matrix, kw):
    r = run(matrix, platform="win-64", **kw)
    names = {mt.target for mt in r.matches} | {s.target for s in r.suggestions}
    for name in names - {None}:
        assert "win-64" in matrix.targets[name].platforms, name
    assert "(target cu128)" not in format_check(r)


@pytest.mark.parametrize("gpu", ["Tesla K80", "sm_37", "Tesla K80\nRTX 4090"])
def test_a_gpu_with_no_cuda_build_left_names_the_cpu_build(matrix, gpu):
    r = run(matrix, torch="2.14", gpu=gpu)
    assert not r.ok and r.verdict == "incompatible"
    msg = " ".join(c.message for c in r.errors)
    assert "only the CPU build (torch 2.14 + CPU)" in msg and "builds that run on it" in msg


def test_a_gpu_no_build_runs_on_names_the_cpu_build(matrix):
    r = run(matrix, gpu="sm_35")
    assert not r.ok and "only a CPU build (--cuda cpu)" in r.errors[0].message


@pytest.mark.parametrize("python", ["3.14.0rc1", "3.13.0a2", "3.12.1.post1"])
def test_a_python_pre_release_is_unknown(matrix, python):
    r = run(matrix, python=python)
    assert not r.ok and any("unknown release" in c.message for c in r.errors)


def test_a_python_patch_says_it_is_judged_as_the_minor(matrix):
    r = run(matrix, python="3.13.99", torch="2.8")
    assert r.ok and any("judged as Python 3.13" in c.message for c in r.conflicts)
    r = run(matrix, python="3.13", torch="2.8")
    assert r.ok and not any("judged as" in c.message for c in r.conflicts)


def test_a_cuda_build_known_for_linux_only_says_so_on_windows(matrix):
    r = run(matrix, platform="win-64", cuda="12.4", driver="528.33")
    assert not r.ok
    msg = r.errors[0].message
    assert "for linux-64 only (no win-64 arch list for them)" in msg

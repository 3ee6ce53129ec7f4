"""The matrix agrees with the researched facts, and every target resolves."""

import pytest

from lockgen.errors import LockgenError
from lockgen.versions import Capability, Version

V = Version.parse

# Transcribed by hand from the researched release table (RELEASE.md + PyPI wheel metadata):
# torch -> (torchvision, python wheels, PyPI default CUDA, its cuDNN, CUDA builds)
FACTS = {
    "1.13": ("0.14", ("3.7", "3.11"), "11.7", "8.5.0.96", {"11.6", "11.7"}),
    "2.0": ("0.15", ("3.8", "3.11"), "11.7", "8.5.0.96", {"11.7", "11.8"}),
    "2.1": ("0.16", ("3.8", "3.11"), "12.1", "8.9.2.26", {"11.8", "12.1"}),
    "2.2": ("0.17", ("3.8", "3.12"), "12.1", "8.9.2.26", {"11.8", "12.1"}),
    "2.3": ("0.18", ("3.8", "3.12"), "12.1", "8.9.2.26", {"11.8", "12.1"}),
    "2.4": ("0.19", ("3.8", "3.12"), "12.1", "9.1.0.70", {"11.8", "12.1", "12.4"}),
    "2.5": ("0.20", ("3.9", "3.13"), "12.4", "9.1.0.70", {"11.8", "12.1", "12.4"}),
    "2.6": ("0.21", ("3.9", "3.13"), "12.4", "9.1.0.70", {"11.8", "12.4", "12.6"}),
    "2.7": ("0.22", ("3.9", "3.13"), "12.6", "9.5.1.17", {"11.8", "12.6", "12.8"}),
    "2.8": ("0.23", ("3.9", "3.13"), "12.8", "9.10.2.21", {"12.6", "12.8", "12.9"}),
    "2.9": ("0.24", ("3.10", "3.14"), "12.8", "9.10.2.21", {"12.6", "12.8", "13.0"}),
    "2.10": ("0.25", ("3.10", "3.14"), "12.8", "9.10.2.21", {"12.6", "12.8", "13.0"}),
    "2.11": ("0.26", ("3.10", "3.14"), "13.0", "9.19.0.56", {"12.6", "12.8", "13.0"}),
    "2.12": ("0.27", ("3.10", "3.14"), "13.0", "9.20.0.48", {"12.6", "13.0", "13.2"}),
    "2.13": ("0.28", ("3.10", "3.14"), "13.0", "9.20.0.48", {"12.6", "13.0", "13.2"}),
    "2.14": ("0.29", ("3.10", "3.14"), "13.0", "9.24.0.43", {"12.6", "13.0", "13.2"}),
    "2.15": (None, ("3.11", "3.15"), "13.2", "9.26.0.51", {"12.6", "13.0", "13.2"}),
}


def test_every_release_of_the_facts_is_in_the_matrix_and_nothing_else(matrix):
    assert [r.torch.raw for r in matrix.releases] == list(FACTS)


@pytest.mark.parametrize("torch", list(FACTS))
def test_release_agrees_with_facts(matrix, torch):
    tv, (py_lo, py_hi), pd_cuda, pd_cudnn, builds = FACTS[torch]
    r = matrix.release(torch)
    assert (r.torchvision.raw if r.torchvision else None) == tv
    assert r.python[0] == V(py_lo) and r.python[-1] == V(py_hi)
    assert r.pypi_default_cuda == V(pd_cuda)
    assert r.pypi_default_cudnn == V(pd_cudnn)
    assert {b.cuda.raw for b in r.builds} == builds


@pytest.mark.parametrize(
    "torch,cuda,cudnn,status",
    [
        ("1.13", "11.6", "8.3.2.44", "stable"),
        ("2.0", "11.8", "8.7.0.84", "experimental"),
        ("2.1", "11.8", "8.7.0.84", "stable"),
        ("2.6", "12.6", "9.5.1.17", "experimental"),
        ("2.7", "12.8", "9.7.1.26", "experimental"),
        ("2.9", "13.0", "9.13.0.50", "experimental"),
        ("2.10", "13.0", "9.15.1.9", "experimental"),
        ("2.11", "12.8", "9.17.1.4", "stable"),
        ("2.12", "13.2", "9.20.0.48", "experimental"),
        ("2.14", "13.2", "9.24.0.43", "stable"),
    ],
)
def test_build_cudnn_agrees_with_facts(matrix, torch, cuda, cudnn, status):
    b = matrix.release(torch).build(V(cuda))
    assert b.cudnn == V(cudnn) and b.status == status


def test_unverified_facts_are_marked(matrix):
    assert not matrix.release("2.15").verified
    assert "torchvision" in matrix.release("2.15").unverified
    assert not matrix.release("2.15").build(V("12.6")).verified
    assert "released" in matrix.release("1.13").unverified
    assert not matrix.cuda_toolkit(V("13.2")).verified
    assert matrix.cuda_toolkit(V("13.1")).verified
    # the 2.11 cuDNN disagreement is recorded, with the wheel metadata winning
    b = matrix.release("2.11").build(V("13.0"))
    assert b.cudnn == V("9.19.0.56") and b.cudnn_release_md == V("9.17.1.4")


@pytest.mark.parametrize(
    "cuda,full,minimum",
    [
        ("11.8", "520.61.05", "450.80.02"),
        ("12.1", "530.30.02", "525.60.13"),
        ("12.4", "550.54.14", "525.60.13"),
        ("12.8", "570.26", "525.60.13"),
        ("13.0", "580.65.06", "580"),
    ],
)
def test_driver_floors_agree_with_facts(matrix, cuda, full, minimum):
    f = matrix.driver_floor(V(cuda))
    assert f.full == V(full) and f.minimum == V(minimum)


def test_windows_floors(matrix):
    assert matrix.driver_floor(V("12.4"), "windows").full == V("551.61")
    assert matrix.driver_floor(V("12.4"), "windows").minimum == V("528.33")
    assert matrix.driver_floor(V("13.0"), "windows") is None


def test_arch_lists(matrix):
    a = matrix.arch_list(V("2.8"), V("12.8"))
    assert a.verified and Capability.parse("7.0") in a.archs
    a = matrix.arch_list(V("2.14"), V("13.0"))
    assert a.names[-1] == "12.0+PTX" and not a.runs_on(Capability.parse("7.0"))
    assert matrix.arch_list(V("2.14"), V("13.0"), "win-64").names[-1] == "12.0"
    # only a conda-channel list exists for 2.5 + CUDA 12.1: used, marked unverified for pip
    fallback = matrix.arch_list(V("2.5"), V("12.1"))
    assert fallback is not None and not fallback.verified
    assert matrix.arch_list(V("2.5"), V("12.1"), channel="pytorch").verified


@pytest.mark.parametrize(
    "text,cap",
    [
        ("V100", "7.0"),
        ("T4", "7.5"),
        ("NVIDIA A100-SXM4-80GB", "8.0"),
        ("NVIDIA GeForce RTX 3090", "8.6"),
        ("RTX 4090", "8.9"),
        ("NVIDIA H100 80GB HBM3", "9.0"),
        ("H200", "9.0"),
        ("B200", "10.0"),
        ("RTX 5090", "12.0"),
        ("sm_86", "8.6"),
    ],
)
def test_gpu_names(matrix, text, cap):
    assert matrix.gpu_capability(text)[0] == Capability.parse(cap)


def test_unknown_gpu_and_release_errors_list_known_ones(matrix):
    with pytest.raises(LockgenError, match="RTX 3090"):
        matrix.gpu_capability("GTX 9999")
    with pytest.raises(LockgenError, match="known releases: 1.13"):
        matrix.release("3.0")


REQUIRED_TARGETS = ["cpu", "cu118", "cu121", "cu124", "cu126", "cu128", "cu130"]


def test_required_targets_exist(matrix):
    assert set(REQUIRED_TARGETS) <= set(matrix.targets)


@pytest.mark.parametrize("name", REQUIRED_TARGETS)
def test_every_target_resolves(matrix, name):
    t = matrix.target(name)
    assert t.release.supports_python(t.python)
    assert t.torchvision.minor == t.release.torchvision
    assert t.tag == name
    assert t.pip_index_url == f"https://download.pytorch.org/whl/{name}"
    assert t.pip_requirements[0].startswith("torch==")
    assert t.conda_channels
    assert any(s.startswith("pytorch ") for s in t.conda_specs)
    if name == "cpu":
        assert t.cuda is None and t.build is None and t.arch_list is None
        assert "__cuda" not in t.virtual_packages["linux-64"]
    else:
        assert t.build is not None and t.build.cuda == t.cuda and t.cudnn is not None
        assert t.arch_list.archs and t.driver_floor.minimum <= t.driver_floor.full
        assert t.virtual_packages["linux-64"]["__cuda"] == t.cuda.raw
        assert t.virtual_packages["linux-64"]["__glibc"] == "2.28"


def test_target_conda_routes(matrix):
    cu121 = matrix.target("cu121")
    assert cu121.conda_channels == ("pytorch", "nvidia", "defaults")
    assert "pytorch-cuda 12.1.*" in cu121.conda_specs
    assert "pytorch 2.5.* *cuda*" in cu121.conda_specs
    cu130 = matrix.target("cu130")
    assert cu130.conda_channels == ("conda-forge",)
    assert "pytorch 2.14.1 cuda*" in cu130.conda_specs
    assert "cuda-version 13.0.*" in cu130.conda_specs
    assert "pytorch 2.14.1 cpu*" in matrix.target("cpu").conda_specs
    assert cu130.pip_requirements == ("torch==2.14.1", "torchvision==0.29.1")
    assert matrix.target("cu128").pip_requirements == ("torch==2.8.*", "torchvision==0.23.*")


def test_unknown_target_lists_known_ones(matrix):
    with pytest.raises(LockgenError, match="unknown target 'cu999'.*cu121"):
        matrix.target("cu999")

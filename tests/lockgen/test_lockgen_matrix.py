"""The matrix agrees with the researched facts, and every target resolves."""

import dataclasses

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
    "2.15": (None, ("3.11", "3.15"), "13.2", "9.26.0.51", {"12.6", "13.0", "13.2", "13.4"}),
}

# PyPI upload date of the x.y.0 wheels (the earliest file of the release on pypi.org/simple).
RELEASED = {
    "1.13": "2022-10-28",
    "2.0": "2023-03-15",
    "2.4": "2024-07-24",
    "2.8": "2025-08-06",
    "2.11": "2026-03-23",
    "2.14": "2026-09-02",
    "2.15": "2026-10-28",
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


@pytest.mark.parametrize("torch", list(RELEASED))
def test_release_dates_are_the_pypi_upload_dates(matrix, torch):
    assert matrix.release(torch).released == RELEASED[torch]


def test_unverified_facts_are_marked(matrix):
    assert not matrix.release("2.15").verified
    assert matrix.release("2.15").unverified == ("torchvision",)
    assert not matrix.release("2.15").build(V("12.6")).verified
    assert not matrix.release("2.15").build(V("13.4")).verified
    assert matrix.release("1.13").verified and not matrix.release("1.13").unverified
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
    # the installed 2.14.1 wheel reports sm_75..sm_120 and no compute_120: no PTX
    a = matrix.arch_list(V("2.14"), V("13.0"))
    assert a.verified and a.names == ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0")
    assert not a.runs_on(Capability.parse("7.0"))
    assert not any(
        x.ptx for r in ("2.9", "2.13", "2.15") for x in matrix.arch_list(V(r), V("13.0")).archs
    )
    assert matrix.arch_list(V("2.14"), V("13.0"), "win-64").names[-1] == "12.0"
    # 2.4 + CUDA 12.4: sm_50..sm_90 (cuobjdump of the pytorch channel's packages)
    a = matrix.arch_list(V("2.4"), V("12.4"), channel="pytorch")
    assert a.verified and a.names == ("5.0", "6.0", "6.1", "7.0", "7.5", "8.0", "8.6", "9.0")
    # only a conda-channel list exists for 2.5 + CUDA 12.1: used, marked unverified for pip
    fallback = matrix.arch_list(V("2.5"), V("12.1"))
    assert fallback is not None and not fallback.verified
    assert matrix.arch_list(V("2.5"), V("12.1"), channel="pytorch").verified


def test_conda_forge_213_builds_follow_the_feedstock_variants(matrix):
    # .ci_support/: linux-64 and linux-aarch64 CUDA 12.9 + 13.0, win-64 CUDA 12.8 + 13.0
    def cf(cuda, platform):
        return matrix.arch_list(V("2.13"), V(cuda), platform, "conda-forge")

    for platform in ("linux-64", "linux-aarch64"):
        assert cf("12.9", platform).channel == "conda-forge" and cf("12.9", platform).verified
        assert cf("12.8", platform) is None
    assert cf("12.8", "win-64").verified and cf("12.9", "win-64") is None
    assert "8.7" in cf("13.0", "linux-aarch64").names and "8.7" not in cf("13.0", "linux-64").names


def test_virtual_packages_keep_conda_locks_defaults(matrix):
    # conda-lock's spec file replaces its defaults, __archspec included
    assert matrix.virtual_packages["linux-64"]["__archspec"] == "1 x86_64"


@pytest.mark.parametrize(
    "torch,platform,python,ok",
    [
        ("1.13", "linux-64", "3.11", True),
        ("1.13", "win-64", "3.11", False),  # cp311 wheels only for linux x86_64
        ("2.5", "linux-64", "3.13", True),
        ("2.5", "linux-aarch64", "3.13", False),
        ("2.2", "osx-64", "3.12", True),
        ("2.3", "osx-64", "3.11", False),  # no Intel macOS wheels from 2.3 on
    ],
)
def test_python_wheels_per_platform(matrix, torch, platform, python, ok):
    assert matrix.release(torch).supports_python(V(python), platform) is ok


@pytest.mark.parametrize(
    "torch,python,ok",
    [
        ("1.13", "3.11", False),
        ("2.5", "3.13", False),
        ("2.6", "3.13", True),
        ("1.13", "3.10", True),
    ],
)
def test_torchvision_python_wheels(matrix, torch, python, ok):
    # torchvision 0.14 has no cp311 wheels, 0.20 none for cp313
    assert (V(python) in matrix.release(torch).torchvision_python) is ok


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
        # nvidia-smi spellings and the names the old 9-entry list did not know
        ("Tesla V100-SXM2-16GB", "7.0"),
        ("NVIDIA GeForce RTX 4090", "8.9"),
        ("GeForce GTX 1080", "6.1"),
        ("NVIDIA GeForce GTX 1080 Ti", "6.1"),
        ("NVIDIA L4", "8.9"),
        ("L40S", "8.9"),
        ("NVIDIA A10", "8.6"),
        ("RTX 4080", "8.9"),
        ("NVIDIA RTX 6000 Ada Generation", "8.9"),
        ("Quadro RTX 6000", "7.5"),
        ("NVIDIA GeForce RTX 3060 Laptop GPU", "8.6"),
        ("nvidia gh200 480gb", "9.0"),
        ("NVIDIA B300", "10.3"),
        ("NVIDIA GB10", "12.1"),
        ("Jetson AGX Orin", "8.7"),
        ("GeForce GTX TITAN X", "5.2"),
        ("NVIDIA TITAN X", "6.1"),
        ("Tesla K80", "3.7"),
    ],
)
def test_gpu_names(matrix, text, cap):
    assert matrix.gpu_capability(text)[0] == Capability.parse(cap)


def test_gpu_names_are_words_not_substrings(matrix):
    # A10 is not A100, L40 is not L40S
    assert matrix.find_gpu("NVIDIA A100 80GB PCIe").name == "NVIDIA A100"
    assert matrix.find_gpu("NVIDIA A10").name == "NVIDIA A10"
    assert matrix.find_gpu("NVIDIA L40").name == "NVIDIA L40"


def test_the_whole_nvidia_table_is_shipped(matrix):
    segments = {g.segment for g in matrix.gpus.gpus}
    assert segments == {"data_center", "workstation", "geforce", "jetson"}
    assert len(matrix.gpus.gpus) > 150
    # names read from NVIDIA's pages are verified; the rest is marked
    assert matrix.find_gpu("H100").verified and not matrix.find_gpu("A100").verified


def test_unknown_gpu_suggests_close_names_and_capabilities(matrix):
    with pytest.raises(LockgenError, match="sm_86") as err:
        matrix.gpu_capability("GTX 9999")
    with pytest.raises(LockgenError, match="close names: .*RTX 6000 Ada") as err:
        matrix.gpu_capability("RTX 6000")  # the Turing Quadro and the Ada card: ambiguous
    assert "unknown GPU 'RTX 6000'" in str(err.value)


def test_gpu_driver_window(matrix):
    blackwell = matrix.gpu_driver(Capability.parse("12.0"))
    assert blackwell.first_cuda == V("12.8") and blackwell.minimum == V("570.26")
    volta = matrix.gpu_driver(Capability.parse("7.0"))
    assert volta.minimum is None and volta.last_branch == V("580")
    assert matrix.gpu_driver(Capability.parse("8.0")) is None


def test_unknown_release_errors_list_known_ones(matrix):
    with pytest.raises(LockgenError, match="known releases: 1.13"):
        matrix.release("3.0")


REQUIRED_TARGETS = ["cpu", "cu118", "cu121", "cu124", "cu126", "cu128", "cu129", "cu130"]


def test_required_targets_exist(matrix):
    assert set(REQUIRED_TARGETS) <= set(matrix.targets)


@pytest.mark.parametrize("name", REQUIRED_TARGETS)
def test_every_target_resolves(matrix, name):
    t = matrix.target(name)
    assert t.python in t.pythons
    for platform in t.platforms:
        assert all(t.release.pairs_python(p, platform) for p in t.pythons)
    assert t.torchvision.minor == t.release.torchvision
    assert t.tag == name
    assert t.pip_index_url == f"https://download.pytorch.org/whl/{name}"
    assert t.pip_requirements[0].startswith("torch==")
    assert bool(t.conda_specs) == t.has_conda
    if t.has_conda:
        assert any(s.startswith("pytorch ") for s in t.conda_specs)
    if name == "cpu":
        assert t.cuda is None and t.build is None and t.arch_list is None
        assert "__cuda" not in t.virtual_packages["linux-64"]
    else:
        assert t.build is not None and t.build.cuda == t.cuda and t.cudnn is not None
        assert set(t.arch_lists) == set(t.platforms)
        assert t.arch_list.archs and t.driver_floor.minimum <= t.driver_floor.full
        assert t.virtual_packages["linux-64"]["__cuda"] == t.cuda.raw
        assert t.virtual_packages["linux-64"]["__glibc"] == "2.28"


def test_target_conda_routes(matrix):
    cu121 = matrix.target("cu121")
    assert cu121.conda_channels == ("pytorch", "nvidia", "defaults")
    assert "pytorch-cuda 12.1.*" in cu121.conda_specs
    assert "pytorch 2.5.1 *cuda12.1*" in cu121.conda_specs
    cu129 = matrix.target("cu129")
    assert cu129.conda_channels == ("conda-forge",)
    # the variant's own build string: `cuda*` alone admits the 12.8 build next to 12.9
    assert "pytorch 2.8.0 cuda129*" in cu129.conda_specs
    assert "torchvision 0.23.0 cuda129*" in cu129.conda_specs
    assert "cuda-version 12.9.*" in cu129.conda_specs
    for name in ("cpu", "cu126", "cu128", "cu130"):
        assert not matrix.target(name).has_conda and not matrix.target(name).conda_specs
    cu130 = matrix.target("cu130")
    assert cu130.pip_requirements == ("torch==2.14.1", "torchvision==0.29.1")
    assert matrix.target("cu128").pip_requirements == ("torch==2.8.0", "torchvision==0.23.0")


def test_pip_source_is_pypi_only_where_pypi_has_the_build(matrix):
    """PyPI's torch is one CUDA build per release, and on linux-aarch64 only from 2.11."""
    kinds = {n: t.pip_source.kind for n, t in matrix.targets.items()}
    stacks = {"sft-cu130", "sft-cu128-xformers", "trl-vllm-cu130"}  # PyPI's torch by rule
    assert {n for n, k in kinds.items() if k == "pypi"} == {"cu124", "cu128", "cu130", *stacks}
    assert matrix.target("cu130").platforms == ("linux-64", "linux-aarch64")
    assert matrix.target("cu130").pip_source.url == "https://pypi.org/simple"
    assert matrix.target("cu126").pip_source.url == "https://download.pytorch.org/whl/cu126"
    assert matrix.release("2.10").pypi_default_platforms == ("linux-64",)
    assert matrix.release("2.11").pypi_default_platforms == ("linux-64", "linux-aarch64")
    aarch = dataclasses.replace(matrix.target("cu128"), platforms=("linux-64", "linux-aarch64"))
    assert aarch.pip_source.kind == "wheel-index"  # PyPI's 2.8 aarch64 wheel is a CPU build


def test_arch_lists_per_platform_follow_the_wheels(matrix):
    cu130 = matrix.target("cu130")
    assert cu130.arch_lists["linux-64"].torch_cuda_arch_list == "7.5;8.0;8.6;9.0;10.0;12.0"
    assert cu130.arch_lists["linux-aarch64"].names == ("8.0", "9.0", "10.0", "11.0", "12.0+PTX")
    # conda-forge's cu129 build has sm_50/sm_60, the wheels start at sm_70: the target's
    # list is the wheels' (what pip, uv and the Nix shell install).
    cu129 = matrix.target("cu129")
    assert cu129.arch_list.channel == "pip" and cu129.arch_list.names[0] == "7.0"
    assert (
        matrix.arch_list(
            Version.parse("2.8"), Version.parse("12.9"), "linux-64", "conda-forge"
        ).names[0]
        == "5.0"
    )


def test_unknown_target_lists_known_ones(matrix):
    with pytest.raises(LockgenError, match="unknown target 'cu999'.*cu121"):
        matrix.target("cu999")


def test_cu128_keeps_volta_until_2_11(matrix):
    """RELEASE.md's 2.9/2.10 table lists Volta for CUDA 12.8; 2.11 dropped it (a V100 needs
    the CUDA 12.6 build there)."""
    for torch in ("2.9", "2.10"):
        a = matrix.arch_list(V(torch), V("12.8"))
        assert a.verified and a.names[0] == "7.0", torch
    a = matrix.arch_list(V("2.11"), V("12.8"))
    assert a.verified and a.names == ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0")
    assert not a.runs_on(Capability.parse("7.0"))


def _conda_forge_cudas(matrix, torch, platform):
    return sorted(
        c.raw
        for a in matrix.arch_lists
        if a.channel == "conda-forge"
        and a.torch_min <= V(torch) <= a.torch_max
        and platform in a.platforms
        for c in a.cuda
    )


@pytest.mark.parametrize(
    "torch,platform,cudas",
    [
        ("2.5", "linux-64", ["12.6"]),
        ("2.6", "win-64", ["12.6"]),
        ("2.8", "linux-64", ["12.9"]),
        ("2.8", "linux-aarch64", ["12.9"]),
        ("2.8", "win-64", ["12.8"]),
        ("2.10", "linux-64", ["12.9", "13.0"]),
        ("2.13", "linux-aarch64", ["12.9", "13.0"]),
        ("2.13", "win-64", ["12.8", "13.0"]),
        ("2.14", "linux-64", []),  # not in the feedstock snapshot
    ],
)
def test_conda_forge_builds_from_the_feedstock(matrix, torch, platform, cudas):
    assert _conda_forge_cudas(matrix, torch, platform) == cudas

"""Version, CUDA and compute-capability parsing, and torch's arch rule."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockgen.errors import LockgenError
from lockgen.versions import Capability, Driver, Version, cuda_tag, parse_cuda, runs_on


def test_versions_compare_numerically_not_as_strings():
    assert Version.parse("2.10") > Version.parse("2.9")
    assert Version.parse("535.104.05") > Version.parse("535.54.03")
    assert Version.parse("2.1") == Version.parse("2.1.0")
    assert Version.parse("525") < Version.parse("525.60.13")


@given(
    st.lists(st.integers(0, 999), min_size=1, max_size=4),
    st.lists(st.integers(0, 999), min_size=1, max_size=4),
)
def test_version_order_is_numeric_tuple_order(a, b):
    va, vb = Version.parse(".".join(map(str, a))), Version.parse(".".join(map(str, b)))
    n = max(len(a), len(b))
    pa, pb = tuple(a) + (0,) * (n - len(a)), tuple(b) + (0,) * (n - len(b))
    assert (va < vb) == (pa < pb)
    assert (va == vb) == (pa == pb)


def test_patch_and_local_versions_map_to_their_minor():
    v = Version.parse("2.1.2+cu121")
    assert v.minor == Version.parse("2.1")
    assert v.local == "cu121"
    assert Version.parse("2.15.0.dev20261001+cu132").minor == Version.parse("2.15")
    assert Version.parse("8.9.2.26").matches_prefix(Version.parse("8.9.2"))
    assert not Version.parse("8.9.2.26").matches_prefix(Version.parse("8.9.7"))


@pytest.mark.parametrize("bad", ["2.x", "", "abc", "2..1", "2.1-", "cu", "1.2.3+"])
def test_malformed_versions_are_clear_errors(bad):
    with pytest.raises(LockgenError, match="bad"):
        Version.parse(bad)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("12.1", "12.1"),
        ("cu121", "12.1"),
        ("cu118", "11.8"),
        ("cu130", "13.0"),
        ("CU126", "12.6"),
    ],
)
def test_parse_cuda(text, expected):
    assert parse_cuda(text) == Version.parse(expected)


def test_parse_cuda_cpu_and_errors():
    assert parse_cuda("cpu") is None
    assert cuda_tag(parse_cuda("13.0")) == "cu130"
    assert cuda_tag(None) == "cpu"
    for bad in ("12", "cu1", "twelve", "12.1+x"):
        with pytest.raises(LockgenError):
            parse_cuda(bad)


@pytest.mark.parametrize(
    "text,major,minor,specific",
    [
        ("sm_86", 8, 6, ""),
        ("8.6", 8, 6, ""),
        ("sm_90a", 9, 0, "a"),
        ("sm_120", 12, 0, ""),
        ("12.0", 12, 0, ""),
        ("86", 8, 6, ""),
        ("compute_100", 10, 0, ""),
    ],
)
def test_parse_capability(text, major, minor, specific):
    c = Capability.parse(text)
    assert (c.major, c.minor, c.specific) == (major, minor, specific)


def test_parse_arch_entry_with_ptx():
    c = Capability.parse_arch("12.0+PTX")
    assert c.ptx and (c.major, c.minor) == (12, 0)
    with pytest.raises(LockgenError):
        Capability.parse("sm_xx")


def cap(t):
    return Capability.parse_arch(t)


@pytest.mark.parametrize(
    "code,device,expected",
    [
        ("8.6", "8.9", True),  # same major, higher minor
        ("8.6", "8.0", False),  # lower minor
        ("8.0", "9.0", False),  # other major, no PTX
        ("7.5", "7.0", False),  # a Volta cannot run Turing code
        ("8.6", "8.7", False),  # Jetson Orin runs only its own code
        ("8.7", "8.9", False),  # and its code runs only on it
        ("8.7", "8.7", True),
        ("9.0a", "9.0", True),  # arch-specific code: exactly that capability
        ("9.0a", "9.1", False),
        ("12.0+PTX", "12.1", True),
        ("9.0+PTX", "10.0", True),  # PTX lets newer archs JIT
        ("9.0+PTX", "8.6", False),
        ("10.1", "11.0", True),  # sm_101 is sm_110
    ],
)
def test_runs_on_follows_torch_rule(code, device, expected):
    assert runs_on(cap(code), Capability.parse(device)) is expected


def test_sbsa_unification_lets_cuda_13_2_code_run_on_jetson():
    # torch's DEVICE_REQUIREMENT_POST_JETSON_SBSA_UNIFICATION: from CUDA 13.2 on
    orin = Capability.parse("8.7")
    assert not runs_on(cap("8.0"), orin, Version.parse("13.0"))
    assert runs_on(cap("8.0"), orin, Version.parse("13.2"))
    assert not runs_on(cap("9.0"), orin, Version.parse("13.2"))


@pytest.mark.parametrize(
    "text,version,reach",
    [
        ("525", "525.60.13", "some"),  # a branch: its later drivers reach it
        ("525", "520.61.05", "all"),
        ("525", "530.30.02", "none"),
        ("535.104.05", "530.30.02", "all"),
        ("535.104.05", "535.104.06", "none"),
        ("580", "580", "all"),
    ],
)
def test_driver_branch_reaches(text, version, reach):
    assert Driver.parse(text).reaches(Version.parse(version)) == reach


def test_driver_parse():
    assert Driver.parse("525").branch and str(Driver.parse("525")) == "R525"
    assert not Driver.parse("570.26").branch
    for bad in ("R535", "535.x", "", "535+foo"):
        with pytest.raises(LockgenError, match="driver version"):
            Driver.parse(bad)

"""pytest fixtures for the lockgen tests: the real matrix, one with a CPU conda target, and
fake machines."""

from __future__ import annotations

import urllib.request

import pytest
from checkout import FACTS
from lockgen_fakes import fake_machine

from lockgen.load import load_matrix

# The real targets have no CPU conda env (conda-forge's torch ends before the CPU target's
# 2.14 in the matrix); the conda lock/verify/install tests add this one to cover CPU locks.
CPU_CONDA_TARGET = """
[target.cpu-conda]
description = "test only: the CPU build from conda-forge"
torch = "2.8.0"
torchvision = "0.23.0"
python = "3.11"
cuda = "cpu"
conda_channel = "conda-forge"
platforms = ["linux-64"]
"""


@pytest.fixture(scope="session")
def matrix():
    return load_matrix()


@pytest.fixture(scope="session")
def conda_matrix(tmp_path_factory):
    """The real matrix and targets plus the test-only ``cpu-conda`` target."""
    targets = tmp_path_factory.mktemp("targets") / "targets.toml"
    targets.write_text((FACTS / "targets.toml").read_text() + CPU_CONDA_TARGET)
    return load_matrix(targets=targets)


@pytest.fixture(scope="session")
def locked_envs(conda_matrix, tmp_path_factory):
    """An envs/ folder with cu121 and cpu-conda rendered and locked against the local test
    channel (tests/lockgen/conda_channel.py); copy it before editing."""
    from conda_channel import build_channel, render_and_lock

    channel = build_channel(tmp_path_factory.mktemp("channel"))
    envs = tmp_path_factory.mktemp("envs")
    render_and_lock(
        conda_matrix, envs, channel, tmp_path_factory.mktemp("cache"), names=["cu121", "cpu-conda"]
    )
    return envs


@pytest.fixture(scope="session")
def pypi():
    """Skips the test when PyPI cannot be reached (the tests that need it read metadata and
    small wheels only)."""
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10) as r:
            r.read(1)
    except OSError as exc:
        pytest.skip(f"PyPI is not reachable from here ({exc})")
    return "https://pypi.org/simple"


@pytest.fixture
def machine(tmp_path):
    def make(**kw):
        return fake_machine(tmp_path, **kw)

    return make

"""lockgen install: a lock into a prefix with the embedded engine, and the driver check."""

from __future__ import annotations

import io
import json

import pytest
from conda_channel import build_channel, render_and_lock

from lockgen.cli import main
from lockgen.install import InstallRefused, check_driver, install_lockfile
from lockgen.probe import DriverInfo
from lockgen.versions import Version


class StubProber:
    def __init__(self, driver=None, cuda_umd=None):
        self.driver = (
            DriverInfo(Version.parse(driver), "test", Version.parse(cuda_umd) if cuda_umd else None)
            if driver
            else None
        )

    def driver_and_gpus(self):
        return self.driver, [], self.driver is not None


@pytest.fixture(scope="module")
def matrix(conda_matrix):
    return conda_matrix


@pytest.fixture(scope="module")
def locks(matrix, tmp_path_factory):
    channel = build_channel(tmp_path_factory.mktemp("channel"))
    envs = tmp_path_factory.mktemp("envs")
    res = render_and_lock(
        matrix,
        envs,
        channel,
        tmp_path_factory.mktemp("cache"),
        names=["cu121", "cu129", "cpu-conda"],
    )
    return {k: v.path for k, v in res.items()}


def test_install_puts_the_locked_packages_in_the_prefix(matrix, locks, tmp_path):
    prefix = tmp_path / "env"
    res = install_lockfile(
        locks["cu121"],
        prefix,
        matrix,
        platform="linux-64",
        prober=StubProber("550.54.14", "12.4"),
        cache_dir=tmp_path / "pkgs",
    )
    assert res.driver.ok and res.packages > 5
    meta = {
        json.loads(p.read_text())["name"]: json.loads(p.read_text())
        for p in (prefix / "conda-meta").glob("*.json")
    }
    assert meta["pytorch"]["build"] == "py3.11_cuda12.1_cudnn9.1.0_0"
    assert (
        prefix / "share/lockgen-test/pytorch-2.5.1-py3.11_cuda12.1_cudnn9.1.0_0.txt"
    ).read_text() == "pytorch 2.5.1 py3.11_cuda12.1_cudnn9.1.0_0\n"


def test_install_refuses_without_a_driver(matrix, locks, tmp_path):
    with pytest.raises(InstallRefused, match=r"no NVIDIA driver.*__cuda=12.9"):
        install_lockfile(
            locks["cu129"], tmp_path / "env", matrix, platform="linux-64", prober=StubProber()
        )
    assert not (tmp_path / "env").exists()


def test_install_refuses_a_driver_too_old(matrix, locks, tmp_path):
    with pytest.raises(InstallRefused, match=r"driver 520.61.05 supports CUDA 11.8"):
        install_lockfile(
            locks["cu129"],
            tmp_path / "env",
            matrix,
            platform="linux-64",
            prober=StubProber("520.61.05", "11.8"),
        )


def test_no_driver_check_installs_anyway(matrix, locks, tmp_path):
    res = install_lockfile(
        locks["cu129"],
        tmp_path / "env",
        matrix,
        platform="linux-64",
        driver_check=False,
        cache_dir=tmp_path / "pkgs",
    )
    assert (tmp_path / "env" / "conda-meta").is_dir() and "skipped" in res.driver.message


def test_cpu_lock_needs_no_driver(matrix, locks, tmp_path):
    res = install_lockfile(
        locks["cpu-conda"],
        tmp_path / "env",
        matrix,
        platform="linux-64",
        prober=StubProber(),
        cache_dir=tmp_path / "pkgs",
    )
    assert res.driver.ok


def test_driver_rules(matrix):
    assert check_driver(matrix, "12.1", StubProber("550.54.14", "12.4")).ok
    # no CUDA version from nvidia-smi: the newest toolkit whose driver it meets
    assert check_driver(matrix, "12.1", StubProber("535.104.05")).ok
    mvc = check_driver(matrix, "12.4", StubProber("535.104.05", "12.2"))
    assert mvc.ok and mvc.warnings and "minor version compatibility" in mvc.message
    assert not check_driver(matrix, "12.1", StubProber("470.82.01", "11.4")).ok


def test_install_wrong_platform(matrix, locks, tmp_path):
    with pytest.raises(Exception, match="win-64"):
        install_lockfile(
            locks["cpu-conda"], tmp_path / "env", matrix, platform="win-64", driver_check=False
        )


def test_cli_install(matrix, locks, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    rc = main(
        [
            "install",
            str(locks["cu121"]),
            "--prefix",
            str(tmp_path / "env"),
            "--platform",
            "linux-64",
            "--cache-dir",
            str(tmp_path / "pkgs"),
        ],
        out=out,
        err=err,
        prober=StubProber("550.54.14", "12.4"),
    )
    assert rc == 0, err.getvalue()
    assert "installed" in out.getvalue()
    rc = main(
        [
            "install",
            str(locks["cu121"]),
            "--prefix",
            str(tmp_path / "env2"),
            "--platform",
            "linux-64",
        ],
        out=out,
        err=err,
        prober=StubProber(),
    )
    assert rc == 2 and "--no-driver-check" in err.getvalue()


def test_pip_and_uv_locks_are_sent_to_their_installers(matrix, tmp_path):
    from lockgen.errors import LockgenError

    for path, how in (
        (tmp_path / "cu130.requirements.txt", "pip install --require-hashes -r"),
        (tmp_path / "uv" / "cu130" / "uv.lock", "uv sync --locked --project"),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        with pytest.raises(LockgenError, match=how):
            install_lockfile(path, tmp_path / "env", matrix, driver_check=False)
    assert not (tmp_path / "env").exists()

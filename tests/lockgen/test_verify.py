"""lockgen verify: passes on real solves, fails on each kind of bad lock."""

from __future__ import annotations

import io
import shutil

import pytest
import yaml
from conda_channel import build_channel, render_and_lock

from lockgen.cli import main
from lockgen.formats import conda as lf
from lockgen.formats.conda import build_cuda, build_cudnn, target_paths
from lockgen.verify import verify_file
from lockgen.versions import Version


@pytest.fixture(scope="module")
def matrix(conda_matrix):
    return conda_matrix


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    return build_channel(tmp_path_factory.mktemp("channel"))


@pytest.fixture(scope="module")
def locked(matrix, channel, tmp_path_factory):
    envs = tmp_path_factory.mktemp("envs")
    render_and_lock(
        matrix,
        envs,
        channel,
        tmp_path_factory.mktemp("cache"),
        names=["cu121", "cu129", "cpu-conda"],
    )
    return envs


@pytest.fixture
def envs(locked, tmp_path):
    """A private copy of the locked envs folder, free to tamper with."""
    shutil.copytree(locked, tmp_path / "envs")
    return tmp_path / "envs"


def _edit_lock(path, fn):
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _errors(report, check):
    return [f.message for f in report.findings if f.severity == "error" and f.code == check]


def test_build_string_parsing():
    assert build_cuda("py3.11_cuda12.1_cudnn8.9.2_0") == Version.parse("12.1")
    assert build_cuda("cuda130_mkl_py312_h1234567_202") == Version.parse("13.0")
    assert build_cuda("cuda118_py311_habc_0") == Version.parse("11.8")
    assert build_cuda("py311_cu121") == Version.parse("12.1")
    assert build_cuda("cpu_mkl_py311_h1234567_100") == "cpu"
    assert build_cuda("py3.11_cpu_0") == "cpu"
    assert build_cuda("py311h1234_0") is None
    assert build_cudnn("py3.11_cuda12.1_cudnn8.9.2_0") == Version.parse("8.9.2")


def test_fresh_locks_pass(matrix, envs):
    for name in ("cu121", "cu129", "cpu-conda"):
        report = verify_file(envs / f"{name}.lock", matrix, check_channels=True)
        assert report.ok, report.format()


def test_tampered_hash_fails(matrix, envs):
    path = envs / "cu121.lock"

    def tamper(data):
        pkg = next(p for p in data["package"] if p["name"] == "pytorch")
        pkg["hash"]["sha256"] = "0" * 64

    _edit_lock(path, tamper)
    report = verify_file(path, matrix, check_channels=True)
    assert not report.ok
    assert any("pytorch" in m and "differs from the channel" in m for m in _errors(report, "hash"))

    def malformed(data):
        data["package"][0]["hash"]["md5"] = "not-a-hash"

    _edit_lock(path, malformed)
    report = verify_file(path, matrix)
    assert any("md5" in m for m in _errors(report, "hash"))


def test_cpu_torch_in_a_cuda_lock_fails(matrix, envs):
    path = envs / "cu129.lock"

    def to_cpu(data):
        pkg = next(p for p in data["package"] if p["name"] == "pytorch")
        pkg["build"] = "cpu_mkl_py311_h1234567_100"
        pkg["url"] = pkg["url"].replace(
            "cuda129_mkl_py311_h1234567_200", "cpu_mkl_py311_h1234567_100"
        )

    _edit_lock(path, to_cpu)
    report = verify_file(path, matrix)
    assert not report.ok
    assert any("is the CPU build" in m for m in _errors(report, "torch"))


def test_wrong_cuda_version_fails(matrix, envs):
    path = envs / "cu121.lock"

    def to_124(data):
        for p in data["package"]:
            if p["name"] == "pytorch":
                p["build"] = "py3.11_cuda12.4_cudnn9.1.0_0"
            if p["name"] == "pytorch-cuda":
                p["version"] = "12.4"

    _edit_lock(path, to_124)
    report = verify_file(path, matrix)
    assert any("CUDA 12.4 build" in m for m in _errors(report, "torch"))
    assert any("pytorch-cuda 12.4" in m for m in _errors(report, "cuda"))


def test_wrong_cudnn_fails(matrix, envs):
    path = envs / "cu121.lock"

    def cudnn8(data):
        pkg = next(p for p in data["package"] if p["name"] == "pytorch")
        pkg["build"] = "py3.11_cuda12.1_cudnn8.9.2_0"

    _edit_lock(path, cudnn8)
    assert any("cuDNN 8.9.2" in m for m in _errors(verify_file(path, matrix), "cudnn"))


def test_missing_platform_fails(matrix, envs):
    path = envs / "cu121.lock"

    def drop(data):
        data["metadata"]["platforms"] = ["win-64"]
        data["package"] = [dict(p, platform="win-64") for p in data["package"]]
        data["metadata"]["content_hash"] = {"win-64": "0" * 64}

    _edit_lock(path, drop)
    report = verify_file(path, matrix)
    assert any("linux-64 is missing" in m for m in _errors(report, "platform"))


def test_changed_env_file_makes_the_lock_stale(matrix, envs):
    env = target_paths(envs, "cu121").env
    env.write_text(env.read_text().replace("  - ninja\n", "  - ninja >=1.12\n"))
    report = verify_file(envs / "cu121.lock", matrix)
    assert not report.ok
    stale = _errors(report, "stale")
    assert any("content hash" in m and "cu121.yml" in m for m in stale)
    out = io.StringIO()
    assert main(["verify", str(envs / "cu121.lock")], out=out) == 1
    assert "stale" in out.getvalue()


def test_changed_virtual_packages_make_the_lock_stale(matrix, envs):
    vp = target_paths(envs, "cu129").virtual_packages
    vp.write_text(vp.read_text().replace('__glibc: "2.28"', '__glibc: "2.17"'))
    report = verify_file(envs / "cu129.lock", matrix)
    assert any("content hash" in m for m in _errors(report, "stale"))


def test_lock_for_another_cuda_is_caught(matrix, envs):
    path = envs / "cu121.lock"

    def relabel(data):
        data["metadata"]["custom_metadata"][lf.META_CUDA] = "11.8"

    _edit_lock(path, relabel)
    assert any("__cuda=11.8" in m for m in _errors(verify_file(path, matrix), "target"))


def test_unknown_target(matrix, envs):
    path = envs / "cu121.lock"
    _edit_lock(path, lambda d: d["metadata"]["custom_metadata"].update({lf.META_TARGET: "cu999"}))
    assert any("unknown target" in m for m in _errors(verify_file(path, matrix), "target"))


def test_cli_verify_json(matrix, envs):
    out = io.StringIO()
    targets = str(matrix.targets_path)
    rc = main(
        ["--targets", targets, "verify", "--format", "json", str(envs / "cpu-conda.lock")], out=out
    )
    assert rc == 0
    assert '"ok": true' in out.getvalue()

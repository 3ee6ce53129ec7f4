"""The uv flavor: a uv project per target (render), the real `uv lock` (PyPI-served targets),
and `lockgen verify` of a uv.lock: the CUDA build of torch, hashes, the project it locks."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checkout import ENVS

from lockgen.cli import main
from lockgen.errors import LockgenError
from lockgen.formats.uv import (
    dependencies,
    lock_uv,
    pyproject_text,
    render_uv,
    requires_python,
    uv_paths,
    uv_rendered_is_current,
)
from lockgen.verify import verify_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _errors(report, check=None):
    return [f.message for f in report.findings if f.severity == "error" and check in (None, f.code)]


def test_pypi_build_is_pinned_by_index_platforms_and_cuda_runtime(matrix):
    data = tomllib.loads(pyproject_text(matrix.target("cu130")))
    assert data["project"]["name"] == "gpufit-cu130"
    assert data["project"]["requires-python"] == ">=3.10, <3.15"
    assert data["project"]["dependencies"] == [
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy",
        "nvidia-cuda-runtime==13.0.*",
    ]
    uv = data["tool"]["uv"]
    assert uv["package"] is False
    machines = ["platform_machine == 'x86_64'", "platform_machine == 'aarch64'"]
    for key in ("environments", "required-environments"):
        assert len(uv[key]) == 2 and all(m in e for m, e in zip(machines, uv[key], strict=True))
    assert uv["index"] == [
        {"name": "torch-cu130", "url": "https://pypi.org/simple", "explicit": True}
    ]
    assert uv["sources"] == {
        "torch": {"index": "torch-cu130"},
        "torchvision": {"index": "torch-cu130"},
    }
    assert dependencies(matrix.target("cu124"))[-1] == "nvidia-cuda-runtime-cu12==12.4.*"


def test_wheel_index_build_is_pinned_by_its_local_version(matrix):
    data = tomllib.loads(pyproject_text(matrix.target("cu126")))
    assert data["project"]["dependencies"] == [
        "torch==2.14.1+cu126",
        "torchvision==0.29.1+cu126",
        "numpy",
    ]
    assert data["tool"]["uv"]["index"][0]["url"] == "https://download.pytorch.org/whl/cu126"
    assert data["tool"]["uv"]["index"][0]["explicit"] is True
    cpu = tomllib.loads(pyproject_text(matrix.target("cpu")))
    assert cpu["project"]["dependencies"][:2] == ["torch==2.14.1+cpu", "torchvision==0.29.1+cpu"]


def test_render_writes_the_project_and_the_python_pin(matrix, tmp_path):
    paths = render_uv(matrix.target("cu124"), tmp_path)
    assert paths == [
        uv_paths(tmp_path, "cu124").pyproject,
        uv_paths(tmp_path, "cu124").python_version,
    ]
    assert paths[1].read_text() == "3.11\n"
    assert uv_rendered_is_current(matrix.target("cu124"), tmp_path) == []
    paths[0].write_text(paths[0].read_text().replace("numpy", "numpy>=2"))
    assert "differs from what" in uv_rendered_is_current(matrix.target("cu124"), tmp_path)[0]


def test_pythons_must_be_one_range(matrix):
    import dataclasses

    from lockgen.versions import Version

    t = dataclasses.replace(
        matrix.target("cu130"), pythons=(Version.parse("3.10"), Version.parse("3.12"))
    )
    with pytest.raises(LockgenError, match="not consecutive"):
        requires_python(t)


def test_every_target_has_a_committed_uv_project(matrix):
    for t in matrix.targets.values():
        assert uv_rendered_is_current(t, ENVS) == [], t.name


def test_pypi_served_targets_have_a_committed_uv_lock_that_verifies(matrix):
    pypi = {n for n, t in matrix.targets.items() if t.pip_source.kind == "pypi"}
    locked = {p.parent.name for p in ENVS.glob("uv/*/uv.lock")}
    assert locked == pypi
    for name in sorted(locked):
        report = verify_file(uv_paths(ENVS, name).lock, matrix)
        assert report.ok, report.format()


# -- the real uv lock against PyPI, for the CUDA 13.0 target -------------------------------------


@pytest.fixture(scope="module")
def cu130_lock(matrix, pypi, tmp_path_factory):
    """`lockgen lock cu130 --flavor uv` on a copy of the committed project: the real uv, the
    real PyPI (metadata only)."""
    envs = tmp_path_factory.mktemp("envs")
    shutil.copytree(ENVS / "uv" / "cu130", envs / "uv" / "cu130")
    (envs / "uv" / "cu130" / "uv.lock").unlink()
    out = io.StringIO()
    rc = main(["lock", "cu130", "--flavor", "uv", "--envs", str(envs)], out=out)
    assert rc == 0, out.getvalue()
    assert "uv.lock (target cu130): OK" in out.getvalue()
    return envs / "uv" / "cu130" / "uv.lock"


@pytest.fixture
def lock_copy(cu130_lock, tmp_path):
    """A copy of the project and its fresh lock, free to tamper with."""
    shutil.copytree(cu130_lock.parent.parent.parent, tmp_path / "envs")
    return tmp_path / "envs" / "uv" / "cu130" / "uv.lock"


def test_real_uv_lock_has_the_cuda_build(matrix, cu130_lock):
    lock = tomllib.loads(cu130_lock.read_text())
    pkgs = {p["name"]: p for p in lock["package"]}
    assert pkgs["torch"]["version"] == "2.14.1"
    assert pkgs["torch"]["source"] == {"registry": "https://pypi.org/simple"}
    assert pkgs["nvidia-cuda-runtime"]["version"].startswith("13.0.")
    wheels = [w["url"].rsplit("/", 1)[1] for w in pkgs["torch"]["wheels"]]
    assert any("x86_64" in w for w in wheels) and any("aarch64" in w for w in wheels)
    assert not any("win" in w or "macosx" in w for w in wheels)
    report = verify_file(cu130_lock, matrix)
    assert report.ok, report.format()


def _tamper(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, count))


def test_verify_rejects_a_cpu_torch(matrix, lock_copy):
    """The CPU wheel of the same release, as the PyTorch CPU index serves it: a +cpu version
    from another index, and no CUDA dependencies."""
    lock = tomllib.loads(lock_copy.read_text())
    torch = next(p for p in lock["package"] if p["name"] == "torch")
    text = lock_copy.read_text()
    start = text.index('[[package]]\nname = "torch"\n')
    end = text.index("\n[[package]]", start + 1)
    cpu = (
        '[[package]]\nname = "torch"\nversion = "2.14.1+cpu"\n'
        'source = { registry = "https://download.pytorch.org/whl/cpu" }\n'
        'dependencies = [\n    { name = "filelock" },\n]\nwheels = [\n'
        f'    {{ url = "https://download.pytorch.org/whl/cpu/torch-2.14.1%2Bcpu-cp311-cp311-'
        f'manylinux_2_28_x86_64.whl", hash = "{torch["wheels"][0]["hash"]}" }},\n]\n'
    )
    lock_copy.write_text(text[:start] + cpu + text[end:])
    report = verify_file(lock_copy, matrix)
    assert not report.ok
    errors = _errors(report, "torch")
    assert any("2.14.1+cpu: PyPI builds carry no +cpu" in m for m in errors)
    assert any("comes from https://download.pytorch.org/whl/cpu" in m for m in errors)
    assert any("no nvidia-cuda-runtime in the lock" in m and "CPU build" in m for m in errors)


def test_verify_rejects_a_malformed_hash(matrix, lock_copy):
    lock = tomllib.loads(lock_copy.read_text())
    sha = next(p for p in lock["package"] if p["name"] == "torch")["wheels"][0]["hash"]
    _tamper(lock_copy, sha, sha[:-4])
    assert any("is malformed" in m for m in _errors(verify_file(lock_copy, matrix), "hash"))


def test_verify_against_pypi_rejects_a_tampered_hash(matrix, lock_copy):
    """A well-formed sha256 that is not the file's: only the index can tell."""
    lock = tomllib.loads(lock_copy.read_text())
    sha = next(p for p in lock["package"] if p["name"] == "torch")["wheels"][0]["hash"]
    forged = "sha256:" + "0" * 64
    _tamper(lock_copy, sha, forged)
    assert verify_file(lock_copy, matrix).ok  # offline, the shape is all there is to see
    report = verify_file(lock_copy, matrix, check_channels=True)
    assert not report.ok
    assert any(
        m.startswith("torch 2.14.1: sha256 0000000000000000") for m in _errors(report, "hash")
    )


def test_verify_rejects_a_stale_or_misplaced_lock(matrix, lock_copy, tmp_path):
    pyproject = lock_copy.parent / "pyproject.toml"
    _tamper(pyproject, '    "numpy",\n', '    "numpy>=2",\n')
    assert any("differs from what" in m for m in _errors(verify_file(lock_copy, matrix), "stale"))
    _tamper(pyproject, '    "numpy>=2",\n', '    "numpy",\n')
    _tamper(lock_copy, '{ name = "numpy" }', '{ name = "numpy", specifier = ">=2" }')
    assert any(
        "the lock was made for" in m for m in _errors(verify_file(lock_copy, matrix), "stale")
    )
    other = tmp_path / "envs" / "uv" / "cu128"
    other.mkdir(parents=True, exist_ok=True)
    shutil.copy(lock_copy, other / "uv.lock")
    assert any(
        "lies in cu128/" in m for m in _errors(verify_file(other / "uv.lock", matrix), "target")
    )


def test_failed_uv_lock_keeps_the_previous_lock(matrix, lock_copy):
    envs = lock_copy.parent.parent.parent
    before = lock_copy.read_bytes()

    def failing(argv):
        return subprocess.CompletedProcess(argv, 2, "", "error: No solution found")

    with pytest.raises(LockgenError, match="uv lock failed:\nerror: No solution found"):
        lock_uv(matrix, matrix.target("cu130"), envs, run=failing)
    assert lock_copy.read_bytes() == before

    def cpu_lock(argv):  # uv "succeeds" with a lock verify refuses
        work = Path(argv[argv.index("--project") + 1])
        (work / "uv.lock").write_text(
            before.decode().replace('version = "2.14.1"', 'version = "2.14.1+cpu"')
        )
        return subprocess.CompletedProcess(argv, 0, "", "")

    with pytest.raises(LockgenError, match="fails verification, not written"):
        lock_uv(matrix, matrix.target("cu130"), envs, run=cpu_lock)
    assert lock_copy.read_bytes() == before


@pytest.mark.parametrize(
    "text",
    [
        "DEL\u007fhere",
        "NUL\u0000, US\u001f, ESC\u001b",
        'quote " and back\\slash',
        "tab\tnew\nline\rform\ffeed\bback",
        "C1 \u0085 and line separator \u2028, é",
    ],
)
def test_render_escapes_every_control_character(matrix, tmp_path, text):
    # issue 22, F11: a description TOML allows in targets.toml renders as TOML that reads back
    import dataclasses

    from lockgen.tables import tomllib

    target = dataclasses.replace(matrix.target("cu124"), description=text)
    pyproject = render_uv(target, tmp_path)[0]
    raw = pyproject.read_text(encoding="utf-8")
    assert "\u007f" not in raw and "\u0000" not in raw
    assert tomllib.loads(raw)["project"]["description"] == text


@pytest.mark.parametrize("text", ["DEL\u007f", "NUL\u0000 and ESC\u001b", "\u0085\u2028 ok"])
def test_conda_yaml_scalars_read_back(text):
    import yaml

    from lockgen.formats.conda import yaml_scalar

    assert yaml.safe_load(f"x: {yaml_scalar(text)}") == {"x": text}

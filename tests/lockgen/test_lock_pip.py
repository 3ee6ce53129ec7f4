"""lockgen lock --flavor pip: exact pins with --hash lines, and their verification."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from lockgen.cli import main
from lockgen.errors import LockgenError
from lockgen.render.pip import (
    PipResolver,
    lock_pip,
    parse_requirements,
    platform_tags,
    wheel_source,
)
from lockgen.verify import verify_file


def _report(items):
    return {
        "version": "1",
        "install": [
            {
                "metadata": {"name": n, "version": v},
                "download_info": {
                    "url": f"https://example.invalid/{n}-{v}.whl",
                    "archive_info": {"hashes": {"sha256": h}},
                },
            }
            for n, v, h in items
        ],
    }


def fake_pip(items, seen=None):
    def run(argv):
        if seen is not None:
            seen.append(list(argv))
        Path(argv[argv.index("--report") + 1]).write_text(json.dumps(_report(items)))
        return subprocess.CompletedProcess(argv, 0, "", "")

    return run


H = {c: c * 64 for c in "abcdef"}


def test_wheel_source(matrix):
    assert wheel_source(matrix.target("cu130"))[0] == "https://pypi.org/simple"
    assert wheel_source(matrix.target("cu124"))[0] == "https://pypi.org/simple"
    assert wheel_source(matrix.target("cu121"))[0] == "https://download.pytorch.org/whl/cu121"
    assert wheel_source(matrix.target("cpu"))[0] == "https://download.pytorch.org/whl/cpu"


def test_platform_tags():
    tags = platform_tags("linux-64", "2.28")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux2014_x86_64" in tags
    assert "manylinux_2_29_x86_64" not in tags
    assert platform_tags("win-64") == ["win_amd64"]


def test_pip_lock_writes_pins_and_hashes(matrix, tmp_path):
    seen = []
    items = [
        ("torch", "2.5.1+cu121", H["a"]),
        ("torchvision", "0.20.1+cu121", H["b"]),
        ("numpy", "2.1.3", H["c"]),
        ("typing_extensions", "4.12.2", H["d"]),
    ]
    path = lock_pip(matrix.target("cu121"), tmp_path, PipResolver(run=fake_pip(items, seen)))
    text = path.read_text()
    assert path.name == "cu121.requirements.txt"
    assert "--index-url https://download.pytorch.org/whl/cu121" in text
    assert f"torch==2.5.1+cu121 \\\n    --hash=sha256:{H['a']}" in text
    argv = seen[0]
    assert "--only-binary=:all:" in argv and "--dry-run" in argv and "--isolated" in argv
    assert argv[argv.index("--index-url") + 1] == "https://download.pytorch.org/whl/cu121"
    assert "torch==2.5.*" in argv and "torchvision==0.20.*" in argv
    req = parse_requirements(text)
    assert all(e.pinned and e.hashes for e in req.entries)
    report = verify_file(path, matrix)
    assert report.ok, report.format()


def test_pip_lock_refuses_the_wrong_build(matrix, tmp_path):
    items = [("torch", "2.5.1+cpu", H["a"]), ("torchvision", "0.20.1+cpu", H["b"])]
    with pytest.raises(LockgenError, match="not the cu121 build"):
        lock_pip(matrix.target("cu121"), tmp_path, PipResolver(run=fake_pip(items)))
    assert not list(tmp_path.iterdir())


def test_pip_lock_needs_hashes(matrix, tmp_path):
    items = [("torch", "2.14.1", ""), ("torchvision", "0.29.1", H["b"])]
    with pytest.raises(LockgenError, match="no sha256"):
        lock_pip(matrix.target("cu130"), tmp_path, PipResolver(run=fake_pip(items)))


def test_pip_resolve_failure_is_explained(matrix, tmp_path):
    def run(argv):
        return subprocess.CompletedProcess(
            argv, 1, "", "ERROR: No matching distribution found for torch==2.14.1"
        )

    with pytest.raises(LockgenError, match="No matching distribution"):
        lock_pip(matrix.target("cu130"), tmp_path, PipResolver(run=run))


def test_verify_requirements_findings(matrix, tmp_path):
    items = [("torch", "2.14.1", H["a"]), ("torchvision", "0.29.1", H["b"])]
    path = lock_pip(matrix.target("cu130"), tmp_path, PipResolver(run=fake_pip(items)))
    assert verify_file(path, matrix).ok
    path.write_text(path.read_text().replace(f"--hash=sha256:{H['b']}", ""))
    report = verify_file(path, matrix)
    assert not report.ok and any("torchvision" in f.message for f in report.findings)
    # a cu130 lock resolved from the cpu folder of the wheel index
    path.write_text(
        path.read_text().replace("https://pypi.org/simple", "https://download.pytorch.org/whl/cpu")
    )
    assert any("resolved from" in f.message for f in verify_file(path, matrix).findings)


def _wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    """A minimal pure-Python wheel."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{dist}/METADATA": (
            "Metadata-Version: 2.1\nName: "
            + name
            + "\nVersion: "
            + version
            + "\n"
            + "".join(f"Requires-Dist: {r}\n" for r in requires)
        ).encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = (
        "".join(
            f"{k},sha256={base64.urlsafe_b64encode(hashlib.sha256(v).digest()).rstrip(b'=').decode()}"
            f",{len(v)}\n"
            for k, v in files.items()
        )
        + f"{dist}/RECORD,,\n"
    )
    files[f"{dist}/RECORD"] = record.encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def test_real_pip_against_a_local_index(matrix, tmp_path):
    """pip's real resolver against a PEP 503 index on disk: hashes from the index links."""
    index = tmp_path / "simple"
    wheels = tmp_path / "files"
    wheels.mkdir()
    made = [
        _wheel(wheels, "torch", "2.5.1+cu121", ["numpy"]),
        _wheel(wheels, "torchvision", "0.20.1+cu121", ["torch==2.5.1+cu121"]),
        _wheel(wheels, "numpy", "2.1.3"),
    ]
    digests = {}
    for whl in made:
        project = whl.name.split("-")[0]
        digests[project] = hashlib.sha256(whl.read_bytes()).hexdigest()
        (index / project).mkdir(parents=True)
        (index / project / "index.html").write_text(
            f'<html><body><a href="{whl.as_uri()}#sha256={digests[project]}">{whl.name}</a>'
            "</body></html>"
        )
    out = io.StringIO()
    path = lock_pip(matrix.target("cu121"), tmp_path, PipResolver(), index.as_uri())
    text = path.read_text()
    for project, digest in digests.items():
        assert f"--hash=sha256:{digest}" in text, project
    assert "torch==2.5.1+cu121" in text
    assert main(["verify", str(path)], out=out) == 1  # not the target's real index
    assert "resolved from" in out.getvalue()


def test_pip_resolve_reports_its_progress(matrix, tmp_path):
    items = [("torch", "2.14.1", H["a"]), ("torchvision", "0.29.1", H["b"]), ("numpy", "2", H["c"])]
    fast = fake_pip(items)

    def slow(argv):  # a resolve that takes a while, as pip's does for CUDA wheels
        import time

        time.sleep(0.5)
        return fast(argv)

    lines = []
    resolver = PipResolver(run=slow, progress=lines.append, tick_s=0.1)
    lock_pip(matrix.target("cu130"), tmp_path, resolver)
    assert lines[0].startswith("resolving torch==2.14.1 torchvision==0.29.1 numpy for ")
    assert "from https://pypi.org/simple" in lines[0]
    assert any(line.startswith("  still resolving (") for line in lines[1:-1])
    assert lines[-1].startswith("  resolved 3 wheels in ")


def test_pip_resolve_errors_still_raise_with_progress(matrix, tmp_path):
    def broken(argv):
        raise OSError("pip vanished")

    resolver = PipResolver(run=broken, progress=lambda line: None, tick_s=0.1)
    with pytest.raises(OSError, match="pip vanished"):
        lock_pip(matrix.target("cu130"), tmp_path, resolver)

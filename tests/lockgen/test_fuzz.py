"""Fuzzing lockgen's readers: mutated matrix/targets/GPU files, conda and pip locks, and
installs of mutated locks. Whatever the input, lockgen either works or raises its own
:class:`~lockgen.errors.LockgenError` (the CLI's ``lockgen: error: ...``, exit 2); any other
exception is a bug. Bounded to a few seconds each (``max_examples``)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from checkout import ENVS, FACTS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockgen.errors import LockgenError
from lockgen.install import install_lockfile
from lockgen.load import load_matrix
from lockgen.verify import verify_file

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)

# values a TOML or YAML field might be given instead of the right one
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["", "2.1", "12.1", "cu121", "٢.١", "9" * 5000, "sm_86", "*", "../x"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _toml_value(v) -> str:
    """``v`` as TOML (None, which TOML lacks, as an empty inline table)."""
    import json
    import math

    if v is None:
        return "{}"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


def _mutate_text(data, text: str) -> str:
    """One edit of ``text``: a field given another value, a line dropped or repeated, or
    characters cut, inserted or replaced."""
    lines = text.splitlines()
    kind = data.draw(st.sampled_from(["value", "drop", "repeat", "cut", "insert"]))
    if kind in ("value", "drop", "repeat"):
        fields = [i for i, ln in enumerate(lines) if " = " in ln or ": " in ln] or [0]
        i = data.draw(st.sampled_from(fields))
        if kind == "drop":
            del lines[i]
        elif kind == "repeat":
            lines.insert(i, lines[i])
        else:
            sep = " = " if " = " in lines[i] else ": "
            key = lines[i].split(sep, 1)[0]
            lines[i] = f"{key}{sep}{_toml_value(data.draw(VALUES))}"
        return "\n".join(lines) + "\n"
    at = data.draw(st.integers(0, len(text)))
    if kind == "cut":
        return text[:at] + text[at + data.draw(st.integers(1, 200)) :]
    return text[:at] + data.draw(st.text(max_size=20)) + text[at:]


@pytest.mark.parametrize("name", ["matrix.toml", "targets.toml", "gpus.toml"])
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_fuzz_matrix_and_targets_loaders(tmp_path_factory, name, data):
    envs = tmp_path_factory.mktemp("envs")
    for f in ("matrix.toml", "targets.toml", "gpus.toml"):
        shutil.copy(FACTS / f, envs / f)
    (envs / name).write_text(_mutate_text(data, (FACTS / name).read_text()))
    try:
        load_matrix(envs / "matrix.toml")
    except LockgenError:
        pass


# -- conda locks: verify and install ---------------------------------------------------------


@pytest.fixture(scope="module")
def matrix(conda_matrix):
    return conda_matrix


@pytest.fixture(scope="module")
def locked(locked_envs):
    return locked_envs


def _paths(node, prefix=()):
    """Every (path, value) of a parsed YAML document."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _mutate_lock(data, text: str) -> str:
    """The lock with one field given another value or removed, or one text edit."""
    if data.draw(st.booleans()):
        return _mutate_text(data, text)
    doc = yaml.safe_load(text)
    where = data.draw(st.sampled_from([p for p, _ in _paths(doc) if p]))
    parent = doc
    for k in where[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()):
        parent[where[-1]] = data.draw(VALUES)
    elif isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent.pop(where[-1])
    return yaml.safe_dump(doc, sort_keys=False)


def _mutated_envs(locked: Path, tmp: Path, data) -> Path:
    envs = tmp / "envs"
    shutil.copytree(locked, envs)
    lock = envs / "cpu-conda.lock"
    lock.write_text(_mutate_lock(data, lock.read_text()))
    return lock


@FUZZ
@given(data=st.data())
def test_fuzz_verify_of_conda_locks(matrix, locked, tmp_path_factory, data):
    lock = _mutated_envs(locked, tmp_path_factory.mktemp("v"), data)
    try:
        verify_file(lock, matrix)
    except LockgenError:
        pass


@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_fuzz_install_of_mutated_conda_locks(matrix, locked, tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("i")
    lock = _mutated_envs(locked, tmp, data)
    try:
        install_lockfile(
            lock,
            tmp / "env",
            matrix,
            platform="linux-64",
            driver_check=False,
            cache_dir=tmp / "pkgs",
        )
    except LockgenError:
        pass


# -- pip hash-locks ---------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzz_verify_of_pip_locks(matrix, tmp_path_factory, data):
    src = ENVS / "cu130.requirements.txt"
    lock = tmp_path_factory.mktemp("p") / src.name
    text = src.read_text()
    extra = data.draw(
        st.sampled_from(
            ["", "--index-url", "-i", "--extra-index-url x", "-r", "-e .", "--hash=sha256:", "\\"]
        )
    )
    lock.write_text(_mutate_text(data, text) + extra + "\n")
    try:
        verify_file(lock, matrix)
    except LockgenError:
        pass


# -- the trust rules, whatever the lock: a hostile edit never verifies -----------------------

# markers that leave out at least one platform x Python of cu130 (linux x86_64 + aarch64,
# Pythons 3.10-3.14)
DROPPING_MARKERS = st.sampled_from(
    [
        'sys_platform == "win32"',
        'platform_machine == "x86_64"',
        'platform_machine != "aarch64"',
        'python_version < "3.14"',
        'python_version >= "3.11"',
        'python_full_version < "3.10"',
        'python_version == "3.12" or platform_machine == "aarch64"',
        'os_name == "nt"',
        'platform_system == "Darwin"',
        'implementation_name == "pypy"',
    ]
)
HOSTS = st.sampled_from(
    [
        "https://evil.example",
        "http://files.pythonhosted.org",
        "https://download.pytorch.org/whl/cpu",
    ]
)


def _pip_hostile(data, text: str) -> str:
    """One edit that breaks a trust rule: a marker that drops torch, torchvision or the CUDA
    runtime somewhere, a direct URL, a pre-/post-release or non-exact torch pin, extras."""
    pins = re.findall(r"^([a-z0-9-]+)==(\S+)", text, re.M)
    kind = data.draw(st.sampled_from(["marker", "url", "release", "extras", "operator"]))
    if kind == "marker":
        name = data.draw(st.sampled_from(["torch", "torchvision", "nvidia-cuda-runtime"]))
        version = dict(pins)[name]
        marker = data.draw(DROPPING_MARKERS)
        return text.replace(f"{name}=={version} ", f"{name}=={version} ; {marker} ", 1)
    name, version = data.draw(st.sampled_from(pins))
    if kind == "url":
        host = data.draw(HOSTS)
        new = f"{name} @ {host}/{name}-{version}-py3-none-any.whl"
    elif kind == "release":
        name, version = "torch", dict(pins)["torch"]
        new = (
            f"torch=={version}{data.draw(st.sampled_from(['rc1', '.post1', '.dev0', '.1', 'a0']))}"
        )
    elif kind == "extras":
        new = f"{name}[{data.draw(st.sampled_from(['all', 'dev', 'x']))}]=={version}"
    else:
        op = data.draw(st.sampled_from([">=", "~=", "===", "<=", "!="]))
        new = f"{name}{op}{version}"
    return re.sub(rf"^{re.escape(name)}=={re.escape(version)}", new, text, count=1, flags=re.M)


@FUZZ
@given(data=st.data())
def test_fuzz_hostile_pip_locks_never_verify(matrix, tmp_path_factory, data):
    src = ENVS / "cu130.requirements.txt"
    lock = tmp_path_factory.mktemp("hp") / src.name
    text = src.read_text()
    hostile = _pip_hostile(data, text)
    assert hostile != text
    lock.write_text(hostile)
    assert not verify_file(lock, matrix).ok


def _uv_copy(tmp: Path) -> Path:
    project = tmp / "envs" / "uv" / "cu130"
    shutil.copytree(ENVS / "uv" / "cu130", project)
    return project / "uv.lock"


@FUZZ
@given(data=st.data())
def test_fuzz_verify_of_uv_locks(matrix, tmp_path_factory, data):
    lock = _uv_copy(tmp_path_factory.mktemp("u"))
    lock.write_text(_mutate_text(data, lock.read_text()))
    try:
        verify_file(lock, matrix)
    except LockgenError:
        pass


def _uv_hostile(data, text: str) -> str:
    """One edit that breaks a uv trust rule: a file URL elsewhere or of another release, a
    non-registry source, a marker dropping torch or torchvision from the project."""
    kind = data.draw(st.sampled_from(["host", "filename", "source", "marker"]))
    if kind == "marker":  # torchvision needs torch: both leave the project's dependencies
        marker = data.draw(DROPPING_MARKERS).replace('"', "'")
        root = text.index('source = { virtual = "." }')
        tail = text[root:]
        for name in ("torch", "torchvision"):
            tail = tail.replace(
                f'    {{ name = "{name}" }},\n',
                f'    {{ name = "{name}", marker = "{marker}" }},\n',
                1,
            )
        return text[:root] + tail
    urls = re.findall(r'url = "(https://files\.pythonhosted\.org/packages/[^"]+)"', text)
    url = data.draw(st.sampled_from(urls))
    if kind == "host":
        new = data.draw(HOSTS) + "/packages/" + url.rsplit("/", 1)[1]
        return text.replace(url, new)
    if kind == "filename":
        url = data.draw(st.sampled_from([u for u in urls if u.endswith(".whl")]))
        name, version, rest = url.rsplit("/", 1)[1].split("-", 2)
        other = data.draw(st.sampled_from([version + "%2Bcpu", version + ".post1", "0.0.1"]))
        return text.replace(url, url.rsplit("/", 1)[0] + f"/{name}-{other}-{rest}")
    names = re.findall(r'^name = "([^"]+)"\nversion = "[^"]+"\nsource = \{ registry', text, re.M)
    name = data.draw(st.sampled_from(names))
    source = data.draw(
        st.sampled_from(
            [
                '{ git = "https://evil.example/x" }',
                '{ path = "evil" }',
                '{ url = "https://evil.example/x.whl" }',
            ]
        )
    )
    return re.sub(
        rf'^(name = "{re.escape(name)}"\nversion = "[^"]+"\nsource = )\{{ registry = "[^"]+" \}}',
        lambda m: m.group(1) + source,
        text,
        count=1,
        flags=re.M,
    )


@FUZZ
@given(data=st.data())
def test_fuzz_hostile_uv_locks_never_verify(matrix, tmp_path_factory, data):
    lock = _uv_copy(tmp_path_factory.mktemp("hu"))
    text = lock.read_text()
    hostile = _uv_hostile(data, text)
    assert hostile != text
    lock.write_text(hostile)
    assert not verify_file(lock, matrix).ok


def _conda_hostile(data, url: str, channel: str) -> str:
    """A package URL that breaks a conda trust rule."""
    rest = url.removeprefix(channel)  # /<subdir>/<file>
    subdir, filename = rest.strip("/").split("/")
    kind = data.draw(st.sampled_from(["host", "backslash", "dots", "query", "name", "subdir"]))
    if kind == "host":
        return data.draw(HOSTS) + rest
    if kind == "backslash":
        return f"{channel}/{subdir}/x\\..\\{filename}"
    if kind == "dots":
        return (
            f"{channel}/{subdir}/{data.draw(st.sampled_from(['.', '..', '%2e%2e', '']))}/{filename}"
        )
    if kind == "query":
        return url + data.draw(st.sampled_from(["?a=1", "#frag", "?"]))
    if kind == "name":
        return f"{channel}/{subdir}/" + filename.replace("-", "-0", 1)
    return (
        f"{channel}/{data.draw(st.sampled_from(['win-64', 'osx-64', 'linux-aarch64']))}/{filename}"
    )


@FUZZ
@given(data=st.data())
def test_fuzz_hostile_conda_urls_never_verify(matrix, locked, tmp_path_factory, data):
    envs = tmp_path_factory.mktemp("hc") / "envs"
    shutil.copytree(locked, envs)
    lock = envs / "cpu-conda.lock"
    doc = yaml.safe_load(lock.read_text())
    channel = doc["metadata"]["channels"][0]["url"]
    p = data.draw(st.sampled_from(doc["package"]))
    p["url"] = _conda_hostile(data, p["url"], channel)
    lock.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert not verify_file(lock, matrix).ok

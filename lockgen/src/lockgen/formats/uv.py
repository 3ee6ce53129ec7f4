"""uv projects per target: ``envs/uv/<target>/pyproject.toml`` and ``.python-version``.

``lockgen render <target> --flavor uv`` writes a virtual uv project (``package = false``)
whose dependencies are the target's torch and torchvision plus the project's needs;
``lockgen lock <target> --flavor uv`` runs the real ``uv lock`` on a copy of it, verifies the
``uv.lock`` it writes and only then puts it beside the ``pyproject.toml``. Install with
``uv sync --locked --project envs/uv/<target>`` (the environment lands in
``envs/uv/<target>/.venv``; ``UV_PROJECT_ENVIRONMENT`` moves it).

What pins the CUDA build, so that no resolution can end with a CPU torch:

* torch and torchvision come only from the target's torch index, declared as an explicit
  ``[[tool.uv.index]]`` and named in ``[tool.uv.sources]`` (``explicit = true``: nothing else
  is taken from it, and torch is taken from nowhere else);
* the resolution covers only the target's platforms (``environments``) and must find wheels
  for each of them (``required-environments``): on macOS or Windows PyPI's torch is a CPU
  build, so those are left out of the lock and ``uv sync`` there fails instead of installing
  one;
* wheel-index builds are pinned with their local version (``torch==2.14.1+cu126``), which the
  ``+cpu`` wheel of the same release cannot satisfy;
* a PyPI-default build has no local version, so the lock also pins the CUDA runtime wheel
  that build requires (``nvidia-cuda-runtime==13.0.*``): a torch asking for another CUDA
  runtime conflicts with it, and ``lockgen verify`` checks that torch's locked dependencies
  reach that runtime (a CPU torch has no CUDA dependencies).

The Python is pinned by ``.python-version`` (the target's ``python``); ``requires-python``
spans the target's ``pythons``, so one ``uv.lock`` serves each of them.

Verifying
---------
``verify_uv_lock(path, matrix, ...) -> Report``: the checks ``lockgen verify`` runs on a
``uv.lock``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lockgen.errors import LockgenError
from lockgen.findings import Report
from lockgen.formats.locks import (
    MAX_LOCK_PACKAGES,
    Machine,
    marker_holds,
    marker_problem,
    read_lock_text,
    resolve_target,
    target_machines,
)
from lockgen.formats.pip import (
    PIP_PROJECT_REQUIREMENTS,
    PLATFORM_MARKERS,
    check_cuda_runtime,
    check_cudnn_wheels,
    check_index_hashes,
    check_installed_everywhere,
    check_torch_wheel,
    cuda_runtime_package,
    is_cuda_runtime_wheel,
    is_cudnn_wheel,
    uv_command,
    version_problem,
)
from lockgen.index import canonical_name
from lockgen.matrix import Matrix
from lockgen.output import write_text, write_texts
from lockgen.stack_lock import CHECKED as STACK_CHECKED
from lockgen.stack_lock import check_stack_lock
from lockgen.targets import PYPI, Target

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


@dataclass(frozen=True)
class UvPaths:
    project: Path
    pyproject: Path
    python_version: Path
    lock: Path


def uv_paths(envs_dir: Path, name: str) -> UvPaths:
    project = Path(envs_dir) / "uv" / name
    return UvPaths(
        project, project / "pyproject.toml", project / ".python-version", project / "uv.lock"
    )


def project_name(target: Target) -> str:
    return f"gpufit-{target.name}"


def index_name(target: Target) -> str:
    return f"torch-{target.tag}"


def dependencies(target: Target) -> list[str]:
    """The project's dependencies: torch and torchvision pinned to the build, numpy, for
    a PyPI-default CUDA build its CUDA runtime, and an LLM stack target's pins."""
    exact = [len(v.raw.split(".")) >= 3 for v in (target.torch, target.torchvision)]
    if not all(exact):
        raise LockgenError(
            f"target {target.name}: the uv project needs exact torch and torchvision "
            f"versions (got {target.torch} / {target.torchvision}) to pin the build"
        )
    local = "" if target.pip_source.kind == PYPI else f"+{target.tag}"
    deps = [f"torch=={target.torch.raw}{local}", f"torchvision=={target.torchvision.raw}{local}"]
    deps += list(PIP_PROJECT_REQUIREMENTS)
    if target.cuda is not None and target.pip_source.kind == PYPI:
        deps.append(f"{cuda_runtime_package(target.cuda)}=={target.cuda.raw}.*")
    return deps + list(target.stack)


def requires_python(target: Target) -> str:
    """``>=3.10, <3.15`` for pythons 3.10..3.14; the list must be consecutive minors."""
    ps = sorted(p.minor for p in target.pythons)
    majors = {p.major for p in ps}
    minors = [p.padded(2)[1] for p in ps]
    if len(majors) != 1 or minors != list(range(minors[0], minors[0] + len(minors))):
        raise LockgenError(
            f"target {target.name}: pythons {', '.join(p.raw for p in ps)} are not "
            f"consecutive; a uv project spans one range"
        )
    major = ps[0].major
    return f">={ps[0].raw}, <{major}.{minors[-1] + 1}"


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_str(text: str) -> str:
    """A TOML basic string: quotes, backslashes and every control character TOML forbids
    raw (U+0000-U+001F, U+007F) escaped."""
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_list(items: list[str], indent: str = "    ") -> str:
    return "[\n" + "".join(f"{indent}{_toml_str(i)},\n" for i in items) + "]"


def _why_no_cpu_torch(target: Target) -> str:
    source = target.pip_source
    text = f"torch and torchvision come only from the explicit index below ({source.why})"
    if target.cuda is not None and source.kind == PYPI:
        text += (
            f"; {cuda_runtime_package(target.cuda)}=={target.cuda}.* pins the CUDA runtime "
            "that build requires"
        )
    else:
        text += f"; the local version +{target.tag} pins the build"
    return (
        text + "; the lock covers only the platforms where that is the build (environments, "
        "required-environments). Why no resolution can end with a CPU torch: "
        "lockgen/formats/uv.py."
    )


def pyproject_text(target: Target) -> str:
    envs = [PLATFORM_MARKERS[p].replace('"', "'") for p in target.platforms]
    lines = [
        f"# Generated by `lockgen render {target.name} --flavor uv` from",
        "# lockgen/data/matrix.toml and lockgen/data/targets.toml; do not edit: change those and",
        "# re-render.",
        f"# {target.summary()};",
        f"# Pythons {target.python_range} on {', '.join(target.platforms)}.",
        f"# Lock:    lockgen lock {target.name} --flavor uv   (runs `uv lock`, then verifies)",
        f"# Install: uv sync --locked --project envs/uv/{target.name}",
        "#",
        *(f"# {line}" for line in textwrap.wrap(_why_no_cpu_torch(target), 90)),
        "",
        "[project]",
        f"name = {_toml_str(project_name(target))}",
        'version = "0"',
        f"description = {_toml_str(target.description or target.summary())}",
        f"requires-python = {_toml_str(requires_python(target))}",
        f"dependencies = {_toml_list(dependencies(target))}",
        "",
        "[tool.uv]",
        "package = false",
        f"environments = {_toml_list(envs)}",
        f"required-environments = {_toml_list(envs)}",
        "",
        "[[tool.uv.index]]",
        f"name = {_toml_str(index_name(target))}",
        f"url = {_toml_str(target.pip_source.url)}",
        "explicit = true",
        "",
        "[tool.uv.sources]",
        f'torch = {{ index = "{index_name(target)}" }}',
        f'torchvision = {{ index = "{index_name(target)}" }}',
    ]
    return "\n".join(lines) + "\n"


def python_version_text(target: Target) -> str:
    return f"{target.python.raw}\n"


def render_uv(target: Target, envs_dir: Path) -> list[Path]:
    paths = uv_paths(envs_dir, target.name)
    pyproject = pyproject_text(target)  # raises before anything is written
    return write_texts(
        {paths.pyproject: pyproject, paths.python_version: python_version_text(target)}
    )


def uv_rendered_is_current(target: Target, envs_dir: Path) -> list[str]:
    """Problems if the committed uv project differs from what ``render`` writes now."""
    paths = uv_paths(envs_dir, target.name)
    problems = []
    for path, text in (
        (paths.pyproject, pyproject_text(target)),
        (paths.python_version, python_version_text(target)),
    ):
        rel = f"uv/{target.name}/{path.name}"
        if not path.exists():
            problems.append(f"{rel} is missing: run `lockgen render {target.name} --flavor uv`")
        elif path.read_text() != text:
            problems.append(
                f"{rel} differs from what `lockgen render {target.name} --flavor uv` writes "
                "from the matrix now"
            )
    return problems


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True)


@dataclass(frozen=True)
class UvLockResult:
    path: Path
    report: Report


def lock_uv(
    matrix: Matrix,
    target: Target,
    envs_dir: Path,
    run: Runner = _run,
    uv: Sequence[str] | None = None,
) -> UvLockResult:
    """``uv lock`` the committed project in a scratch copy, verify the ``uv.lock`` it wrote,
    then put it beside the ``pyproject.toml`` (atomically). A failed lock or verification
    leaves any previous ``uv.lock`` untouched."""
    stale = uv_rendered_is_current(target, envs_dir)
    if stale:
        raise LockgenError(f"target {target.name}: " + "; ".join(stale))
    paths = uv_paths(envs_dir, target.name)
    with tempfile.TemporaryDirectory(prefix="lockgen-uv-") as tmp:
        work = Path(tmp) / target.name
        work.mkdir()
        for f in (paths.pyproject, paths.python_version):
            shutil.copyfile(f, work / f.name)
        if paths.lock.exists():  # uv keeps what still fits: a re-lock changes what it must
            shutil.copyfile(paths.lock, work / paths.lock.name)
        argv = [
            *(uv or uv_command()),
            "lock",
            "--project",
            str(work),
            "--no-config",
            "--no-python-downloads",
            "--quiet",
        ]
        res = run(argv)
        lock = work / paths.lock.name
        if res.returncode != 0 or not lock.exists():
            msg = (res.stderr or res.stdout or "").strip()[-3000:]
            raise LockgenError(f"target {target.name}: uv lock failed:\n{msg}")
        text = lock.read_text()
        report = verify_uv_lock(lock, matrix, envs_dir, target=target)
    if not report.ok:
        raise LockgenError(
            f"target {target.name}: uv lock gave a lock that fails verification, not "
            f"written:\n{report.format()}"
        )
    write_text(paths.lock, text)
    report.path = str(paths.lock)
    return UvLockResult(paths.lock, report)


_MD5 = re.compile(r"^[0-9a-f]{32}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# -- uv locks ---------------------------------------------------------------------------------


def _uv_root(lock: dict) -> dict | None:
    return next(
        (
            p
            for p in lock.get("package", [])
            if {"virtual", "editable"} & set((p.get("source") or {}).keys())
        ),
        None,
    )


def _check_uv_stale(report: Report, lock: dict, root: dict, target: Target, envs_dir) -> None:
    for problem in uv_rendered_is_current(target, envs_dir):
        report.error("stale", f"{problem}; re-render and re-lock")
    locked = {
        (d.get("name"), tuple(sorted(d.get("extras") or ())), d.get("specifier", ""))
        for d in (root.get("metadata") or {}).get("requires-dist", [])
    }
    wanted = set()
    for dep in dependencies(target):
        got = re.fullmatch(r"([^=<>!~ \[]+)(?:\[([^\]]*)\])?(.*)", dep)
        assert got is not None
        extras = tuple(sorted(x for x in (got.group(2) or "").split(",") if x))
        wanted.add((got.group(1), extras, got.group(3).strip()))
    if locked != wanted:
        report.error(
            "stale",
            f"the lock was made for the dependencies {sorted(locked)}, the target's "
            f"project asks for {sorted(wanted)}: run `lockgen lock {target.name} --flavor uv`",
        )
    if lock.get("requires-python") != requires_python(target):
        report.error(
            "stale",
            f"the lock's requires-python {lock.get('requires-python')!r} is not the "
            f"target's {requires_python(target)!r}",
        )


def _check_uv_platforms(report: Report, lock: dict, target: Target) -> None:
    required = lock.get("required-markers") or []
    for platform in target.platforms:
        machine = PLATFORM_MARKERS[platform].split('platform_machine == "')[1].rstrip('"')
        if not any(f"platform_machine == '{machine}'" in m for m in required):
            report.error(
                "platform",
                f"{platform} is not a required environment of the lock (target "
                f"{target.name} needs {', '.join(target.platforms)})",
            )


def _check_uv_hashes(report: Report, packages: list[dict]) -> list[tuple]:
    """Every registry file has a well-formed sha256; returns (name, version, [sha256])."""
    pins = []
    for p in packages:
        if "registry" not in (p.get("source") or {}):
            continue
        where = f"{p.get('name')} {p.get('version')}"
        files = _files(p)
        if not files:
            report.error("hash", f"{where}: no wheel or sdist with a hash in the lock")
        hashes = []
        for f in files:
            h = str(f.get("hash", ""))
            if not h.startswith("sha256:") or not _SHA256.match(h.removeprefix("sha256:")):
                report.error("hash", f"{where}: hash {h!r} of {f.get('url')} is malformed")
            else:
                hashes.append(h.removeprefix("sha256:"))
        pins.append((p.get("name"), p.get("version"), hashes, p["source"]["registry"]))
    return pins


def _files(p: dict) -> list[dict]:
    files = [f for f in (p.get("wheels") or []) if isinstance(f, dict)]
    return files + ([p["sdist"]] if isinstance(p.get("sdist"), dict) else [])


# PyPI's index and where it serves files from
_PYPI_FILES = "https://files.pythonhosted.org/packages/"


def _file_prefix(registry: str, pypi_index: str) -> str:
    """Where the files of a registry lie: PyPI's on its file host, any other index's under
    the index's own folder (``https://download.pytorch.org/whl/cu126/``)."""
    if registry.rstrip("/") == pypi_index.rstrip("/"):
        return _PYPI_FILES
    return registry.rstrip("/") + "/"


def _url_problem(url: str, prefix: str) -> str | None:
    """Why a file URL of the lock is not a plain https URL under ``prefix`` (None: it is)."""
    import urllib.parse

    if not isinstance(url, str) or not url:
        return "no URL"
    parts = urllib.parse.urlsplit(url)
    if (
        parts.scheme != "https"
        or parts.query
        or parts.fragment
        or "\\" in url
        or "@" in parts.netloc
    ):
        return f"{url} is not a plain https URL (no query, fragment, credentials or backslash)"
    segments = urllib.parse.unquote(parts.path).split("/")[1:]
    if any(s in ("", ".", "..") for s in segments) or re.search(r"%(2f|5c|2e)", url, re.I):
        return f"{url} has an empty, '.', '..' or encoded separator segment"
    if not url.startswith(prefix):
        return f"{url} is not under {prefix}"
    return None


def _file_name_problem(url: str, name: str, version: str) -> str | None:
    """Why the file name of a wheel or sdist URL does not name the entry's project and
    version, local tag included (None: it does)."""
    import urllib.parse

    from lockgen.formats.pep508 import utils
    from lockgen.formats.pep508 import version as pep440

    InvalidVersion, Pep440 = pep440.InvalidVersion, pep440.Version

    filename = urllib.parse.unquote(url.rsplit("/", 1)[-1])
    try:
        if filename.endswith(".whl"):
            got_name, got_version = utils.parse_wheel_filename(filename)[:2]
        else:
            got_name, got_version = utils.parse_sdist_filename(filename)
        want = Pep440(version)
    except (utils.InvalidWheelFilename, utils.InvalidSdistFilename, InvalidVersion) as exc:
        return f"{filename}: not a wheel or sdist of {name} {version} ({exc})"
    if canonical_name(got_name) != canonical_name(name) or got_version != want:
        return f"{filename} is {got_name} {got_version}, the entry is {name} {version}"
    return None


def _check_uv_sources(report: Report, packages: list[dict], root: dict, target: Target) -> None:
    """Every package but the project comes from a registry: torch and torchvision from the
    target's index, the rest from PyPI; every file lies under its registry's files and is
    named for its entry; torch and torchvision are exactly the target's release and build,
    nothing else is a pre- or dev release."""
    source = target.pip_source
    pypi_index = target.pip_channel.index_url
    for p in packages:
        if p is root:
            continue
        name, version = str(p.get("name")), str(p.get("version"))
        where = f"{name} {version}"
        src = p.get("source") or {}
        registry = src.get("registry") if isinstance(src, dict) else None
        if not isinstance(registry, str):
            kind = ", ".join(src) if isinstance(src, dict) else repr(src)
            report.error(
                "source",
                f"{where} comes from a {kind or '?'} source: only index packages are checked",
            )
            continue
        own = name in ("torch", "torchvision")
        allowed = source.url if own else pypi_index
        if registry.rstrip("/") != allowed.rstrip("/"):
            report.error(
                "torch" if own else "source",
                f"{where} comes from {registry}, but target {target.name}'s "
                + (
                    f"build comes from {source.url}"
                    if own
                    else f"other packages come from {pypi_index}"
                ),
            )
            continue
        prefix = _file_prefix(registry, pypi_index)
        for f in _files(p):
            problem = _url_problem(f.get("url"), prefix) or _file_name_problem(
                f["url"], name, version
            )
            if problem:
                report.error("source", f"{where}: {problem}")
        if not own:
            problem = version_problem(name, version, canonical_name(name) in target.prereleases)
            if problem:
                report.error("pin", problem)
        for dep in _deps(p, all_extras=True):
            marker = dep.get("marker", "")
            if marker and marker_problem(marker):
                report.error(
                    "marker", f"{where}: dependency {dep.get('name')}: {marker_problem(marker)}"
                )


def _deps(p: dict, extras=(), all_extras: bool = False) -> list[dict]:
    """The dependency entries of a package, with those of the extras asked for (every extra,
    and the project's dependency groups, which ``uv sync`` installs, with ``all_extras``)."""
    deps = [d for d in (p.get("dependencies") or []) if isinstance(d, dict)]
    optional = p.get("optional-dependencies") or {}
    groups = p.get("dev-dependencies") or {}
    for name, more in (
        [*optional.items(), *groups.items()]
        if isinstance(optional, dict) and isinstance(groups, dict)
        else []
    ):
        if all_extras or name in extras or name in groups:
            deps += [d for d in more if isinstance(d, dict)]
    return deps


def _installed(report: Report, packages: list[dict], root: dict, machine: Machine) -> dict:
    """``{name: package}``: what ``uv sync`` installs on the machine, walking from the project
    through the dependencies (and extras) whose markers hold there."""
    by_name: dict[str, list[dict]] = defaultdict(list)
    for p in packages:
        by_name[canonical_name(str(p.get("name")))].append(p)
    installed: dict[str, dict] = {}
    todo, seen = [(root, ())], set()
    while todo:
        pkg, extras = todo.pop()
        key = (id(pkg), tuple(sorted(extras)))
        if key in seen:
            continue
        seen.add(key)
        for dep in _deps(pkg, extras):
            marker = str(dep.get("marker", ""))
            if marker and marker_problem(marker):
                continue  # reported by the source check
            holds = marker_holds(marker, machine)
            if holds is None:
                report.error(
                    "marker",
                    f"{dep.get('name')}: marker {marker!r} depends on the Python patch release",
                )
            if holds is False:
                continue
            name = canonical_name(str(dep.get("name")))
            choices = [
                c
                for c in by_name.get(name, [])
                if "version" not in dep or str(c.get("version")) == str(dep["version"])
            ]
            if len(choices) != 1:
                report.error(
                    "package",
                    f"{machine}: dependency {dep} names {len(choices)} packages of the lock",
                )
                continue
            chosen = choices[0]
            if name in installed and installed[name] is not chosen:
                report.error("package", f"{machine}: two versions of {name} would be installed")
            installed[name] = chosen
            extra = dep.get("extra") or []
            todo.append((chosen, tuple(extra) if isinstance(extra, list) else ()))
    return installed


def verify_uv_lock(
    path: Path,
    matrix: Matrix,
    envs_dir: Path | None = None,
    target: Target | None = None,
    check_index: bool = False,
) -> Report:
    """Check a ``uv.lock`` against its target: the project it locks is the one ``render``
    writes now; every package comes from its index (torch and torchvision from the target's)
    with files under that index named for the entry; torch/torchvision are exactly the
    target's release and build; on every platform x Python of the target the lock installs
    torch, torchvision and (a PyPI CUDA build) the CUDA runtime torch's dependencies reach;
    every platform is required; every file has a sha256 (with ``check_index``: the one the
    index publishes)."""
    path = Path(path)
    text = read_lock_text(path, "uv.lock")
    try:
        lock = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockgenError(f"{path} is not a readable uv.lock: {exc}") from None
    try:
        return _verify_uv(path, lock, matrix, envs_dir, target, check_index)
    except (AttributeError, TypeError, KeyError, ValueError) as exc:  # a field of another type
        raise LockgenError(
            f"{path} is not a uv.lock lockgen can read: {type(exc).__name__}: {exc}"
        ) from None


def _verify_uv(
    path: Path,
    lock: dict,
    matrix: Matrix,
    envs_dir: Path | None,
    target: Target | None,
    check_index: bool,
) -> Report:
    report = Report(str(path), None)
    packages = [p for p in lock.get("package", []) if isinstance(p, dict) and "name" in p]
    if len(packages) > MAX_LOCK_PACKAGES:
        raise LockgenError(
            f"{path} has {len(packages)} packages: not a lock (at most {MAX_LOCK_PACKAGES})"
        )
    root = _uv_root(lock)
    if root is None:
        report.error("target", "the lock has no project (a virtual root package)")
        return report
    name = str(root["name"]).removeprefix("gpufit-")
    report.target = name
    if target is None:
        target = resolve_target(matrix, name, report)
        if target is None:
            return report
        if path.parent.name != name:
            report.error(
                "target",
                f"the lock is for target {name} but lies in {path.parent.name}/ "
                f"(expected envs/uv/{name}/uv.lock)",
            )
    elif root["name"] != project_name(target):
        report.error("target", f"the lock is for {root['name']}, not {project_name(target)}")
    report.target = target.name
    envs_dir = Path(envs_dir) if envs_dir else path.resolve().parent.parent.parent
    _check_uv_stale(report, lock, root, target, envs_dir)
    _check_uv_platforms(report, lock, target)
    _check_uv_sources(report, packages, root, target)
    pypi = target.pip_source.kind == "pypi"
    for what, want in (("torch", target.torch), ("torchvision", target.torchvision)):
        for p in packages:
            if p["name"] == what:
                check_torch_wheel(report, target, what, str(p.get("version")), want, pypi)
    installed = {m: _installed(report, packages, root, m) for m in target_machines(target)}
    check_installed_everywhere(
        report, target, installed, pypi, {canonical_name(str(p["name"])) for p in packages}
    )
    runtimes, cudnns = set(), set()
    for machine, names in installed.items():
        torch = names.get("torch")
        reach = _installed(report, packages, torch, machine) if torch else {}
        for n, p in reach.items():
            if is_cuda_runtime_wheel(n):
                runtimes.add((n, str(p.get("version"))))
            if is_cudnn_wheel(n):
                cudnns.add((n, str(p.get("version"))))
        if (
            torch
            and pypi
            and target.cuda is not None
            and not any(is_cuda_runtime_wheel(n) for n in reach)
        ):
            report.error(
                "torch",
                f"no {cuda_runtime_package(target.cuda)} in the lock among torch's dependencies "
                f"on {machine}: this torch is a CPU build",
            )
    # absent: reported per machine above
    check_cuda_runtime(report, target, sorted(runtimes), pypi=False)
    check_cudnn_wheels(report, target, sorted(cudnns))
    if target.is_stack:
        versions = {
            m: {n: str(p.get("version")) for n, p in names.items()}
            for m, names in installed.items()
        }
        check_stack_lock(report, target, versions)
    pins = _check_uv_hashes(report, packages)
    if check_index:
        for registry in sorted({p[3] for p in pins}):
            check_index_hashes(report, registry, [p[:3] for p in pins if p[3] == registry])
    report.checked = [
        "project",
        "sources",
        "markers per platform x python",
        "torch build",
        "CUDA",
        "hashes",
    ]
    report.checked += ["index hashes"] if check_index else []
    report.checked += [STACK_CHECKED] if target.is_stack else []
    return report

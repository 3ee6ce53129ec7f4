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
from typing import TYPE_CHECKING

from lockgen.errors import LockgenError
from lockgen.findings import Report
from lockgen.formats.locks import resolve_target
from lockgen.formats.pip import (
    PIP_PROJECT_REQUIREMENTS,
    PLATFORM_MARKERS,
    check_cuda_runtime,
    check_cudnn_wheels,
    check_index_hashes,
    check_torch_wheel,
    cuda_runtime_package,
    uv_command,
)
from lockgen.matrix import Matrix
from lockgen.output import write_text, write_texts
from lockgen.targets import PYPI, Target

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:  # pragma: no cover
    pass


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
    """The project's dependencies: torch and torchvision pinned to the build, numpy, and for
    a PyPI-default CUDA build its CUDA runtime."""
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
    return deps


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


def _uv_closure(packages: list[dict], start: str) -> set[str]:
    """Names reachable from ``start`` through dependencies and every extra."""
    from lockgen.index import canonical_name

    edges: dict[str, set[str]] = defaultdict(set)
    for p in packages:
        deps = list(p.get("dependencies", []))
        for extra in (p.get("optional-dependencies") or {}).values():
            deps += extra
        edges[canonical_name(p["name"])] |= {canonical_name(d["name"]) for d in deps}
    seen, todo = set(), [canonical_name(start)]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += edges.get(n, ())
    return seen


def _check_uv_stale(report: Report, lock: dict, root: dict, target: Target, envs_dir) -> None:
    for problem in uv_rendered_is_current(target, envs_dir):
        report.error("stale", f"{problem}; re-render and re-lock")
    locked = {
        (d.get("name"), d.get("specifier", ""))
        for d in (root.get("metadata") or {}).get("requires-dist", [])
    }
    wanted = set()
    for dep in dependencies(target):
        name = re.split(r"[=<>!~ ]", dep, maxsplit=1)[0]
        wanted.add((name, dep[len(name) :].strip()))
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
        files = list(p.get("wheels") or []) + ([p["sdist"]] if p.get("sdist") else [])
        where = f"{p.get('name')} {p.get('version')}"
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


def verify_uv_lock(
    path: Path,
    matrix: Matrix,
    envs_dir: Path | None = None,
    target: Target | None = None,
    check_index: bool = False,
) -> Report:
    """Check a ``uv.lock`` against its target: the project it locks is the one ``render``
    writes now, torch/torchvision are the target's build from its index (a PyPI build's
    dependencies reach the target's CUDA runtime; a wheel-index build carries its +tag),
    every platform is required, every file has a sha256 (with ``check_index``: the one the
    index publishes)."""
    path = Path(path)
    report = Report(str(path), None)
    try:
        lock = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LockgenError(f"{path} is not a readable uv.lock: {exc}") from None
    packages = [p for p in lock.get("package", []) if isinstance(p, dict) and "name" in p]
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
    source = target.pip_source
    pypi = source.kind == "pypi"
    by_name: dict[str, list[dict]] = defaultdict(list)
    for p in packages:
        by_name[p["name"]].append(p)
    for what, want in (("torch", target.torch), ("torchvision", target.torchvision)):
        if not by_name.get(what):
            report.error("torch", f"no {what} in the lock")
        for p in by_name.get(what, []):
            check_torch_wheel(report, target, what, str(p.get("version")), want, pypi)
            registry = (p.get("source") or {}).get("registry", "")
            if registry.rstrip("/") != source.url.rstrip("/"):
                report.error(
                    "torch",
                    f"{what} comes from {registry or '?'}, but target {target.name}'s build "
                    f"comes from {source.url}",
                )
    reach = _uv_closure(packages, "torch") if by_name.get("torch") else set()
    runtimes = [
        (p["name"], str(p.get("version")))
        for p in packages
        if p["name"].startswith("nvidia-cuda-runtime") and p["name"] in reach
    ]
    check_cuda_runtime(report, target, runtimes, pypi)
    cudnns = [
        (p["name"], str(p.get("version")))
        for p in packages
        if p["name"].startswith("nvidia-cudnn") and p["name"] in reach
    ]
    check_cudnn_wheels(report, target, cudnns)
    pins = _check_uv_hashes(report, packages)
    if check_index:
        for registry in sorted({p[3] for p in pins}):
            check_index_hashes(report, registry, [p[:3] for p in pins if p[3] == registry])
    report.checked = ["project", "platforms", "torch build", "CUDA", "hashes"]
    report.checked += ["index hashes"] if check_index else []
    return report

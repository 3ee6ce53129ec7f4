"""``lockgen verify``: check a lockfile against its target.

For a conda-lock lockfile (``envs/<target>.lock``):

* ``target``      the target it was made for (``metadata.custom_metadata``, else the file name)
                  exists, and the recorded ``__cuda`` is the target's CUDA;
* ``platform``    every platform of the target is in the lock and has packages;
* ``hash``        every package has a URL and well-formed hashes (md5 + sha256 for conda
                  packages, sha256 for pip); with ``check_channels`` each hash is compared
                  with what the channel's repodata publishes for that file;
* ``torch``       ``pytorch`` on every platform is the CUDA build for the target's CUDA
                  (never a ``cpu`` build; for the CPU target, never a CUDA build), and
                  ``torchvision`` agrees;
* ``cuda``        ``cuda-version`` / ``pytorch-cuda`` is the target's CUDA version;
* ``cudnn``       the cuDNN named in the build string (legacy channel) or the ``cudnn``
                  package (conda-forge, major version only: conda-forge ships its own cuDNN
                  minor) matches the matrix;
* ``stale``       the lock's content hash equals conda-lock's hash of the current
                  ``envs/<target>.yml`` + ``envs/<target>.virtual-packages.yml``, and those
                  files are what ``lockgen render`` writes from the matrix now.

For a pip hash-lock (``envs/<target>.requirements.txt``): every requirement is pinned with
``==`` and has ``--hash``, the lock covers the target's platforms x Pythons, its one
``--index-url`` is where the target's build comes from, torch/torchvision are the target's
versions and build (``+cu126`` from the wheel index; from PyPI, no local tag and the locked
``nvidia-cuda-runtime*`` is the target's CUDA), and the cuDNN wheel is the matrix's.

For a ``uv.lock`` (``envs/uv/<target>/uv.lock``): the same build checks on the locked torch
(a PyPI build's dependencies must reach the target's CUDA runtime: a CPU torch has none), the
lock is of the project ``render --flavor uv`` writes now, every platform of the target is a
required environment, and every file has a sha256.

``check_channels`` (``--check-channels``) compares every hash with what the conda channel's
repodata or the package index publishes (network; for an index only metadata is read).

``verify_file(path, matrix)`` → :class:`Report` (``ok``, ``findings``, ``format()``).
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lockgen import lockfile as lf
from lockgen.errors import LockgenError
from lockgen.matrix import Matrix, Target, default_envs_dir
from lockgen.render.conda import rendered_is_current, target_paths
from lockgen.versions import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:  # pragma: no cover
    from conda_lock.lockfile.v2prelim.models import Lockfile

ERROR, WARNING = "error", "warning"
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Finding:
    level: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper()} [{self.check}] {self.message}"


@dataclass
class Report:
    path: str
    target: str | None
    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.level == ERROR for f in self.findings)

    def error(self, check: str, message: str) -> None:
        self.findings.append(Finding(ERROR, check, message))

    def warn(self, check: str, message: str) -> None:
        self.findings.append(Finding(WARNING, check, message))

    def format(self) -> str:
        head = f"{self.path} (target {self.target or '?'}): "
        head += "OK" if self.ok else "FAILED"
        lines = [head, *(f"  {f}" for f in self.findings)]
        if self.ok and self.checked:
            lines.append(f"  checked: {', '.join(self.checked)}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "target": self.target,
            "ok": self.ok,
            "findings": [f.__dict__ for f in self.findings],
            "checked": self.checked,
        }


# -- build strings ----------------------------------------------------------------------------

_LEGACY_CUDA = re.compile(r"(?:^|_)cuda(\d+\.\d+)(?:_|$)")
_NODOT_CUDA = re.compile(r"(?:^|_)cu(?:da)?(\d{2,3})(?:_|$)")
_CPU = re.compile(r"(?:^|_)cpu(?:_|$)")
_LEGACY_CUDNN = re.compile(r"(?:^|_)cudnn(\d+(?:\.\d+)*)(?:_|$)")


def build_cuda(build: str) -> Version | str | None:
    """The CUDA version a pytorch/torchvision build string names; ``"cpu"`` for a CPU build;
    None when it says neither. ``py3.11_cuda12.1_cudnn8.9.2_0`` → 12.1,
    ``cuda130_mkl_py311_h1234567_200`` → 13.0, ``py311_cu121`` → 12.1, ``cpu_mkl_…`` → cpu."""
    if _CPU.search(build):
        return "cpu"
    m = _LEGACY_CUDA.search(build)
    if m:
        return Version.parse(m.group(1))
    m = _NODOT_CUDA.search(build)
    if m:
        d = m.group(1)
        return Version((int(d[:-1]), int(d[-1])), f"{int(d[:-1])}.{d[-1]}")
    return None


def build_cudnn(build: str) -> Version | None:
    m = _LEGACY_CUDNN.search(build)
    return Version.parse(m.group(1)) if m else None


# -- conda lockfiles --------------------------------------------------------------------------


def _resolve_target(matrix: Matrix, name: str | None, report: Report) -> Target | None:
    if not name:
        report.error(
            "target",
            "the lockfile names no target (metadata.custom_metadata "
            f"'{lf.META_TARGET}') and its file name is not one",
        )
        return None
    if name not in matrix.targets:
        report.error("target", f"unknown target {name!r} (known: {', '.join(matrix.targets)})")
        return None
    return matrix.targets[name]


def _check_torch(report: Report, target: Target, platform: str, pkgs: dict) -> None:
    torch = pkgs.get("pytorch")
    if torch is None:
        report.error("torch", f"{platform}: no pytorch package in the lock")
        return
    build = torch.build or ""
    got = build_cuda(build)
    desc = f"{platform}: pytorch {torch.version} build {build}"
    if target.is_cpu:
        if got != "cpu":
            report.error(
                "torch", f"{desc} is not a CPU build, but target {target.name} is CPU-only"
            )
    elif got == "cpu":
        report.error(
            "torch",
            f"{desc} is the CPU build; target {target.name} needs the "
            f"CUDA {target.cuda} build (pin `pytorch * cuda*` and give the "
            f"solve __cuda={target.cuda})",
        )
    elif got is None:
        report.error("torch", f"{desc}: the build string names no CUDA version")
    elif got != target.cuda:
        report.error(
            "torch", f"{desc} is a CUDA {got} build, target {target.name} is CUDA {target.cuda}"
        )
    if not Version.parse(torch.version).matches_prefix(target.torch):
        report.error("torch", f"{platform}: pytorch {torch.version} is not torch {target.torch}")
    vision = pkgs.get("torchvision")
    if vision is None:
        report.error("torch", f"{platform}: no torchvision package in the lock")
    else:
        vgot = build_cuda(vision.build or "")
        if target.is_cpu and vgot not in ("cpu", None):
            report.error(
                "torch",
                f"{platform}: torchvision build {vision.build} is a CUDA build in a CPU target",
            )
        elif not target.is_cpu and vgot == "cpu":
            report.error("torch", f"{platform}: torchvision build {vision.build} is the CPU build")
        elif isinstance(vgot, Version) and vgot != target.cuda:
            report.error(
                "torch",
                f"{platform}: torchvision build {vision.build} is for CUDA "
                f"{vgot}, not {target.cuda}",
            )
        if not Version.parse(vision.version).matches_prefix(target.torchvision):
            report.error(
                "torch", f"{platform}: torchvision {vision.version} is not {target.torchvision}"
            )
    # cuDNN
    if target.cudnn is not None:
        cudnn = build_cudnn(build)
        if cudnn is not None:
            if not target.cudnn.matches_prefix(cudnn):
                report.error(
                    "cudnn",
                    f"{platform}: pytorch build {build} has cuDNN {cudnn}, "
                    f"the matrix says {target.cudnn}",
                )
        elif "cudnn" in pkgs:
            v = Version.parse(pkgs["cudnn"].version.split("+")[0])
            if v.major != target.cudnn.major:
                report.error(
                    "cudnn",
                    f"{platform}: cudnn {v} is not cuDNN "
                    f"{target.cudnn.major} (matrix: {target.cudnn})",
                )
            elif not v.matches_prefix(target.cudnn.minor):
                report.warn(
                    "cudnn",
                    f"{platform}: cudnn {v} differs from the pip build's "
                    f"{target.cudnn} (the channel ships its own cuDNN)",
                )


def _check_cuda_selector(report: Report, target: Target, platform: str, pkgs: dict) -> None:
    if target.cuda is None:
        return
    meta = target.conda_channel.cuda_metapackage
    names = [meta] + [n for n in ("cuda-version",) if n != meta]
    found = False
    for name in names:
        pkg = pkgs.get(name)
        if pkg is None:
            continue
        found = True
        v = Version.parse(pkg.version.split("+")[0])
        if not v.matches_prefix(target.cuda):
            report.error("cuda", f"{platform}: {name} {pkg.version} is not CUDA {target.cuda}")
    if not found:
        report.error("cuda", f"{platform}: no {meta} package pins CUDA {target.cuda}")


def _check_hashes(report: Report, lock: Lockfile) -> None:
    for p in lock.package:
        where = f"{p.platform}: {p.name} {p.version}"
        if not p.url:
            report.error("hash", f"{where} has no URL")
        md5, sha = (p.hash.md5 or ""), (p.hash.sha256 or "")
        if p.manager == "conda" and not _MD5.match(md5):
            report.error("hash", f"{where}: md5 {md5!r} is missing or malformed")
        if not _SHA256.match(sha):
            report.error("hash", f"{where}: sha256 {sha!r} is missing or malformed")


def _check_packages(report: Report, lock: Lockfile) -> None:
    """Every package is of a platform of the lock, and a conda package's version and
    dependency specs are ones conda can read."""
    import rattler
    from rattler.exceptions import InvalidMatchSpecError, InvalidVersionError

    for p in lock.package:
        where = f"{p.platform}: {p.name} {p.version}"
        if p.platform not in lock.metadata.platforms:
            report.error(
                "platform",
                f"{where}: {p.platform} is not a platform of the lock "
                f"({', '.join(lock.metadata.platforms)})",
            )
        if p.manager != "conda":
            continue
        try:
            rattler.Version(p.version)
        except InvalidVersionError as exc:
            report.error("package", f"{where}: not a conda version ({exc})")
        for name, spec in p.dependencies.items():
            try:
                rattler.MatchSpec(f"{name} {spec}".strip())
            except InvalidMatchSpecError as exc:
                report.error("package", f"{where}: dependency {name} {spec!r} ({exc})")


def check_channel_hashes(lock: Lockfile, report: Report) -> None:
    """Compare each conda package's md5/sha256 with its channel's repodata (network or
    ``file://``)."""
    import rattler

    groups: dict[tuple[str, str], list] = defaultdict(list)
    for p in lock.package:
        if p.manager != "conda" or not p.url:
            continue
        base, subdir, _ = p.url.rsplit("/", 2)
        groups[(base, subdir)].append(p)

    async def fetch():
        gateway = rattler.Gateway()
        out = {}
        for (base, subdir), pkgs in groups.items():
            res = await gateway.query(
                [rattler.Channel(base)], [subdir], sorted({p.name for p in pkgs}), recursive=False
            )
            out[(base, subdir)] = {r.url: r for recs in res for r in recs}
        return out

    try:
        published = asyncio.run(fetch())
    except Exception as exc:
        report.error("hash", f"cannot read the channels' repodata to compare hashes: {exc}")
        return
    for key, pkgs in groups.items():
        index = published.get(key, {})
        for p in pkgs:
            rec = index.get(p.url)
            where = f"{p.platform}: {p.name} {p.version} ({p.url.rsplit('/', 1)[-1]})"
            if rec is None:
                report.error("hash", f"{where} is not in its channel's repodata")
                continue
            md5 = rec.md5.hex() if rec.md5 else None
            sha = rec.sha256.hex() if rec.sha256 else None
            if md5 and p.hash.md5 != md5 or sha and p.hash.sha256 != sha:
                report.error(
                    "hash",
                    f"{where}: hash differs from the channel's "
                    f"(lock md5 {p.hash.md5}, channel {md5})",
                )


def _check_content_hash(
    report: Report, lock: Lockfile, target: Target, envs_dir: Path, matrix: Matrix
) -> None:
    paths = target_paths(envs_dir, target.name)
    for problem in rendered_is_current(matrix, target, envs_dir):
        report.error("stale", f"{problem}; re-render and re-lock")
    if not paths.env.exists() or not paths.virtual_packages.exists():
        return
    try:
        spec = lf.lock_spec(paths.env, lf.recorded_channel_overrides(lock))
        now = lf.content_hashes(spec, paths.virtual_packages)
    except LockgenError as exc:
        report.error("stale", str(exc))
        return
    for platform in target.platforms:
        have = lock.metadata.content_hash.get(platform)
        if have is None:
            continue  # reported by the platform check
        if now.get(platform) != have:
            report.error(
                "stale",
                f"{platform}: content hash {have[:12]}… does not match "
                f"{paths.env.name} + {paths.virtual_packages.name} now "
                f"({now.get(platform, '?')[:12]}…): the inputs changed "
                f"since this lock was made; run `lockgen lock "
                f"{target.name}`",
            )


def verify_lock(
    lock: Lockfile,
    matrix: Matrix,
    envs_dir: Path | None = None,
    target: Target | None = None,
    lock_name: str = "",
    check_channels: bool = False,
) -> Report:
    envs_dir = Path(envs_dir) if envs_dir else default_envs_dir()
    meta = lf.custom(lock)
    name = meta.get(lf.META_TARGET) or (lock_name.removesuffix(".lock") if lock_name else None)
    report = Report(lock_name or "<lock>", name)
    if target is None:
        target = _resolve_target(matrix, name, report)
        if target is None:
            return report
        if lock_name:
            _check_file_name(report, Path(lock_name), ".lock", target)
    report.target = target.name
    if lf.META_CUDA in meta:
        want = target.cuda.raw if target.cuda else ""
        if meta[lf.META_CUDA] != want:
            report.error(
                "target",
                f"the lock was solved for __cuda={meta[lf.META_CUDA] or 'none'}"
                f", target {target.name} is {want or 'CPU'}",
            )
    else:
        report.warn(
            "target", "the lock does not record the __cuda it was solved for (not made by lockgen?)"
        )
    if meta.get(lf.META_CHANNEL_SUPPORT, "supplied") != "supplied":
        report.warn(
            "channel",
            f"rendered with --allow-unverified: the matrix does not "
            f"confirm that {target.conda_channel.name} supplies this build",
        )

    by_platform: dict[str, dict] = defaultdict(dict)
    for p in lock.package:
        if p.manager == "conda":
            by_platform[p.platform][p.name] = p
    for platform in target.platforms:
        if platform not in lock.metadata.platforms or not by_platform.get(platform):
            report.error(
                "platform",
                f"{platform} is missing from the lock (target "
                f"{target.name} needs {', '.join(target.platforms)})",
            )
            continue
        pkgs = by_platform[platform]
        _check_torch(report, target, platform, pkgs)
        _check_cuda_selector(report, target, platform, pkgs)
    _check_hashes(report, lock)
    _check_packages(report, lock)
    if check_channels:
        check_channel_hashes(lock, report)
    _check_content_hash(report, lock, target, envs_dir, matrix)
    report.checked = [
        "target",
        "platforms",
        "hashes",
        "torch build",
        "CUDA",
        "cuDNN",
        "content hash",
    ] + (["channel hashes"] if check_channels else [])
    return report


# -- pip hash-locks and uv locks: the checks they share ---------------------------------------


def _sha256s(hashes) -> list[str]:
    return [h.removeprefix("sha256:") for h in hashes]


def _check_index_hashes(report: Report, index: str, pins) -> None:
    """``pins``: (name, version, [sha256]) — every hash must be one the index publishes."""
    from lockgen.index import IndexHashes

    client = IndexHashes(index)
    for name, version, hashes in pins:
        try:
            published = client.release_hashes(name, version)
        except LockgenError as exc:
            report.error("hash", f"cannot compare hashes with {index}: {exc}")
            return
        if not published:
            report.error("hash", f"{name} {version}: {index} publishes no file of it")
            continue
        for h in hashes:
            if h not in published:
                report.error(
                    "hash",
                    f"{name} {version}: sha256 {h[:16]}... is not one {index} publishes for it",
                )


def _check_cuda_runtime(report: Report, target: Target, runtimes, pypi: bool) -> None:
    """``runtimes``: (name, version) of the locked ``nvidia-cuda-runtime*`` wheels."""
    from lockgen.render.uv import cuda_runtime_package

    if target.is_cpu:
        if runtimes:
            names = ", ".join(f"{n} {v}" for n, v in runtimes)
            report.error("torch", f"the CPU target locks a CUDA runtime ({names})")
        return
    assert target.cuda is not None
    if not runtimes:
        if pypi:
            report.error(
                "torch",
                f"no {cuda_runtime_package(target.cuda)} in the lock: PyPI's CUDA "
                f"{target.cuda} torch requires it, so this torch is a CPU build",
            )
        return
    for name, version in runtimes:
        if not Version.parse(version.split("+")[0]).matches_prefix(target.cuda):
            report.error(
                "cuda", f"{name} {version} is not the CUDA {target.cuda} runtime of the target"
            )


def _check_cudnn_wheels(report: Report, target: Target, cudnns) -> None:
    if target.cudnn is None:
        return
    for name, version in cudnns:
        if not Version.parse(version).matches_prefix(target.cudnn):
            report.error("cudnn", f"{name} {version}: the matrix says cuDNN {target.cudnn}")


def _check_torch_wheel(
    report: Report, target: Target, what: str, version: str, want: Version, pypi: bool
) -> None:
    v = Version.parse(version)
    if not v.matches_prefix(want):
        report.error("torch", f"{what} {version} is not {what} {want}")
    if pypi:
        if v.local is not None:
            report.error("torch", f"{what} {version}: PyPI builds carry no +{v.local}")
    elif v.local != target.tag:
        report.error(
            "torch",
            f"{what} {version} is the {v.local or 'untagged'} build, target {target.name} "
            f"is {target.tag}"
            + (" (a CPU build)" if v.local == "cpu" and not target.is_cpu else ""),
        )


# -- pip hash-locks ---------------------------------------------------------------------------


def check_requirements(report: Report, req, target: Target, check_index: bool) -> None:
    """Every check of a parsed pip hash-lock against its target (see the module docstring)."""
    from lockgen.index import canonical_name

    if not req.entries:
        report.error("hash", "no requirements in the file")
    seen: set[tuple[str, str]] = set()
    for e in req.entries:
        if not e.pinned:
            report.error("hash", f"{e.name}: not pinned with == ({e.raw})")
        if not e.hashes or not all(
            h.startswith("sha256:") and _SHA256.match(h.removeprefix("sha256:")) for h in e.hashes
        ):
            report.error("hash", f"{e.name}: missing or malformed --hash (sha256:<64 hex>)")
        key = (canonical_name(e.name), e.marker)
        if key in seen:
            report.error(
                "hash", f"{e.name}: listed twice" + (f" for {e.marker}" if e.marker else "")
            )
        seen.add(key)
    want_platforms = ",".join(target.platforms)
    want_pythons = ",".join(p.raw for p in sorted(target.pythons))
    have = (req.meta.get("platforms", "?"), req.meta.get("pythons", "?"))
    if have != (want_platforms, want_pythons):
        report.error(
            "platform",
            f"the lock covers platforms {have[0]} x Pythons {have[1]}; target "
            f"{target.name} needs {want_platforms} x {want_pythons} (re-lock)",
        )
    source = target.pip_source
    _check_pip_options(report, req)
    index = req.index_urls[0] if len(req.index_urls) == 1 else ""
    if index.rstrip("/") != source.url.rstrip("/"):
        report.error(
            "index",
            f"resolved from {index or '?'}, but target {target.name}'s build comes from "
            f"{source.url}",
        )
    by_name: dict[str, list] = defaultdict(list)
    for e in req.entries:
        by_name[canonical_name(e.name)].append(e)
    pypi = source.kind == "pypi"
    for what, want in (("torch", target.torch), ("torchvision", target.torchvision)):
        if not by_name.get(what):
            report.error("torch", f"no {what} in the lock")
        for e in by_name.get(what, []):
            _check_torch_wheel(report, target, what, e.version, want, pypi)
    runtimes = [
        (n, e.version)
        for n, es in by_name.items()
        if n.startswith("nvidia-cuda-runtime")
        for e in es
    ]
    _check_cuda_runtime(report, target, runtimes, pypi)
    cudnns = [
        (n, e.version) for n, es in by_name.items() if n.startswith("nvidia-cudnn") for e in es
    ]
    _check_cudnn_wheels(report, target, cudnns)
    if check_index and index:
        _check_index_hashes(
            report, index, [(e.name, e.version, _sha256s(e.hashes)) for e in req.entries]
        )


def _check_pip_options(report: Report, req) -> None:
    """pip obeys every option line: the file must name one index and nothing else."""
    for option, value in req.options:
        if option != "--index-url":
            report.error(
                "index",
                f"{option} {value}".strip() + ": lockgen's pip locks name one --index-url and "
                "no other option (pip would obey it: another index, file or requirement)",
            )
    if len(req.index_urls) != 1:
        report.error("index", f"the file must name one --index-url, it names {len(req.index_urls)}")
    elif not req.index_urls[0]:
        report.error("index", "--index-url names no URL")
    recorded = req.meta.get("index-url")
    if recorded and req.index_urls and recorded != req.index_urls[0]:
        report.error(
            "index",
            f"the file says it was resolved from {recorded}, but its --index-url line sends pip "
            f"to {req.index_urls[0]}",
        )


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise LockgenError(f"{path} is not a file")
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise LockgenError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise LockgenError(f"{path} is not a {what} (not UTF-8 text: {exc})") from None


def _check_file_name(report: Report, path: Path, suffix: str, target: Target) -> None:
    """A lock's file name is its target's (``lockgen`` writes ``envs/<target><suffix>``): a
    copy under another target's name must not pass as that target's lock."""
    stem = path.name.removesuffix(suffix)
    if stem != path.name and stem != target.name:
        report.error(
            "target",
            f"the file is named {path.name}, but the lock is for target {target.name} "
            f"(lockgen writes it as {target.name}{suffix})",
        )


def verify_requirements(
    path: Path, matrix: Matrix, target: Target | None = None, check_index: bool = False
) -> Report:
    from lockgen.render.pip import parse_requirements

    path = Path(path)
    req = parse_requirements(_read_text(path, "pip requirements file"))
    name = req.meta.get("target") or path.name.removesuffix(".requirements.txt")
    report = Report(str(path), name)
    if target is None:
        target = _resolve_target(matrix, name, report)
        if target is None:
            return report
        _check_file_name(report, path, ".requirements.txt", target)
    report.target = target.name
    check_requirements(report, req, target, check_index)
    report.checked = ["pins", "hashes", "platforms x pythons", "index", "torch build", "CUDA"]
    report.checked += ["index hashes"] if check_index else []
    return report


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
    from lockgen.render.uv import dependencies, requires_python, uv_rendered_is_current

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
    from lockgen.render.pip import PLATFORM_MARKERS

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
    from lockgen.render.uv import project_name

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
        target = _resolve_target(matrix, name, report)
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
            _check_torch_wheel(report, target, what, str(p.get("version")), want, pypi)
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
    _check_cuda_runtime(report, target, runtimes, pypi)
    cudnns = [
        (p["name"], str(p.get("version")))
        for p in packages
        if p["name"].startswith("nvidia-cudnn") and p["name"] in reach
    ]
    _check_cudnn_wheels(report, target, cudnns)
    pins = _check_uv_hashes(report, packages)
    if check_index:
        for registry in sorted({p[3] for p in pins}):
            _check_index_hashes(report, registry, [p[:3] for p in pins if p[3] == registry])
    report.checked = ["project", "platforms", "torch build", "CUDA", "hashes"]
    report.checked += ["index hashes"] if check_index else []
    return report


def verify_file(
    path: str | Path, matrix: Matrix, envs_dir: Path | None = None, check_channels: bool = False
) -> Report:
    """Verify a conda-lock lockfile, a pip hash-lock (``*.requirements.txt``) or a ``uv.lock``;
    ``check_channels`` also compares every hash with what its channel or index publishes."""
    path = Path(path)
    if not path.exists():
        raise LockgenError(f"{path} does not exist")
    if path.name == "uv.lock":
        return verify_uv_lock(path, matrix, envs_dir, check_index=check_channels)
    if path.name.endswith(".txt"):
        return verify_requirements(path, matrix, check_index=check_channels)
    lock = lf.read_lockfile(path)
    envs_dir = Path(envs_dir) if envs_dir else path.resolve().parent
    report = verify_lock(lock, matrix, envs_dir, lock_name=path.name, check_channels=check_channels)
    report.path = str(path)
    return report

"""Solve a target into a conda-lock lockfile: ``lockgen lock``.

``lock_target(matrix, target, envs_dir, solver=None, channels=())`` reads the rendered
``envs/<target>.yml`` + ``envs/<target>.virtual-packages.yml`` (refusing if they are not what
``render`` writes from the matrix now), solves every platform, builds the lockfile with
conda-lock's models and content hash, runs :func:`lockgen.formats.conda.verify_lock` on it and only
then writes ``envs/<target>.lock`` atomically. A failed solve or a failed verification
raises and leaves any previous lockfile untouched.

Engines (a *solver* is anything with ``name`` and ``solve(job) -> {platform: [package]}``):

* :class:`RattlerSolver` (default) — py-rattler, embedded: solves each platform with the
  target's virtual packages as ``GenericVirtualPackage`` records. No conda executable.
* :class:`CondaLockSolver` — runs the real ``conda-lock lock`` with the same files and a
  conda/mamba/micromamba executable, and takes its packages.

A solver error is re-raised as :class:`SolveError` with the platform, the assumed virtual
packages and the solver's own explanation (``pytorch … would require __cuda >=13, for which
no candidates were found``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lockgen.errors import LockgenError
from lockgen.formats import conda as lf
from lockgen.formats.conda import (
    check_supported,
    rendered_is_current,
    target_paths,
)
from lockgen.matrix import Matrix
from lockgen.targets import Target

if TYPE_CHECKING:  # pragma: no cover
    from conda_lock.lockfile.v2prelim.models import LockedDependency, Lockfile
    from conda_lock.models.lock_spec import LockSpecification


class SolveError(LockgenError):
    """No environment satisfies the target's specs under its virtual packages."""


DEFAULTS_CHANNELS = lf.DEFAULTS_CHANNELS


@dataclass(frozen=True)
class SolveJob:
    target: str
    spec: LockSpecification
    env_file: Path
    virtual_packages_file: Path
    virtual_packages: Mapping[str, Mapping[str, str]]
    channel_overrides: tuple[str, ...] = ()

    @property
    def platforms(self) -> list[str]:
        return list(self.spec.platforms)

    @property
    def channels(self) -> list[str]:
        """Channel URLs or names for rattler; conda's ``defaults`` is not a channel name that
        rattler knows (it would look for conda.anaconda.org/defaults), so it is expanded the
        way conda expands it on Linux."""
        out: list[str] = []
        for c in self.spec.channels:
            out += DEFAULTS_CHANNELS if c.url == "defaults" else [c.url]
        return out

    def match_specs(self, platform: str) -> list[str]:
        """conda match specs (conda-lock's parsed form) of the conda dependencies."""
        from conda_lock.models.lock_spec import VersionedDependency

        out = []
        for dep in self.spec.dependencies[platform]:
            if dep.manager != "conda":
                continue
            if not isinstance(dep, VersionedDependency):
                raise SolveError(f"{dep.name}: only versioned conda dependencies can be solved")
            version = dep.version or ("*" if dep.build else "")
            out.append(" ".join(p for p in (dep.name, version, dep.build or "") if p))
        return out


class Solver(Protocol):
    name: str

    def solve(self, job: SolveJob) -> dict[str, list[LockedDependency]]: ...


def _describe_vp(vp: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in vp.items()) or "none"


def _split_depends(depends: Sequence[str]) -> dict[str, str]:
    """``["python >=3.11,<3.12.0a0", "pytorch-mutex 1.0 cuda"]`` → ``{name: version spec}``,
    the shape conda-lock records (the version part only; several specs joined by ``,``)."""
    out: dict[str, str] = {}
    for dep in depends:
        parts = dep.split()
        if not parts:
            continue
        name, version = parts[0], parts[1] if len(parts) > 1 else ""
        if name in out and version:
            out[name] = f"{out[name]},{version}" if out[name] else version
        else:
            out.setdefault(name, version)
    return out


@dataclass
class RattlerSolver:
    """Solves with py-rattler; ``cache_dir`` for its repodata cache (default: rattler's)."""

    cache_dir: Path | None = None
    name: str = "rattler"

    def solve(self, job: SolveJob) -> dict[str, list[LockedDependency]]:
        try:
            import rattler  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise LockgenError(
                "the rattler engine needs py-rattler (pip install py-rattler==0.28.0)"
            ) from exc
        return {p: self._solve_platform(job, p) for p in job.platforms}

    def _solve_platform(self, job: SolveJob, platform: str) -> list[LockedDependency]:
        import rattler
        from conda_lock.lockfile.v1.models import HashModel
        from conda_lock.lockfile.v2prelim.models import LockedDependency
        from rattler import GenericVirtualPackage, MatchSpec, PackageName
        from rattler import Version as RVersion
        from rattler.exceptions import SolverError as RattlerSolverError
        from rattler.package import BuildString

        vp = job.virtual_packages.get(platform, {})
        virtual = []
        for name, text in vp.items():
            version, _, build = str(text).partition(" ")
            virtual.append(
                GenericVirtualPackage(
                    PackageName(name), RVersion(version), BuildString(build or "0")
                )
            )
        specs = [MatchSpec(s, strict=False) for s in job.match_specs(platform)]
        gateway = rattler.Gateway(cache_dir=self.cache_dir) if self.cache_dir else None

        async def run():
            return await rattler.solve(
                sources=job.channels,
                specs=specs,
                gateway=gateway,
                platforms=[platform, "noarch"],
                virtual_packages=virtual,
            )

        try:
            records = asyncio.run(run())
        except Exception as exc:
            if not isinstance(exc, RattlerSolverError):  # repodata unreadable, etc.
                raise SolveError(
                    f"{job.target}: could not read the channels "
                    f"{', '.join(job.channels)} for {platform}: "
                    f"{str(exc).strip()}"
                ) from exc
            raise SolveError(
                f"{job.target}: no solution for {platform} from {', '.join(job.channels)} "
                f"with virtual packages {_describe_vp(vp)}:\n{str(exc).strip()}"
            ) from exc
        out = []
        for r in records:
            if r.name.normalized.startswith("__"):
                continue
            out.append(
                LockedDependency(
                    name=r.name.normalized,
                    version=str(r.version),
                    manager="conda",
                    platform=platform,
                    dependencies=_split_depends(r.depends),
                    url=r.url,
                    hash=HashModel(
                        md5=r.md5.hex() if r.md5 else None,
                        sha256=r.sha256.hex() if r.sha256 else None,
                    ),
                    build=str(r.build),
                    categories={"main"},
                )
            )
        return out


Runner = Callable[[Sequence[str], Mapping[str, str]], subprocess.CompletedProcess]


def _run(argv: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), env=dict(env), capture_output=True, text=True)


def find_conda_executable() -> str | None:
    for exe in ("micromamba", "mamba", "conda"):
        found = shutil.which(exe)
        if found:
            return found
    return None


@dataclass
class CondaLockSolver:
    """Runs ``conda-lock lock`` (needs conda, mamba or micromamba); ``run`` is injectable."""

    conda: str | None = None
    run: Runner = _run
    conda_lock: Sequence[str] = field(default_factory=lambda: [sys.executable, "-m", "conda_lock"])
    name: str = "conda-lock"

    def solve(self, job: SolveJob) -> dict[str, list[LockedDependency]]:
        conda = self.conda or find_conda_executable()
        if not conda:
            raise LockgenError(
                "the conda-lock engine needs conda, mamba or micromamba on PATH "
                "(or --conda PATH); the default rattler engine needs none"
            )
        with tempfile.TemporaryDirectory(prefix="lockgen-conda-lock-") as tmp:
            out = Path(tmp) / "conda-lock.yml"
            argv = [
                *self.conda_lock,
                "lock",
                "--conda",
                conda,
                "-f",
                str(job.env_file),
                "--virtual-package-spec",
                str(job.virtual_packages_file),
                "--lockfile",
                str(out),
                "--kind",
                "lock",
            ]
            for c in job.channel_overrides:
                argv += ["--channel", c]
            res = self.run(argv, os.environ)
            if res.returncode != 0 or not out.exists():
                msg = (res.stderr or res.stdout or "").strip()[-4000:]
                raise SolveError(
                    f"{job.target}: conda-lock lock failed (exit {res.returncode}):\n{msg}"
                )
            lock = lf.read_lockfile(out)
        result: dict[str, list[LockedDependency]] = {p: [] for p in job.platforms}
        for pkg in lock.package:
            result.setdefault(pkg.platform, []).append(pkg)
        return result


def make_solver(engine: str, cache_dir: Path | None = None, conda: str | None = None) -> Solver:
    if engine == "rattler":
        return RattlerSolver(cache_dir=cache_dir)
    if engine == "conda-lock":
        return CondaLockSolver(conda=conda)
    raise LockgenError(f"unknown engine {engine!r} (rattler or conda-lock)")


@dataclass(frozen=True)
class LockResult:
    path: Path
    lock: Lockfile
    report: object  # lockgen.findings.Report


def prepare_job(
    matrix: Matrix, target: Target, envs_dir: Path, channels: Sequence[str] = ()
) -> SolveJob:
    paths = target_paths(envs_dir, target.name)
    stale = rendered_is_current(matrix, target, envs_dir)
    if stale:
        raise LockgenError(
            f"target {target.name}: " + "; ".join(stale) + f" (run `lockgen render {target.name}`)"
        )
    spec = lf.lock_spec(paths.env, channels)
    vp = lf.read_virtual_packages(paths.virtual_packages)
    missing = [p for p in spec.platforms if p not in vp]
    if missing:
        raise LockgenError(
            f"{paths.virtual_packages.name} has no virtual packages for {', '.join(missing)}"
        )
    return SolveJob(target.name, spec, paths.env, paths.virtual_packages, vp, tuple(channels))


def lock_target(
    matrix: Matrix,
    target: Target,
    envs_dir: Path,
    solver: Solver | None = None,
    channels: Sequence[str] = (),
    allow_unverified: bool = False,
) -> LockResult:
    """Solve, build, verify, then write ``envs/<target>.lock``; see the module docstring."""
    from lockgen.formats.conda import verify_lock

    support = check_supported(matrix, target, allow_unverified)
    solver = solver or RattlerSolver()
    job = prepare_job(matrix, target, envs_dir, channels)
    packages = solver.solve(job)
    hashes = lf.content_hashes(job.spec, job.virtual_packages_file)
    meta = {
        lf.META_TARGET: target.name,
        lf.META_CUDA: target.cuda.raw if target.cuda else "",
        lf.META_VIRTUAL_PACKAGES: json.dumps(job.virtual_packages, sort_keys=True),
        lf.META_ENGINE: solver.name,
        lf.META_CHANNEL_OVERRIDES: json.dumps(list(channels)),
        lf.META_CHANNEL_SUPPORT: support.status,
    }
    all_pkgs = [p for plat in job.platforms for p in packages.get(plat, [])]
    lock = lf.build_lockfile(all_pkgs, job.spec, hashes, [job.env_file.name], meta)
    path = target_paths(envs_dir, target.name).lock
    # Verify the lock as it will be read back (conda-lock's own round trip), before writing.
    with tempfile.TemporaryDirectory(prefix="lockgen-") as tmp:
        probe = Path(tmp) / path.name
        probe.write_text(lf.lockfile_text(lock, path.name))
        report = verify_lock(
            lf.read_lockfile(probe), matrix, envs_dir, target=target, lock_name=path.name
        )
    if not report.ok:
        raise SolveError(
            f"target {target.name}: the solve gave a lock that fails "
            f"verification, not written:\n{report.format()}"
        )
    lf.write_lockfile(lock, path)
    return LockResult(path, lock, report)

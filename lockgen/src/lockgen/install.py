"""``lockgen install <lockfile> --prefix DIR``: install a conda-lock lockfile without conda.

Uses py-rattler (``rattler.install``) to download and link exactly the locked packages of the
host platform into ``DIR``; nothing is re-solved. Before anything lands in ``DIR``:

* the lock passes ``lockgen verify`` (its target, build, hashes, freshness), else nothing is
  installed;
* every package archive is read and its sha256 *and* md5 compared with the lock's, whatever
  the transport (``file://`` included: rattler checks neither there, and never md5). Over
  HTTP this reads each archive once more than rattler does (rattler re-checks the sha256 of
  its own download);
* unlike ``conda-lock install``, the host's NVIDIA driver is checked against the CUDA the
  lock was solved for (``lockgen.cuda`` in the lock's custom metadata):

* the driver's own CUDA version (``nvidia-smi``'s ``CUDA Version``), else the newest
  toolkit whose bundled driver it meets, must be at least the lock's ``__cuda`` — OK;
* otherwise a driver at or above the CUDA major's minor-version-compatibility floor runs
  it with caveats — a warning;
* otherwise (or with no driver at all) installing is refused, unless ``check_driver=False``
  (building an image on a machine without a GPU).

The driver comes from :class:`lockgen.probe.Prober` (injectable).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lockgen.errors import LockgenError
from lockgen.formats import conda as lf
from lockgen.matrix import Matrix
from lockgen.versions import Version

if TYPE_CHECKING:  # pragma: no cover
    from conda_lock.lockfile.v2prelim.models import LockedDependency

    from lockgen.probe import Prober


class InstallRefused(LockgenError):
    """The host cannot run what the lock contains (driver too old / missing)."""


@dataclass
class DriverVerdict:
    ok: bool
    message: str
    warnings: list[str] = field(default_factory=list)


def check_driver(matrix: Matrix, lock_cuda: str, prober: Prober) -> DriverVerdict:
    if not lock_cuda:
        return DriverVerdict(True, "CPU lock: no NVIDIA driver needed")
    need = Version.parse(lock_cuda)
    driver, _gpus, _smi = prober.driver_and_gpus()
    floor = matrix.driver_floor(need)
    floor_txt = (
        f"driver >= {floor.full} (or >= {floor.minimum} with minor version compatibility)"
        if floor and floor.full
        else f"driver >= {floor.minimum}"
        if floor
        else "a newer driver"
    )
    if driver is None:
        return DriverVerdict(
            False,
            f"no NVIDIA driver found, but this lock was solved for "
            f"__cuda={need} and needs {floor_txt}",
        )
    supports = driver.cuda_umd or matrix.max_cuda_for_driver(driver.version)
    if supports is not None and supports >= need:
        return DriverVerdict(True, f"driver {driver.version} supports CUDA {supports} >= {need}")
    if floor is not None and driver.version >= floor.minimum:
        return DriverVerdict(
            True,
            f"driver {driver.version} runs CUDA {need} through minor version compatibility",
            [
                f"driver {driver.version} is older than CUDA {need}'s toolkit driver "
                f"{floor.full or '?'}: PTX JIT and some features need a newer driver"
            ],
        )
    return DriverVerdict(
        False,
        f"driver {driver.version} supports CUDA "
        f"{supports or '?'} only; this lock was solved for "
        f"__cuda={need} and needs {floor_txt}",
    )


_BUILD_NUMBER = re.compile(r"_(\d+)$")


def _open_archive(url: str):
    """A binary stream of the package file at ``url`` (``file://``, ``http://``, ``https://``)."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "file":
        return open(urllib.request.url2pathname(urllib.parse.urlsplit(url).path), "rb")
    if scheme in ("http", "https"):
        return urllib.request.urlopen(url, timeout=60)
    raise LockgenError(f"{url}: lockgen installs packages from file://, http:// or https:// only")


def check_archive(p: LockedDependency) -> None:
    """Read the package file of ``p`` and compare its sha256 and md5 with the lock's."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    try:
        with _open_archive(p.url) as f:
            while chunk := f.read(1 << 20):
                sha256.update(chunk)
                md5.update(chunk)
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        raise LockgenError(f"{p.name} {p.version}: cannot read {p.url}: {exc}") from None
    for what, want, got in (("sha256", p.hash.sha256, sha256), ("md5", p.hash.md5, md5)):
        if want and got.hexdigest() != want.lower():
            raise InstallRefused(
                f"{p.name} {p.version}: {p.url} has {what} {got.hexdigest()}, the lock records "
                f"{want}; nothing was installed"
            )


def to_repodata_records(packages: Sequence[LockedDependency]):
    """conda-lock packages → ``rattler.RepoDataRecord`` (the file's url, md5, sha256)."""
    try:
        return _records(packages)
    except Exception as exc:  # ValueError, TypeError, rattler's InvalidVersionError, ...
        raise LockgenError(f"a package of the lock cannot be installed: {exc}") from None


def _records(packages: Sequence[LockedDependency]):
    from rattler import PackageRecord, RepoDataRecord
    from rattler.package import BuildString

    out = []
    for p in packages:
        base, subdir, filename = p.url.rsplit("/", 2)
        build = p.build or ""
        m = _BUILD_NUMBER.search(build)
        depends = [f"{n} {v}".strip() for n, v in p.dependencies.items()]
        record = PackageRecord(
            name=p.name,
            version=p.version,
            build=BuildString(build),
            build_number=int(m.group(1)) if m else 0,
            subdir=subdir,
            depends=depends,
            md5=bytes.fromhex(p.hash.md5) if p.hash.md5 else None,
            sha256=bytes.fromhex(p.hash.sha256) if p.hash.sha256 else None,
        )
        out.append(RepoDataRecord(record, filename, p.url, base + "/"))
    return out


@dataclass
class InstallResult:
    prefix: Path
    platform: str
    packages: int
    driver: DriverVerdict
    warnings: list[str] = field(default_factory=list)


def host_platform() -> str:
    import platform as _platform
    import sys

    from lockgen.probe import conda_platform

    return conda_platform(sys.platform, _platform.machine())


def install_lockfile(
    lock_path: Path,
    prefix: Path,
    matrix: Matrix,
    *,
    platform: str | None = None,
    prober: Prober | None = None,
    driver_check: bool = True,
    cache_dir: Path | None = None,
) -> InstallResult:
    name = Path(lock_path).name
    if name.endswith(".requirements.txt") or name == "uv.lock":
        how = (
            f"pip install --require-hashes -r {lock_path}"
            if name.endswith(".txt")
            else f"uv sync --locked --project {Path(lock_path).parent}"
        )
        raise LockgenError(
            f"{lock_path}: lockgen install installs conda-lock lockfiles; install this lock "
            f"with `{how}`"
        )
    from lockgen.verify import verify_file

    report = verify_file(lock_path, matrix)
    if not report.ok:
        raise InstallRefused(
            f"{lock_path} fails verification; nothing was installed:\n{report.format()}"
        )
    lock = lf.read_lockfile(Path(lock_path))
    platform = platform or host_platform()
    if platform not in lock.metadata.platforms:
        raise LockgenError(
            f"{lock_path} has no packages for this platform ({platform}); it "
            f"covers {', '.join(lock.metadata.platforms)}"
        )
    meta = lf.custom(lock)
    warnings: list[str] = []
    if driver_check:
        from lockgen.probe import Prober

        verdict = check_driver(matrix, meta.get(lf.META_CUDA, ""), prober or Prober())
        if not verdict.ok:
            raise InstallRefused(
                f"{verdict.message}. Install a newer driver, pick a lock "
                f"for an older CUDA, or pass --no-driver-check to install "
                f"anyway (e.g. when building an image)."
            )
        warnings += verdict.warnings
    else:
        verdict = DriverVerdict(True, "driver check skipped (--no-driver-check)")
    if lf.META_CUDA not in meta:
        warnings.append(
            "the lock does not record the CUDA it was solved for (not made "
            "by lockgen?): the driver was not checked against it"
        )
    conda_pkgs = [p for p in lock.package if p.platform == platform and p.manager == "conda"]
    pip_pkgs = [p for p in lock.package if p.platform == platform and p.manager == "pip"]
    if pip_pkgs:
        raise LockgenError(
            f"{lock_path} has pip packages ({', '.join(p.name for p in pip_pkgs)}"
            "); the embedded installer handles conda packages only: use "
            "`conda-lock install`"
        )
    missing = [p.name for p in conda_pkgs if not (p.hash.md5 and p.hash.sha256)]
    if missing:
        raise LockgenError(
            f"{lock_path}: no md5+sha256 for {', '.join(missing)}; refusing "
            "to install unverifiable packages"
        )
    import rattler

    records = to_repodata_records(conda_pkgs)
    for p in conda_pkgs:
        check_archive(p)
    prefix = Path(prefix).resolve()

    async def run():
        await rattler.install(
            records,
            target_prefix=prefix,
            cache_dir=cache_dir,
            show_progress=False,
            execute_link_scripts=False,
        )

    try:
        asyncio.run(run())
    except Exception as exc:
        raise LockgenError(f"installing {lock_path} into {prefix} failed: {exc}") from exc
    return InstallResult(prefix, platform, len(records), verdict, warnings)

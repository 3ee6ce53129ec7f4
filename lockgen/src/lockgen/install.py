"""``lockgen install <lockfile> --prefix DIR``: install a conda-lock lockfile without conda.

Uses py-rattler (``rattler.install``) to link exactly the locked packages of the host platform
into ``DIR``; nothing is re-solved. What lands in ``DIR`` is what was checked:

* the lock is read once and passes ``lockgen verify`` (its target, channels and URLs, build,
  hashes, freshness), else nothing is installed;
* every package archive is copied into a private staging folder while its sha256 *and* md5
  are compared with the lock's, whatever the transport (``file://`` included: rattler checks
  neither there, and never md5); rattler is handed those checked copies and a fresh package
  cache, so neither a changed source file nor a tampered shared cache can reach the prefix.
  ``--cache-dir`` keeps verified archives between installs (hashed again on every use);
* ``DIR`` must not exist or be empty; ``force=True`` (``--force``) replaces an environment
  there: the old one is moved aside and restored if the install does not complete;
* the prefix is built where it will live (conda packages record their prefix in their files)
  by a child process; a failure, a full disk, SIGINT or SIGTERM stops it and removes what it
  wrote (restoring the old prefix), and the error says so in one line;
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
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
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


class InstallInterrupted(LockgenError):
    """SIGINT or SIGTERM stopped the install; ``exit_code`` is the shell's 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        import signal

        super().__init__(message)
        self.exit_code = 128 + signum
        self.signame = signal.Signals(signum).name


def _open_archive(url: str):
    """A binary stream of the package file at ``url`` (``file://``, ``http://``, ``https://``)."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "file":
        return open(urllib.request.url2pathname(urllib.parse.urlsplit(url).path), "rb")
    if scheme in ("http", "https"):
        return urllib.request.urlopen(url, timeout=60)
    raise LockgenError(f"{url}: lockgen installs packages from file://, http:// or https:// only")


def _copy_hashed(src, dst: Path) -> tuple[str, str]:
    """Copy the stream ``src`` to ``dst``; the (sha256, md5) of the bytes written."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(dst, "wb") as out:
        while chunk := src.read(1 << 20):
            sha256.update(chunk)
            md5.update(chunk)
            out.write(chunk)
    return sha256.hexdigest(), md5.hexdigest()


def _hash_problem(p: LockedDependency, where: str, sha256: str, md5: str) -> str | None:
    for what, want, got in (("sha256", p.hash.sha256, sha256), ("md5", p.hash.md5, md5)):
        if want and got != want.lower():
            return f"{p.name} {p.version}: {where} has {what} {got}, the lock records {want}"
    return None


def fetch_checked(p: LockedDependency, dst: Path, cache_dir: Path | None = None) -> None:
    """Put the package file of ``p`` at ``dst``, its sha256 and md5 being the lock's: from
    ``cache_dir`` if a copy there still has them, else from its URL (then kept in the cache)."""
    cached = Path(cache_dir) / dst.name if cache_dir else None
    if cached is not None and cached.is_file():
        with open(cached, "rb") as f:
            if _hash_problem(p, str(cached), *_copy_hashed(f, dst)) is None:
                return
    try:
        with _open_archive(p.url) as f:
            problem = _hash_problem(p, p.url, *_copy_hashed(f, dst))
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        raise LockgenError(f"{p.name} {p.version}: cannot read {p.url}: {exc}") from None
    if problem:
        raise InstallRefused(f"{problem}; nothing was installed")
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            shutil.copyfile(dst, tmp)
            os.replace(tmp, cached)
        except OSError:
            pass  # a cache that cannot be written only costs a download next time


def check_archive(p: LockedDependency) -> None:
    """Read the package file of ``p`` and compare its sha256 and md5 with the lock's."""
    with tempfile.TemporaryDirectory(prefix="lockgen-check-") as tmp:
        fetch_checked(p, Path(tmp) / "archive")


def record_fields(p: LockedDependency, url: str) -> dict:
    """What :func:`to_repodata_records` needs of a package, installed from ``url``."""
    return {
        "name": p.name,
        "version": p.version,
        "build": p.build or "",
        "depends": [f"{n} {v}".strip() for n, v in p.dependencies.items()],
        "md5": p.hash.md5,
        "sha256": p.hash.sha256,
        "subdir": p.url.rsplit("/", 2)[1],
        "url": url,
    }


def to_repodata_records(packages: Sequence[dict]):
    """:func:`record_fields` dicts → ``rattler.RepoDataRecord``."""
    try:
        return _records(packages)
    except InstallInterrupted:
        raise
    except Exception as exc:  # ValueError, TypeError, rattler's InvalidVersionError, ...
        raise LockgenError(f"a package of the lock cannot be installed: {exc}") from None


def _records(packages: Sequence[dict]):
    from rattler import PackageRecord, RepoDataRecord
    from rattler.package import BuildString

    out = []
    for p in packages:
        base, _, filename = p["url"].rsplit("/", 2)
        m = _BUILD_NUMBER.search(p["build"])
        record = PackageRecord(
            name=p["name"],
            version=p["version"],
            build=BuildString(p["build"]),
            build_number=int(m.group(1)) if m else 0,
            subdir=p["subdir"],
            depends=p["depends"],
            md5=bytes.fromhex(p["md5"]) if p["md5"] else None,
            sha256=bytes.fromhex(p["sha256"]) if p["sha256"] else None,
        )
        out.append(RepoDataRecord(record, filename, p["url"], base + "/"))
    return out


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return "; ".join(lines)[:600] or "no reason given"


def _child() -> None:
    """The child process that links the staged packages: JSON on stdin, one line on stderr
    if it fails. SIGINT is the parent's to handle (it stops this process and rolls back)."""
    import json
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    job = json.load(sys.stdin)
    try:
        import rattler

        records = to_repodata_records(job["records"])
        asyncio.run(
            rattler.install(
                records,
                target_prefix=Path(job["prefix"]),
                cache_dir=Path(job["cache"]),
                show_progress=False,
                execute_link_scripts=False,
            )
        )
        _restore_urls(Path(job["prefix"]), job["urls"])
    except BaseException as exc:  # noqa: BLE001 - reported to the parent in one line
        sys.stderr.write(_one_line(str(exc) or type(exc).__name__) + "\n")
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.flush()
    os._exit(0)


def _restore_urls(prefix: Path, urls: dict) -> None:
    """conda-meta records name the staged copy a package was linked from; put back the URL
    and channel of the lock."""
    import json

    for record in (prefix / "conda-meta").glob("*.json"):
        data = json.loads(record.read_text())
        url = urls.get(data.get("fn", ""))
        if url and "url" in data:
            data["url"] = url
            data["channel"] = url.rsplit("/", 2)[0]
            tmp = record.with_name(record.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, record)


def _check_prefix(prefix: Path, force: bool) -> bool:
    """Whether ``prefix`` holds something (it may then be replaced only with ``force``)."""
    if prefix.is_symlink() or (prefix.exists() and not prefix.is_dir()):
        raise LockgenError(f"{prefix} exists and is not a folder; nothing was installed")
    if not prefix.exists():
        return False
    entries = sorted(e.name for e in prefix.iterdir())
    if entries and not force:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise InstallRefused(
            f"{prefix} exists and is not empty ({shown}): lockgen install builds a fresh "
            "environment; pass --force to replace it (the old one is kept until the new one "
            "is complete); nothing was installed"
        )
    return bool(entries)


@contextlib.contextmanager
def _signals_raise():
    """SIGINT and SIGTERM raise :class:`InstallInterrupted` in the main thread while the
    install runs (elsewhere, e.g. in a test's worker thread, they are left alone). A signal
    this process was told to ignore (``nohup``, a background job of a script) stays ignored."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise InstallInterrupted(signal.Signals(signum).name, signum)

    caught = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN]
    old = {s: signal.signal(s, handler) for s in caught}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _link(records: list[dict], urls: dict, prefix: Path, cache: Path) -> None:
    """Run :func:`_child` to link ``records`` into ``prefix``; kill it on any exception."""
    import json
    import subprocess
    import sys

    import lockgen

    env = dict(os.environ)
    src = str(Path(lockgen.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    child = subprocess.Popen(
        [sys.executable, "-c", "from lockgen.install import _child; _child()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    job = {"records": records, "urls": urls, "prefix": str(prefix), "cache": str(cache)}
    try:
        _, err = child.communicate(json.dumps(job))
    except BaseException:
        child.kill()
        child.wait()
        raise
    if child.returncode != 0:
        raise LockgenError(_one_line(err or f"the installer exited with {child.returncode}"))


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
    force: bool = False,
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
    lock_path = Path(lock_path)
    lock = lf.read_lockfile(lock_path)  # read once: what is verified is what is installed
    report = lf.verify_lock(lock, matrix, lock_path.resolve().parent, lock_name=lock_path.name)
    report.path = str(lock_path)
    if not report.ok:
        raise InstallRefused(
            f"{lock_path} fails verification; nothing was installed:\n{report.format()}"
        )
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
    prefix = Path(prefix).absolute()
    replace = _check_prefix(prefix, force)
    try:
        with _signals_raise(), _staging_folder(prefix) as staging:
            records, urls = _stage(conda_pkgs, staging, cache_dir)
            _build(
                prefix, replace, staging, lambda: _link(records, urls, prefix, staging / "cache")
            )
    except InstallInterrupted as exc:
        if str(exc) != exc.signame:  # said already what became of the prefix
            raise
        raise InstallInterrupted(  # between the steps: the prefix was not touched
            f"installation interrupted ({exc.signame}): {prefix} was not changed",
            exc.exit_code - 128,
        ) from None
    return InstallResult(prefix, platform, len(records), verdict, warnings)


@contextlib.contextmanager
def _staging_folder(prefix: Path):
    """A private folder beside ``prefix`` (same file system: the old prefix moves into it),
    removed afterwards."""
    with _signals_held() as held:  # a signal between creating it and owning it would leak it
        try:
            prefix.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{prefix.name}.lockgen-", dir=prefix.parent))
        except OSError as exc:
            raise LockgenError(
                f"cannot create {prefix}: {exc.strerror or exc}; nothing was installed"
            ) from None
    try:
        if held:
            raise InstallInterrupted(held[0].name, held[0].value)
        yield staging
    finally:
        with _signals_ignored():  # the clean-up itself is not cut short
            shutil.rmtree(staging, ignore_errors=True)


def _stage(packages, staging: Path, cache_dir: Path | None) -> tuple[list[dict], dict]:
    """Checked copies of every package in ``staging``; their records and ``{file: lock URL}``."""
    try:
        to_repodata_records([record_fields(p, p.url) for p in packages])  # readable at all
        records, urls = [], {}
        for p in packages:
            filename = p.url.rsplit("/", 1)[1]
            subdir = p.url.rsplit("/", 2)[1]
            dst = staging / "archives" / subdir / filename
            dst.parent.mkdir(parents=True, exist_ok=True)
            fetch_checked(p, dst, cache_dir)
            records.append(record_fields(p, dst.as_uri()))
            urls[filename] = p.url
    except InstallInterrupted as exc:
        raise InstallInterrupted(
            f"installation interrupted ({exc.signame}) before anything was installed",
            exc.exit_code - 128,
        ) from None
    except OSError as exc:
        raise LockgenError(
            f"cannot stage the packages: {exc.strerror or exc}; nothing was installed"
        ) from None
    return records, urls


def _build(prefix: Path, replace: bool, staging: Path, link) -> None:
    """Run ``link`` (which builds ``prefix``); on any failure remove what it wrote and put
    back the prefix that was there (moved into ``staging`` meanwhile). Signals are ignored
    while that is undone."""
    old = staging / "old"
    moved = False
    try:
        if replace:
            os.rename(prefix, old)
            moved = True
        elif prefix.exists():
            prefix.rmdir()  # empty: the install creates it
        link()
    except BaseException as exc:
        with _signals_ignored():
            if (moved or not replace) and prefix.exists():
                shutil.rmtree(prefix, ignore_errors=True)
            if moved:
                os.rename(old, prefix)
        state = f"{prefix} was restored" if replace else f"nothing was left in {prefix}"
        if isinstance(exc, InstallInterrupted):
            raise InstallInterrupted(
                f"installation interrupted ({exc.signame}): {state}", exc.exit_code - 128
            ) from None
        if isinstance(exc, LockgenError):
            raise LockgenError(f"installing into {prefix} failed: {exc}; {state}") from None
        if isinstance(exc, OSError):
            raise LockgenError(
                f"installing into {prefix} failed: {exc.strerror or exc}; {state}"
            ) from None
        raise


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM that arrive inside the block are kept (in the list it yields), to be
    acted on once the block is done, instead of interrupting it."""
    import signal
    import threading

    held: list[signal.Signals] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    keep = {s: signal.signal(s, lambda n, _f: held.append(signal.Signals(n))) for s in
            (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
    try:
        yield held
    finally:
        for s, h in keep.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_ignored():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)

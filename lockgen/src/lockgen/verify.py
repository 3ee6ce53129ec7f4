"""``lockgen verify``: check a lockfile against its target.

What each format's verification guarantees is written, one paragraph per format, in the
README's "What verify guarantees"; the code is in :mod:`lockgen.formats` (``conda``, ``pip``,
``uv``), and what they share (reading a lock as a regular file of sane size, the machines a
target promises and the markers evaluated on each, exact releases) in
:mod:`lockgen.formats.locks`. Every finding names its check: ``target``, ``platform``,
``channel``, ``source`` (URLs and indexes), ``pin``, ``marker``, ``hash``, ``torch``, ``cuda``,
``cudnn``, ``stale``.

``check_channels`` (``--check-channels``) compares every hash with what the conda channel's
repodata (name, version and build too) or the package index publishes (network; for an index
only metadata is read).

``verify_file(path, matrix)`` → :class:`Report` (``ok``, ``findings``, ``format()``).
"""

from __future__ import annotations

from pathlib import Path

from lockgen.errors import LockgenError
from lockgen.findings import Report
from lockgen.formats.conda import read_lockfile, verify_lock
from lockgen.formats.pip import verify_requirements
from lockgen.formats.uv import verify_uv_lock
from lockgen.matrix import Matrix


def verify_file(
    path: str | Path, matrix: Matrix, envs_dir: Path | None = None, check_channels: bool = False
) -> Report:
    """Verify a conda-lock lockfile, a pip hash-lock (``*.requirements.txt``) or a ``uv.lock``;
    ``check_channels`` also compares every hash with what its channel or index publishes."""
    path = Path(path)
    try:
        path.stat()
    except OSError as exc:  # missing, a symlink loop, a folder that cannot be searched
        raise LockgenError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.name == "uv.lock":
        return verify_uv_lock(path, matrix, envs_dir, check_index=check_channels)
    if path.name.endswith(".txt"):
        return verify_requirements(path, matrix, check_index=check_channels)
    lock = read_lockfile(path)
    envs_dir = Path(envs_dir) if envs_dir else path.resolve().parent
    report = verify_lock(lock, matrix, envs_dir, lock_name=path.name, check_channels=check_channels)
    report.path = str(path)
    return report


def verify_or_report(
    path: str | Path, matrix: Matrix, envs_dir: Path | None = None, check_channels: bool = False
) -> Report:
    """:func:`verify_file`, with a file it cannot read (missing, not a lock) as a failed
    report instead of an error, so that the other files of one run are still reported."""
    try:
        return verify_file(path, matrix, envs_dir, check_channels)
    except LockgenError as exc:
        report = Report(str(path), None)
        report.error("file", str(exc))
        return report

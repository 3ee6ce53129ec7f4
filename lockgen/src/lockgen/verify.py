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
    if not path.exists() and not path.is_symlink():
        raise LockgenError(f"{path} does not exist")
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

"""What every lock format's verification shares: the target a lock is for, reading it, and its
file name."""

from __future__ import annotations

from pathlib import Path

from lockgen.errors import LockgenError
from lockgen.findings import Report
from lockgen.matrix import Matrix
from lockgen.targets import Target

# conda-lock lockfiles record their target here (metadata.custom_metadata)
META_TARGET = "lockgen.target"


def resolve_target(matrix: Matrix, name: str | None, report: Report) -> Target | None:
    if not name:
        report.error(
            "target",
            "the lockfile names no target (metadata.custom_metadata "
            f"'{META_TARGET}') and its file name is not one",
        )
        return None
    if name not in matrix.targets:
        report.error("target", f"unknown target {name!r} (known: {', '.join(matrix.targets)})")
        return None
    return matrix.targets[name]


def read_lock_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise LockgenError(f"{path} is not a file")
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise LockgenError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise LockgenError(f"{path} is not a {what} (not UTF-8 text: {exc})") from None


def check_file_name(report: Report, path: Path, suffix: str, target: Target) -> None:
    """A lock's file name is its target's (``lockgen`` writes ``envs/<target><suffix>``): a
    copy under another target's name must not pass as that target's lock."""
    stem = path.name.removesuffix(suffix)
    if stem != path.name and stem != target.name:
        report.error(
            "target",
            f"the file is named {path.name}, but the lock is for target {target.name} "
            f"(lockgen writes it as {target.name}{suffix})",
        )

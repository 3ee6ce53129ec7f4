"""Write a file so that no reader ever sees half of it: a temporary file beside the target,
renamed over it once complete.

  * A crash or kill before the rename leaves the target as it was.
  * Temporary names carry the host and process id (``.<name>.<host>.<pid>.<random>.tmp``), so
    several processes can write the same target at once: each renames its own complete file,
    and the last rename wins.
  * Cleanup touches only this process's own temporary file, and leftovers of writers on this
    host that are no longer running (killed mid-write); never a live writer's file.
  * The file gets the permissions of any new file (0666 minus the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_HOST = socket.gethostname().replace(os.sep, "_") or "localhost"


def temp_name(path: Path) -> Path:
    """A temporary name beside ``path`` that no other process or thread will pick."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _writer_of(leftover: Path, target: Path) -> tuple[str, int] | None:
    """(host, pid) of the process that made a temporary file of ``target``, if it is one."""
    middle = leftover.name.removeprefix(f".{target.name}.").removesuffix(".tmp")
    if middle == leftover.name or leftover.name == f".{target.name}.tmp":
        return None
    host, _, rest = middle.rpartition(".")  # rest: the random part
    host, _, pid = host.rpartition(".")
    if not host or not pid.isdigit():
        return None
    return host, int(pid)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_leftovers(path: Path) -> list[Path]:
    """Remove temporary files of ``path`` left by writers on this host that have exited."""
    removed = []
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        writer = _writer_of(leftover, path)
        if writer is None or writer[0] != _HOST or writer[1] == os.getpid():
            continue
        if not _running(writer[1]):
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a new temporary file beside ``path``, flush it to disk and
    rename it over ``path``. On any error the temporary file is removed and ``path`` is left
    as it was; the error propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    sweep_leftovers(path)
    return path


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (where the filesystem allows syncing a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

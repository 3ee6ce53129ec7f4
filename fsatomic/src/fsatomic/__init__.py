"""Write files so that no reader ever sees half of one: a temporary file beside each target,
renamed over it once complete. The one atomic writer of this repository: gpufit and lockgen
both depend on this small distribution, which needs nothing but the standard library (so
lockgen installs without torch and neither package imports the other).

  * A crash or kill before the rename leaves the target as it was.
  * Temporary names carry the host and process id (``.<name>.<host>.<pid>.<random>.tmp``), so
    several processes can write the same target at once: each renames its own complete file,
    and the last rename wins.
  * Cleanup touches only this process's own temporary files, and leftovers of writers on this
    host that are no longer running (killed mid-write); never a live writer's file.
  * The file gets the permissions of any new file (0666 minus the umask), not mkstemp's 0600.
  * Each file is flushed and fsync-ed before its rename, and the folder after it.
  * ``write_all_atomic`` writes several files all-or-nothing: every temporary file is complete
    before the first rename, and a failed rename puts back what the earlier ones replaced.
  * Only a regular file (or nothing) is ever replaced: a folder, device or pipe at the target
    is refused (``/dev/full`` as an output is an error, not a device swapped for a file).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

_HOST = socket.gethostname().replace(os.sep, "_") or "localhost"

Writer = Callable[[BinaryIO], object]


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


def _check_replaceable(path: Path) -> None:
    """Refuse a target that is not a regular file (a folder, a device, a pipe)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "is not a regular file", str(path))


def _write_temp(path: Path, write: Writer) -> Path:
    """``write(file)`` into a new temporary file beside ``path``, flushed to disk; on error
    the temporary file is removed and the error propagates."""
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: str | Path, write: Writer) -> Path:
    """Call ``write(file)`` on a new temporary file beside ``path``, flush it to disk and
    rename it over ``path``. On any error the temporary file is removed and ``path`` is left
    as it was; the error propagates."""
    path = Path(path)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    sweep_leftovers(path)
    return path


def text_writer(text: str | Callable[[], str]) -> Writer:
    """A ``write`` for :func:`write_atomic` of UTF-8 text (or of what calling ``text`` gives,
    computed only once the temporary file is open)."""
    return lambda f: f.write((text() if callable(text) else text).encode("utf-8"))


def write_text_atomic(path: str | Path, text: str | Callable[[], str]) -> Path:
    """:func:`write_atomic` of UTF-8 text."""
    return write_atomic(path, text_writer(text))


def write_all_atomic(files: Mapping[str | Path, Writer]) -> list[Path]:
    """Write every file of ``{path: write}`` or none of them.

    All temporary files are written and synced first; only then are they renamed, one by
    one. If a rename fails, the targets already renamed get their previous content back (a
    hard link kept beside each until the end) or are removed when they did not exist."""
    targets = [Path(p) for p in files]
    temps: list[Path] = []
    try:
        for path, write in zip(targets, files.values(), strict=True):
            temps.append(_write_temp(path, write))
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    done: list[tuple[Path, Path | None]] = []  # (target, a link to its previous file)
    try:
        for path, tmp in zip(targets, temps, strict=True):
            backup = _keep_previous(path)
            try:
                os.replace(tmp, path)
            except BaseException:
                if backup is not None:
                    backup.unlink(missing_ok=True)
                raise
            done.append((path, backup))
    except BaseException:
        _put_back(done)
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    for _, backup in done:
        if backup is not None:
            backup.unlink(missing_ok=True)
    for folder in dict.fromkeys(p.parent for p in targets):
        _sync_folder(folder)
    for path in targets:
        sweep_leftovers(path)
    return targets


def _keep_previous(path: Path) -> Path | None:
    """A hard link to (else a copy of) the file at ``path``, to undo its rename; None when
    there is no file."""
    if not path.exists():
        return None
    backup = temp_name(path)
    try:
        os.link(path, backup)
    except OSError:  # a filesystem without hard links
        shutil.copy2(path, backup)
    return backup


def _put_back(done: list[tuple[Path, Path | None]]) -> None:
    """Undo the renames of ``done``: the previous file back, or none where there was none."""
    for path, backup in reversed(done):
        if backup is not None:
            os.replace(backup, path)
        else:
            path.unlink(missing_ok=True)


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

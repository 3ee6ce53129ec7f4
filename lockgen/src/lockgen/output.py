"""Every file lockgen writes: atomically, through the project's one writer
(:mod:`fsatomic`, standard library only), with a failure told as a
:class:`CannotWrite` that names the file and the reason (read-only or full filesystem, a
folder or device in the way) instead of a traceback.

``write_text(path, text)`` writes one file; ``write_texts({path: text})`` several, all or
nothing (a spec and its virtual packages). ``text`` may be a callable, computed once the
temporary file is open. Nothing here reads a destination.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from fsatomic import text_writer, write_all_atomic
from lockgen.errors import LockgenError

Text = str | Callable[[], str]


class CannotWrite(LockgenError):
    """An output file could not be written; what was there before is left as it was."""


def write_texts(files: Mapping[Path, Text]) -> list[Path]:
    paths = [Path(p) for p in files]
    try:
        return write_all_atomic(
            {p: text_writer(t) for p, t in zip(paths, files.values(), strict=True)}
        )
    except OSError as exc:
        raise CannotWrite(
            f"cannot write {_failed(paths, exc)}: {exc.strerror or exc}"
            + (" (nothing was written)" if len(paths) > 1 else "")
        ) from None


def _failed(paths: list[Path], exc: OSError) -> str:
    """The output the error is about (the OS names the temporary file beside it, if any)."""
    name = Path(str(exc.filename)) if exc.filename else None
    for p in paths:
        if name is not None and (name == p or name.name.startswith(f".{p.name}.")):
            return str(p)
    return ", ".join(str(p) for p in paths)


def write_text(path: Path, text: Text) -> Path:
    return write_texts({Path(path): text})[0]

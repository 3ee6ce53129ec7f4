"""What every lock format's verification shares: the target a lock is for, reading it (a
regular file of sane size), its file name, the machines the target promises (a platform and a
Python, on which environment markers are evaluated) and the exact release a pin must name."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from lockgen.errors import LockgenError
from lockgen.findings import Report
from lockgen.matrix import Matrix
from lockgen.targets import Target
from lockgen.versions import Version

# A real CUDA lock is well under 1 MiB and a few hundred packages: far above both is not a lock.
MAX_LOCK_BYTES = 16 * 2**20
MAX_LOCK_PACKAGES = 20_000

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


def read_lock_bytes(path: Path) -> bytes:
    """The bytes of a lock that is a regular file of at most :data:`MAX_LOCK_BYTES`. Opened
    without blocking and checked on the open file, so that a FIFO or a device (``/dev/zero``)
    is refused, never read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise LockgenError(f"{path} does not exist") from None
    except OSError as exc:
        raise LockgenError(f"cannot read {path}: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_LOCK_BYTES:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LockgenError(f"{path} is not a file: a lock is a regular file")
        raise LockgenError(f"{path} is over {MAX_LOCK_BYTES >> 20} MiB: not a lockfile")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_LOCK_BYTES + 1)
        except OSError as exc:
            raise LockgenError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_LOCK_BYTES:
        raise LockgenError(f"{path} is over {MAX_LOCK_BYTES >> 20} MiB: not a lockfile")
    return data


def read_lock_text(path: Path, what: str, bom: bool = False) -> str:
    """The UTF-8 text of a lock (:func:`read_lock_bytes`); ``bom``: a leading UTF-8 byte-order
    mark is dropped, as the format's installer drops it (pip does)."""
    data = read_lock_bytes(path)
    try:
        return data.decode("utf-8-sig" if bom else "utf-8")
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


# -- the machines a target promises: environment markers evaluated on each --------------------

# (sys_platform, platform_machine, platform_system) of a conda platform
_PLATFORM_MARKERS = {
    "linux-64": ("linux", "x86_64", "Linux"),
    "linux-aarch64": ("linux", "aarch64", "Linux"),
    "osx-64": ("darwin", "x86_64", "Darwin"),
    "osx-arm64": ("darwin", "arm64", "Darwin"),
    "win-64": ("win32", "AMD64", "Windows"),
}
# the marker variables a platform and a Python decide; any other (platform_release, ...)
# depends on the machine beyond what a target promises
MARKER_VARIABLES = frozenset(
    {
        "python_version",
        "python_full_version",
        "sys_platform",
        "platform_machine",
        "platform_system",
        "os_name",
        "implementation_name",
        "platform_python_implementation",
        "extra",
    }
)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
# patch releases a marker is evaluated at: it must say the same for the first and a late one
_PATCHES = (0, 99)


@dataclass(frozen=True)
class Machine:
    """One (platform, Python) pair a target promises to install on."""

    platform: str
    python: Version

    def __str__(self) -> str:
        return f"{self.platform} + Python {self.python}"

    def environment(self, patch: int) -> dict[str, str]:
        sys_platform, machine, system = _PLATFORM_MARKERS[self.platform]
        minor = "{}.{}".format(*self.python.padded(2))
        full = f"{minor}.{patch}"
        return {
            "python_version": minor,
            "python_full_version": full,
            "implementation_version": full,
            "sys_platform": sys_platform,
            "platform_machine": machine,
            "platform_system": system,
            "os_name": "nt" if sys_platform == "win32" else "posix",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "platform_release": "",
            "platform_version": "",
            "extra": "",
        }


def target_machines(target: Target) -> list[Machine]:
    """Every (platform, Python) of the target that lockgen knows the markers of."""
    return [
        Machine(platform, python)
        for platform in target.platforms
        if platform in _PLATFORM_MARKERS
        for python in sorted(target.pythons)
    ]


def marker_problem(text: str) -> str | None:
    """Why an environment marker cannot be evaluated for a target's machines (None: it can)."""
    from lockgen.formats.pep508 import markers

    InvalidMarker, Marker = markers.InvalidMarker, markers.Marker

    try:
        Marker(text)
    except InvalidMarker as exc:
        return f"marker {text!r} is not valid ({str(exc).splitlines()[0]})"
    words = set(_WORD.findall(_QUOTED.sub("", text))) - {"and", "or", "not", "in"}
    unknown = sorted(words - MARKER_VARIABLES)
    if unknown:
        return (
            f"marker {text!r} depends on {', '.join(unknown)}, which a target's platform and "
            "Python do not decide"
        )
    return None


def marker_holds(text: str, machine: Machine) -> bool | None:
    """Whether the marker holds on the machine; None when it depends on the Python patch
    release (it must not: a target promises every patch release). An empty marker holds."""
    if not text:
        return True
    from lockgen.formats.pep508 import markers

    marker = markers.Marker(text)
    seen = {marker.evaluate(machine.environment(patch)) for patch in _PATCHES}
    return seen.pop() if len(seen) == 1 else None


def exact_release_problem(what: str, text: str, want: Version, local: str | None) -> str | None:
    """Why the pinned version ``text`` is not exactly release ``want`` with local tag ``local``
    (None: it is). A pre-, post- or dev release, or another patch release, is not the
    release the matrix knows."""
    from lockgen.formats.pep508 import version as pep440

    InvalidVersion, Pep440 = pep440.InvalidVersion, pep440.Version
    try:
        got, release = Pep440(text), Pep440(want.raw.split("+")[0])
    except InvalidVersion:
        return f"{what} {text!r} is not a PEP 440 version"
    if got.pre or got.dev or got.post is not None:
        return f"{what} {text} is a pre-, post- or development release, not {what} {want}"
    if len(release.release) < 3 or got.release != release.release:
        return f"{what} {text} is not the release {what} {want} the target names"
    if got.local != local:
        return (
            f"{what} {text} is the {got.local or 'untagged'} build, the target's is "
            f"{local or 'untagged'}" + (" (a CPU build)" if got.local == "cpu" else "")
        )
    return None

"""Version values: release versions, CUDA versions and GPU compute capabilities.

Versions are parsed into tuples of integers and compared as such (``2.10 > 2.9``); they are
never compared as strings or floats.

Public API
----------
``Version.parse("2.1.2")``
    A release version. PEP 440 suffixes (``rc1``, ``.dev2026``, ``+cu121``) are accepted and
    kept in ``raw``; ``local`` holds the part after ``+``. ``Version.minor`` gives ``2.1``.
``parse_cuda("cu121" | "12.1" | "cpu")``
    A CUDA version, or ``None`` for a CPU build.
``Capability.parse("sm_86" | "8.6" | "sm_90a" | "86")``
    A GPU compute capability / code arch. ``Capability.parse_arch("12.0+PTX")`` also reads
    the ``+PTX`` marker used in arch lists.
``runs_on(code, device, cuda=None)``
    torch's own rule for whether a cubin built for ``code`` runs on a ``device``.
``Driver.parse("535.104.05" | "535")``
    An NVIDIA driver as a user names it: an exact version, or a bare branch (``535``) that
    stands for every driver of that branch. ``reaches(version)`` says whether all, some or
    none of them are at least ``version``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from lockgen.errors import LockgenError

# ASCII digits only (``re.ASCII``: ``\d`` alone also takes ``٢``), at most 12 to a part
_VERSION_RE = re.compile(
    r"^v?(?P<release>\d{1,12}(?:\.\d{1,12})*)"
    r"(?P<suffix>(?:[.-]?(?:a|b|rc|dev|post)\d{0,12})*)"
    r"(?:\+(?P<local>[A-Za-z0-9]+(?:\.[A-Za-z0-9]+)*))?$",
    re.ASCII,
)
_MAX_VERSION_CHARS = 100


@dataclass(frozen=True, order=True)
class Version:
    """A dotted release version such as ``2.1``, ``2.1.2`` or ``535.104.05``.

    Ordering uses the numeric parts only, padded with zeros (``2.1 == 2.1.0``). ``raw`` keeps
    the text as written; ``local`` is the ``+label`` part (``cu121`` in ``2.1.2+cu121``).
    """

    parts: tuple[int, ...]
    raw: str = field(default="", compare=False)
    local: str | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: object, what: str = "version") -> Version:
        if isinstance(text, Version):
            return text
        if not isinstance(text, str):
            raise LockgenError(f"bad {what} {text!r}: expected a string like '2.1' or '2.1.2'")
        m = _VERSION_RE.match(text.strip()) if len(text) <= _MAX_VERSION_CHARS else None
        if not m:
            shown = text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
            raise LockgenError(f"bad {what} {shown!r}: expected dotted ASCII numbers like '2.1.2'")
        parts = tuple(int(p) for p in m.group("release").split("."))
        return cls(parts, text.strip(), m.group("local"))

    def __post_init__(self) -> None:
        # Normalise trailing zeros away for comparison, keep the original length in raw.
        trimmed = list(self.parts)
        while len(trimmed) > 1 and trimmed[-1] == 0:
            trimmed.pop()
        object.__setattr__(self, "parts", tuple(trimmed))
        if not self.raw:
            object.__setattr__(self, "raw", ".".join(str(p) for p in self.parts))

    def __str__(self) -> str:
        return self.raw

    def __repr__(self) -> str:
        return f"Version({self.raw!r})"

    @property
    def major(self) -> int:
        return self.parts[0]

    @property
    def suffix(self) -> str:
        """The PEP 440 pre-, post- or dev-release part (``rc3`` in ``2.8.0rc3``), or ""."""
        m = _VERSION_RE.match(self.raw)
        return m.group("suffix") if m else ""

    @cached_property
    def minor(self) -> Version:
        """The ``major.minor`` release this version belongs to (``2.1.2`` → ``2.1``)."""
        minor = self.parts[1] if len(self.parts) > 1 else 0
        return Version((self.parts[0], minor), f"{self.parts[0]}.{minor}")

    def matches_prefix(self, other: Version) -> bool:
        """True when ``self`` is ``other`` or a more precise version of it (``8.9.2.26``
        matches ``8.9.2`` and ``8.9``)."""
        raw_parts = tuple(int(p) for p in other.raw.split("+")[0].split(".") if p.isdigit())
        mine = self.padded(len(raw_parts))
        return mine[: len(raw_parts)] == raw_parts

    def padded(self, n: int) -> tuple[int, ...]:
        return self.parts + (0,) * max(0, n - len(self.parts))


_CU_RE = re.compile(r"^cu(\d{2,3})$", re.ASCII)


def parse_cuda(text: object) -> Version | None:
    """Read a CUDA version: ``12.1``, ``cu121``, ``cu118``; ``cpu`` / ``none`` give ``None``."""
    if text is None:
        return None
    if isinstance(text, Version):
        return text
    if not isinstance(text, str):
        raise LockgenError(f"bad CUDA version {text!r}: expected e.g. '12.1', 'cu121' or 'cpu'")
    t = text.strip().lower()
    if t in ("cpu", "none", ""):
        return None
    m = _CU_RE.match(t)
    if m:
        digits = m.group(1)
        return Version((int(digits[:-1]), int(digits[-1])), f"{int(digits[:-1])}.{digits[-1]}")
    v = Version.parse(t, "CUDA version")
    if len(v.raw.split(".")) < 2 or v.local:
        raise LockgenError(f"bad CUDA version {text!r}: expected major.minor like '12.1'")
    return v


def cuda_tag(cuda: Version | None) -> str:
    """``12.1`` → ``cu121``; ``None`` → ``cpu`` (the names PyTorch's wheel index uses)."""
    if cuda is None:
        return "cpu"
    p = cuda.padded(2)
    return f"cu{p[0]}{p[1]}"


# Jetson / integrated GPUs: torch excludes these from the "same major, higher minor" rule.
JETSON_CAPABILITIES = frozenset({(5, 3), (6, 2), (7, 2), (8, 7)})
# torch treats sm_101 as an old name of sm_110.
_CAPABILITY_ALIASES = {(10, 1): (11, 0)}

_SM_RE = re.compile(
    r"^(?:sm_?|compute_?)?(\d)(\d)(a|f)?$|^(?:sm_?|compute_?)?(1\d)(\d)(a|f)?$", re.ASCII
)
_DOTTED_RE = re.compile(r"^(\d{1,2})\.(\d)(a|f)?$", re.ASCII)


@dataclass(frozen=True, order=True)
class Capability:
    """A compute capability (``8.6``) or the arch a cubin was built for (``sm_86``).

    ``specific`` is the ``a``/``f`` suffix (``sm_90a``): arch-specific code runs only on that
    exact capability. ``ptx`` marks an arch-list entry that also embeds PTX (``12.0+PTX``),
    which newer GPUs can JIT-compile.
    """

    major: int
    minor: int
    specific: str = ""
    ptx: bool = False

    @classmethod
    def parse(cls, text: object) -> Capability:
        if isinstance(text, Capability):
            return text
        t = str(text).strip().lower()
        m = _DOTTED_RE.match(t)
        if m:
            return cls(int(m.group(1)), int(m.group(2)), m.group(3) or "")
        m = _SM_RE.match(t)
        if m:
            g = m.groups()
            if g[0] is not None:
                return cls(int(g[0]), int(g[1]), g[2] or "")
            return cls(int(g[3]), int(g[4]), g[5] or "")
        raise LockgenError(
            f"bad compute capability {text!r}: expected e.g. 'sm_86', '8.6' or 'sm_90a'"
        )

    @classmethod
    def parse_arch(cls, text: str) -> Capability:
        """An arch-list entry: ``8.6``, ``12.0+PTX``, ``9.0a``."""
        t = str(text).strip()
        ptx = t.upper().endswith("+PTX")
        base = cls.parse(t[:-4] if ptx else t)
        return cls(base.major, base.minor, base.specific, ptx)

    @property
    def canonical(self) -> tuple[int, int]:
        return _CAPABILITY_ALIASES.get((self.major, self.minor), (self.major, self.minor))

    @property
    def sm(self) -> str:
        return f"sm_{self.major}{self.minor}{self.specific}"

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}{self.specific}" + ("+PTX" if self.ptx else "")


# From CUDA 13.2 on, sm_70 / sm_80 / sm_86 code also runs on the Jetson capability of its
# major (torch's DEVICE_REQUIREMENT_POST_JETSON_SBSA_UNIFICATION).
_SBSA_UNIFIED_CODES = frozenset({(7, 0), (8, 0), (8, 6)})
_SBSA_UNIFICATION_CUDA = (13, 2)


def runs_on(code: Capability, device: Capability, cuda: Version | None = None) -> bool:
    """Whether code from an arch-list entry runs on a device of capability ``device``.

    The rule torch applies (torch/cuda/__init__.py): a cubin for ``sm_XY`` runs on devices
    with the same major and a minor ≥ Y; Jetson capabilities (5.3, 6.2, 7.2, 8.7) and
    arch-specific code (``sm_90a``) run only on exactly their capability, except that from
    CUDA 13.2 on (``cuda``) sm_70 / sm_80 / sm_86 code also runs on the Jetson of its major;
    ``sm_101`` is ``sm_110``. An entry that carries PTX can be JIT-compiled by any newer
    device.
    """
    c, d = code.canonical, device.canonical
    if c == d:
        return True
    if code.ptx and d > c:
        return True
    if code.specific or c in JETSON_CAPABILITIES:
        return False
    if d in JETSON_CAPABILITIES:
        unified = cuda is not None and cuda.padded(2) >= _SBSA_UNIFICATION_CUDA
        if not (unified and c in _SBSA_UNIFIED_CODES):
            return False
    return c[0] == d[0] and d[1] >= c[1]


ALL, SOME, NONE = "all", "some", "none"


@dataclass(frozen=True)
class Driver:
    """An NVIDIA driver as a user names it.

    ``535.104.05`` is that driver; a bare branch ``535`` stands for every driver of the R535
    branch (535.x.y), so whether it reaches a version can hold for all, some or none of them.
    """

    version: Version
    branch: bool = False

    @classmethod
    def parse(cls, text: object) -> Driver:
        if isinstance(text, Driver):
            return text
        if isinstance(text, Version):
            return cls(text)
        v = Version.parse(text, "driver version")
        if v.local or not re.fullmatch(r"\d+(\.\d+)*", v.raw, re.ASCII):
            raise LockgenError(f"bad driver version {text!r}: expected e.g. '535.104.05' or '535'")
        return cls(v, branch=len(v.raw.split(".")) == 1)

    @property
    def raw(self) -> str:
        return self.version.raw

    def __str__(self) -> str:
        return f"R{self.raw}" if self.branch else self.raw

    def reaches(self, version: Version) -> str:
        """``all`` / ``some`` / ``none`` of the drivers it stands for are >= ``version``."""
        if self.version >= version:
            return ALL
        if self.branch and version.major == self.version.major:
            return SOME
        return NONE

    def within(self, last_branch: Version) -> bool:
        """Whether it belongs to ``last_branch`` or an older branch."""
        return self.version.major <= last_branch.major

"""The part of PEP 440/508 the stack facts need, with the standard library only: final
release versions (``0.0.33.post2``), specifier sets (``>=3.11,<3.15``, ``==2.13.0``, ``~=3.8.0``,
``==2.*``) and a requirement line's name, extras, specifier and ``extra == "x"`` marker."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lockgen.errors import LockgenError

_V = re.compile(r"v?(\d+(?:\.\d+)*)(?:\.?post(\d+))?(?:[+].*)?", re.IGNORECASE)


def key(text: str) -> tuple[tuple[int, ...], int]:
    """A final version as a sortable key: (release, post). Pre-releases are not parsed."""
    m = _V.fullmatch(text.strip())
    if not m:
        raise LockgenError(f"not a final version: {text!r}")
    release = tuple(int(x) for x in m.group(1).split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    return release, int(m.group(2) or -1)


def _one(op: str, want: str, have: str) -> bool:
    if want.endswith(".*"):
        prefix = key(want[:-2])[0]
        hit = key(have)[0][: len(prefix)] == prefix or (
            prefix[-1] == 0 and key(have)[0] == prefix[:-1]
        )
        return hit if op == "==" else not hit
    h, w = key(have), key(want)
    if op == "~=":  # ~=3.8.0: >=3.8.0 and ==3.8.*
        m = _V.fullmatch(want.strip())
        parts = tuple(int(x) for x in m.group(1).split(".")) if m else ()
        stem = parts[: max(len(parts) - 1, 1)]
        padded = key(have)[0] + (0,) * len(stem)
        return h >= w and padded[: len(stem)] == stem
    if op in ("==", "==="):
        return h == w or (w[1] == -1 and h[0] == w[0] and h[1] == -1)
    return {
        "!=": h != w,
        ">=": h >= w,
        "<=": h <= w,
        ">": h > w and h[0] != w[0],
        "<": h < w,
    }[op]


_CLAUSE = re.compile(r"\s*(===|==|!=|~=|>=|<=|>|<)\s*([^,\s]+)\s*")


def contains(spec: str, version: str) -> bool:
    """Whether ``version`` satisfies every clause of ``spec`` (empty: any)."""
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = _CLAUSE.fullmatch(clause)
        if not m:
            raise LockgenError(f"cannot read the specifier {clause!r}")
        if not _one(m.group(1), m.group(2), version):
            return False
    return True


@dataclass(frozen=True)
class Requirement:
    name: str  # normalized: lower case, '-' separated
    extras: tuple[str, ...]
    spec: str
    extra: str | None  # the extra this line belongs to (``extra == "vllm"``), else None
    marker: str

    @classmethod
    def parse(cls, line: str) -> Requirement:
        text, _, marker = line.partition(";")
        m = re.fullmatch(
            r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*\(?([^)]*)\)?\s*", text
        )
        if not m:
            raise LockgenError(f"cannot read the requirement {line!r}")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        return cls(
            normalize(m.group(1)),
            tuple(x.strip() for x in (m.group(2) or "").split(",") if x.strip()),
            m.group(3).replace(" ", ""),
            normalize(extra.group(1)) if extra else None,
            marker.strip(),
        )


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

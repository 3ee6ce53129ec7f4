"""The LLM stack's facts: ``stack-pypi.toml`` (what PyPI serves, written by
``lockgen refresh-stack``) and ``stack.toml`` (how each binary binds to torch, GPU floors,
artifacts off PyPI; kept by hand), read through :class:`lockgen.tables.Table`, each fact with
its :class:`~lockgen.provenance.Provenance`.

``load_stack(folder=None) -> Stack`` reads both from lockgen's own data (or ``folder``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lockgen.errors import LockgenError
from lockgen.load import DATA_DIR
from lockgen.provenance import Provenance, Sourced
from lockgen.specifiers import Requirement, contains, key
from lockgen.tables import Table, check_top, read_toml
from lockgen.versions import Capability

T = TypeVar("T")
BINDINGS = ("exact", "exact-undeclared", "stable", "jit", "none", "source")


@dataclass(frozen=True)
class Artifact(Sourced):
    """One file of a release on PyPI; ``cuda`` the CUDA majors its binary links (empty: no
    CUDA binary found), None when not read."""

    file: str
    python: str
    abi: str
    platform: str
    cuda: tuple[int, ...] | None
    needed: tuple[str, ...]
    provenance: Provenance
    where: str = "PyPI"

    @property
    def is_sdist(self) -> bool:
        return self.python == "source"


@dataclass(frozen=True)
class StackRelease(Sourced):
    package: str
    version: str
    uploaded: str
    requires_python: str
    requires: tuple[Requirement, ...]
    artifacts: tuple[Artifact, ...]
    provenance: Provenance


@dataclass(frozen=True)
class Binding(Sourced):
    package: str
    versions: str
    kind: str
    torch: str
    provenance: Provenance


@dataclass(frozen=True)
class GpuFloor(Sourced):
    package: str
    versions: str
    capability: Capability
    provenance: Provenance


@dataclass(frozen=True)
class OffPypi(Sourced):
    """Builds of a package served off PyPI (the PyTorch index, GitHub releases)."""

    package: str
    versions: str
    where: str
    index: str
    cuda: int
    torch: str
    python: str
    provenance: Provenance


@dataclass(frozen=True)
class Stack:
    releases: dict[str, tuple[StackRelease, ...]]  # newest first
    bindings: tuple[Binding, ...]
    gpu_floors: tuple[GpuFloor, ...]
    off_pypi: tuple[OffPypi, ...]

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(sorted({*self.releases, *(b.package for b in self.bindings)}))

    def binding(self, package: str, version: str) -> Binding | None:
        return next(
            (b for b in self.bindings if b.package == package and contains(b.versions, version)),
            None,
        )

    def gpu_floor(self, package: str, version: str) -> GpuFloor | None:
        return next(
            (g for g in self.gpu_floors if g.package == package and contains(g.versions, version)),
            None,
        )

    def off(self, package: str, version: str) -> tuple[OffPypi, ...]:
        return tuple(
            o for o in self.off_pypi if o.package == package and contains(o.versions, version)
        )


def _artifact(t: Table, sources: dict[str, str]) -> Artifact:
    cuda = t.data.get("cuda")
    t.seen.update({"cuda", "size", "probed"})
    if cuda is not None and not (
        isinstance(cuda, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in cuda)
    ):
        t.fail(f"'cuda' must be a list of CUDA majors, got {cuda!r}")
    return Artifact(
        file=t.text("file"),
        python=t.text("python"),
        abi=t.text("abi"),
        platform=t.text("platform"),
        cuda=tuple(cuda) if cuda is not None else None,
        needed=t.strs("needed", required=False),
        provenance=t.provenance(sources),
    )


def _release(t: Table, sources: dict[str, str]) -> StackRelease:
    package, version = t.text("package"), t.text("version")
    try:
        key(version)
        requires = tuple(Requirement.parse(r) for r in t.strs("requires", required=False))
    except LockgenError as exc:
        t.fail(str(exc))
    t.seen.add("metadata_from")
    arts = tuple(_each(t, "artifact", sources, _artifact))
    r = StackRelease(
        package,
        version,
        t.text("uploaded"),
        t.text("requires_python", required=False),
        requires,
        arts,
        t.provenance(sources),
    )
    return r


def _local(t: Table, sources: dict[str, str]) -> StackRelease:
    """A package built from this repository: one source "file", its install line."""
    prov = t.provenance(sources)
    try:
        requires = tuple(Requirement.parse(r) for r in t.strs("requires", required=False))
    except LockgenError as exc:
        t.fail(str(exc))
    r = StackRelease(
        t.text("package"),
        t.text("version"),
        "",
        t.text("requires_python", required=False),
        requires,
        (Artifact(t.text("install"), "source", "", "any", None, (), prov, "this repository"),),
        prov,
    )
    return r


def _sources(top: Table) -> dict[str, str]:
    raw = top.table("sources")
    if not all(isinstance(v, str) for v in raw.values()):
        top.fail("every [sources] entry must be a string")
    return dict(raw)


def _binding(t: Table, sources: dict[str, str]) -> Binding:
    b = Binding(
        t.text("package"),
        t.text("versions"),
        t.text("kind"),
        t.text("torch", required=False),
        t.provenance(sources),
    )
    if b.kind not in BINDINGS:
        t.fail(f"unknown kind {b.kind!r} (known: {', '.join(BINDINGS)})")
    return b


def _gpu_floor(t: Table, sources: dict[str, str]) -> GpuFloor:
    try:
        cap = Capability.parse(t.text("capability"))
    except LockgenError as exc:
        t.fail(str(exc))
    return GpuFloor(t.text("package"), t.text("versions"), cap, t.provenance(sources))


def _off_pypi(t: Table, sources: dict[str, str]) -> OffPypi:
    return OffPypi(
        t.text("package"),
        t.text("versions"),
        t.text("where"),
        t.text("index"),
        t.integer("cuda"),
        t.text("torch", required=False),
        t.text("python", required=False),
        t.provenance(sources),
    )


def _each(
    top: Table, key: str, sources: dict[str, str], read: Callable[[Table, dict], T]
) -> list[T]:
    """Every ``[[key]]`` table of the file, read by ``read`` and checked for unknown keys."""
    out = []
    for i, raw in enumerate(top.tables(key)):
        where = f"{key} {i}" if top.label == "top level" else f"{top.label} {key} {i}"
        t = Table(top.file, where, raw)
        out.append(read(t, sources))
        t.done()
    return out


def load_stack(folder: Path | None = None) -> Stack:
    folder = Path(folder) if folder else DATA_DIR
    pypi_file, kept_file = folder / "stack-pypi.toml", folder / "stack.toml"
    top = Table(pypi_file, "top level", read_toml(pypi_file))
    found = _each(top, "release", _sources(top), _release)
    check_top(top, ("schema", "sources", "release"))

    top = Table(kept_file, "top level", read_toml(kept_file))
    sources = _sources(top)
    bindings = _each(top, "binding", sources, _binding)
    floors = _each(top, "gpu_floor", sources, _gpu_floor)
    off = _each(top, "channel", sources, _off_pypi)
    found += _each(top, "local", sources, _local)
    check_top(top, ("schema", "sources", "binding", "gpu_floor", "channel", "local"))
    releases: dict[str, list[StackRelease]] = {}
    for r in found:
        releases.setdefault(r.package, []).append(r)
    ordered = {
        p: tuple(sorted(rs, key=lambda r: key(r.version), reverse=True))
        for p, rs in releases.items()
    }
    return Stack(ordered, tuple(bindings), tuple(floors), tuple(off))

"""The compatibility matrix: the facts and their queries.

``data/matrix.toml`` (lockgen's package data) holds what is true about PyTorch releases
(their platforms and Python wheels, torchvision's), their CUDA builds, driver floors, GPU
architectures per build and channels; ``data/gpus.toml`` NVIDIA's GPU list (names, compute
capabilities, the drivers each GPU family needs); ``data/targets.toml`` names the
environments the project generates (:mod:`lockgen.targets`). All are read once and
validated at the edge by :mod:`lockgen.load` into the frozen dataclasses here; the rest of
lockgen never sees raw TOML.

Public API
----------
``Matrix``
    ``releases`` (oldest first), ``release(torch)`` (accepts ``2.1.2`` and maps it onto the
    ``2.1`` row), ``find_release``, ``cuda_toolkit(cuda)``, ``driver_floor(cuda, os)``,
    ``arch_list(torch, cuda, platform, channel)``, ``find_gpu(text)``,
    ``gpu_capability(text)``, ``gpu_driver(capability, os)``, ``channel(name)``,
    ``targets`` (by name, in file order), ``target(name)``.
``DriverFloor.fit(driver) -> DriverFit``
    The one driver rule check and doctor share: ``too-old`` below the minor-version-
    compatibility floor, ``minor-version-compat`` up to the toolkit driver, ``ok`` from it
    on; for a bare branch the best status some driver of the branch reaches, and from which
    version on (``since``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lockgen.errors import LockgenError
from lockgen.gpus import Gpu, GpuList
from lockgen.provenance import Provenance, Sourced
from lockgen.versions import ALL, NONE, Capability, Driver, Version, cuda_tag

if TYPE_CHECKING:  # pragma: no cover
    from lockgen.targets import Target

STATUSES = ("stable", "experimental")
OK, MVC, TOO_OLD = "ok", "minor-version-compat", "too-old"
CHANNEL_KINDS = ("pip", "conda")
PLATFORMS = ("linux-64", "linux-aarch64", "win-64", "osx-arm64", "osx-64")


# --------------------------------------------------------------------------------------------
# The data


@dataclass(frozen=True)
class Build(Sourced):
    """One CUDA build of a release (``torch 2.1`` + CUDA 12.1 + cuDNN 8.9.2.26)."""

    cuda: Version
    cudnn: Version | None
    status: str
    provenance: Provenance
    cudnn_release_md: Version | None = None

    @property
    def tag(self) -> str:
        return cuda_tag(self.cuda)

    def cudnn_matches(self, cudnn: Version) -> bool:
        known = [c for c in (self.cudnn, self.cudnn_release_md) if c is not None]
        return any(k.matches_prefix(cudnn) for k in known)


@dataclass(frozen=True)
class Release(Sourced):
    """A PyTorch minor release and everything shipped with it."""

    torch: Version
    torchvision: Version | None
    released: str
    python: tuple[Version, ...]
    python_experimental: tuple[Version, ...]
    pypi_default_cuda: Version
    pypi_default_cudnn: Version
    builds: tuple[Build, ...]
    provenance: Provenance
    unverified: tuple[str, ...] = ()
    platforms: tuple[str, ...] = ("linux-64",)
    python_platforms: Mapping[str, tuple[Version, ...]] = field(default_factory=dict)
    torchvision_python: tuple[Version, ...] = ()
    torchvision_python_platforms: Mapping[str, tuple[Version, ...]] = field(default_factory=dict)
    pypi_default_platforms: tuple[str, ...] = ("linux-64",)
    patches: tuple[Version, ...] = ()  # every final x.y.z release, where the matrix knows them

    def build(self, cuda: Version) -> Build | None:
        return next((b for b in self.builds if b.cuda == cuda), None)

    def python_for(self, platform: str = "linux-64") -> tuple[Version, ...]:
        """The Python versions PyPI has torch wheels of this release for on ``platform``."""
        if platform not in self.platforms:
            return ()
        return self.python_platforms.get(platform, self.python)

    def torchvision_python_for(self, platform: str = "linux-64") -> tuple[Version, ...]:
        if platform not in self.platforms:
            return ()
        return self.torchvision_python_platforms.get(platform, self.torchvision_python)

    def supports_python(self, python: Version, platform: str = "linux-64") -> bool:
        return python.minor in self.python_for(platform)

    def pairs_python(self, python: Version, platform: str = "linux-64") -> bool:
        """Both torch and the paired torchvision have wheels for ``python`` on ``platform``."""
        return self.supports_python(python, platform) and (
            python.minor in self.torchvision_python_for(platform)
        )

    @property
    def cuda_versions(self) -> tuple[Version, ...]:
        return tuple(b.cuda for b in self.builds)

    def unknown_patch(self, version: Version) -> str:
        """Why ``version`` (a final release of this minor) is not a release the matrix
        knows, or "" when it is one (x.y.0 always is; other patches where ``patches``
        lists them)."""
        if version.raw.split("+")[0].count(".") < 2 or version in (self.patches or (self.torch,)):
            return ""
        known = ", ".join(p.raw for p in self.patches) or f"{self.torch}.0 only"
        return f"torch {version} is not a release of torch {self.torch} the matrix knows ({known})"


@dataclass(frozen=True)
class CudaMajor(Sourced):
    """Minor-version-compatibility driver floor of one CUDA major."""

    major: int
    linux_floor: Version
    windows_floor: Version | None
    provenance: Provenance


@dataclass(frozen=True)
class CudaToolkit(Sourced):
    """The driver bundled with a CUDA toolkit (GA): the floor without minor-version compat."""

    version: Version
    linux: Version
    windows: Version | None
    provenance: Provenance


@dataclass(frozen=True)
class DriverFit:
    """How a driver (or every driver of a branch) meets a :class:`DriverFloor`.

    ``status`` is the best one the driver reaches; for a branch that reaches it only from a
    version on, ``since`` is that version and ``below`` the status of the branch's older
    drivers.
    """

    status: str
    floor: DriverFloor
    since: Version | None = None
    below: str = ""

    @property
    def runs(self) -> bool:
        return self.status != TOO_OLD


@dataclass(frozen=True)
class DriverFloor:
    """``minimum``: below it the build cannot run; ``full``: at or above it, no caveats."""

    cuda: Version
    minimum: Version
    full: Version | None
    verified: bool

    def status(self, driver: Version) -> str:
        if driver < self.minimum:
            return TOO_OLD
        if self.full is not None and driver < self.full:
            return MVC
        return OK

    def fit(self, driver: Driver | Version) -> DriverFit:
        d = Driver.parse(driver)
        if not d.branch:
            return DriverFit(self.status(d.version), self)
        levels = [(OK, self.full), (MVC, self.minimum)] if self.full else [(OK, self.minimum)]
        for i, (status, need) in enumerate(levels):
            reach = d.reaches(need)
            if reach == NONE:
                continue
            if reach == ALL:
                return DriverFit(status, self)
            rest = levels[i + 1 :]
            below = rest[0][0] if rest and d.reaches(rest[0][1]) == ALL else TOO_OLD
            return DriverFit(status, self, since=need, below=below)
        return DriverFit(TOO_OLD, self)


@dataclass(frozen=True)
class ArchList(Sourced):
    """The GPU architectures compiled into the builds of some releases on some platforms."""

    channel: str
    cuda: tuple[Version, ...]
    torch_min: Version
    torch_max: Version
    platforms: tuple[str, ...]
    archs: tuple[Capability, ...]
    provenance: Provenance

    def covers(self, torch: Version, cuda: Version, platform: str) -> bool:
        return (
            cuda in self.cuda
            and self.torch_min <= torch.minor <= self.torch_max
            and platform in self.platforms
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(str(a) for a in self.archs)

    @property
    def torch_cuda_arch_list(self) -> str:
        """The ``TORCH_CUDA_ARCH_LIST`` spelling: ``7.5;8.0;12.0+PTX``."""
        return ";".join(self.names)

    def runs_on(self, device: Capability) -> bool:
        from lockgen.versions import runs_on

        return any(runs_on(code, device) for code in self.archs)


@dataclass(frozen=True)
class Channel(Sourced):
    """How to ask a package source for a build (pip index or conda channel)."""

    name: str
    kind: str
    provenance: Provenance
    index_url: str = ""
    wheel_index: str = ""
    channels: tuple[str, ...] = ()
    torch_max: Version | None = None
    cuda_metapackage: str = ""
    cuda_metapackage_versions: tuple[Version, ...] = ()
    cuda_build: str = ""
    torchvision_cuda_build: str = ""
    cpu_build: str = ""
    cpu_metapackage: str = ""

    def cuda_glob(self, template: str, cuda: Version) -> str:
        """A build-string glob template filled in for ``cuda``."""
        return template.format(cuda=cuda.raw, nodot=cuda.raw.replace(".", ""))


@dataclass(frozen=True)
class GpuDriver:
    """What the driver must be for a GPU: at least ``minimum`` (the driver of the first CUDA
    toolkit for its architecture), at most the ``last_branch`` that still supports it."""

    minimum: Version | None
    first_cuda: Version | None
    last_branch: Version | None
    architecture: str
    verified: bool


@dataclass(frozen=True)
class Matrix:
    path: Path
    sources: Mapping[str, str]
    releases: tuple[Release, ...]
    cuda_majors: tuple[CudaMajor, ...]
    cuda_toolkits: tuple[CudaToolkit, ...]
    arch_lists: tuple[ArchList, ...]
    channels: Mapping[str, Channel]
    virtual_packages: Mapping[str, Mapping[str, str]]
    gpus: GpuList = field(default_factory=GpuList)
    targets: Mapping[str, Target] = field(default_factory=dict)
    targets_path: Path | None = None
    gpus_path: Path | None = None

    # -- releases
    def find_release(self, torch: Version | str) -> Release | None:
        v = Version.parse(torch, "torch version")
        return next((r for r in self.releases if r.torch == v.minor), None)

    def release(self, torch: Version | str) -> Release:
        r = self.find_release(torch)
        if r is None:
            known = ", ".join(r.torch.raw for r in self.releases)
            raise LockgenError(f"torch {torch} is not in the matrix (known releases: {known})")
        return r

    @property
    def cuda_versions(self) -> tuple[Version, ...]:
        return tuple(sorted({b.cuda for r in self.releases for b in r.builds}))

    # -- drivers
    @cached_property
    def _memo(self) -> dict[tuple, Any]:
        """Answers of the lookups below, per argument tuple (check asks them thousands of
        times per question)."""
        return {}

    def _cached(self, key: tuple, compute: Any) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def cuda_toolkit(self, cuda: Version) -> CudaToolkit | None:
        return next((t for t in self.cuda_toolkits if t.version == cuda.minor), None)

    def cuda_major(self, major: int) -> CudaMajor | None:
        return next((m for m in self.cuda_majors if m.major == major), None)

    def driver_floor(self, cuda: Version, os_name: str = "linux") -> DriverFloor | None:
        return self._cached(
            ("floor", cuda.parts, os_name), lambda: self._driver_floor(cuda, os_name)
        )

    def _driver_floor(self, cuda: Version, os_name: str) -> DriverFloor | None:
        major = self.cuda_major(cuda.major)
        if major is None:
            return None
        toolkit = self.cuda_toolkit(cuda)
        if os_name == "windows":
            if major.windows_floor is None:
                return None
            full = toolkit.windows if toolkit else None
            minimum = major.windows_floor
        else:
            full = toolkit.linux if toolkit else None
            minimum = major.linux_floor
        verified = major.verified and (toolkit.verified if toolkit else False)
        return DriverFloor(cuda, minimum, full, verified)

    def max_cuda_for_driver(self, driver: Version) -> Version | None:
        """The newest CUDA toolkit in the matrix whose toolkit driver ``driver`` satisfies."""
        ok = [t.version for t in self.cuda_toolkits if driver >= t.linux]
        return max(ok) if ok else None

    # -- GPUs
    def arch_list(
        self, torch: Version, cuda: Version, platform: str = "linux-64", channel: str = "pip"
    ) -> ArchList | None:
        """The arch list of a build; falls back to another channel's list of the same build
        (then marked unverified) when the asked channel has none."""
        key = ("archs", torch.parts, cuda.parts, platform, channel)
        return self._cached(key, lambda: self._arch_list(torch, cuda, platform, channel))

    def _arch_list(
        self, torch: Version, cuda: Version, platform: str, channel: str
    ) -> ArchList | None:
        exact = [
            a for a in self.arch_lists if a.channel == channel and a.covers(torch, cuda, platform)
        ]
        if exact:
            return exact[0]
        other = [a for a in self.arch_lists if a.covers(torch, cuda, platform)]
        if other:
            a = other[0]
            note = f"taken from the {a.channel} channel's build; {a.note}".rstrip("; ")
            return replace(a, channel=channel, provenance=Provenance(a.source, False, note))
        return None

    def find_gpu(self, text: str) -> Gpu | None:
        """NVIDIA's entry for a GPU name (see :meth:`lockgen.gpus.GpuList.find`)."""
        return self.gpus.find(text)

    def resolve_gpu(self, text: str) -> tuple[Capability, str, Gpu | None]:
        """``sm_86`` / ``8.6`` / ``NVIDIA GeForce RTX 3090`` → (capability, label, entry);
        the entry is None for a capability given directly."""
        try:
            cap = Capability.parse(text)
            return cap, cap.sm, None
        except LockgenError:
            pass
        gpu = self.find_gpu(text)
        if gpu is None:
            close = self.gpus.close_names(text)
            hint = f"; close names: {', '.join(close)}" if close else ""
            where = "" if self.gpus.gpus else " (no GPU list loaded: gpus.toml beside the matrix)"
            raise LockgenError(
                f"unknown GPU {text!r}{where}: give its compute capability (e.g. sm_86 or "
                f"8.6) or its name as nvidia-smi prints it{hint}"
            )
        return gpu.capability, gpu.label, gpu

    def gpu_capability(self, text: str) -> tuple[Capability, str]:
        """``sm_86`` / ``8.6`` / ``RTX 3090`` → (capability, label)."""
        cap, label, _ = self.resolve_gpu(text)
        return cap, label

    def gpu_driver(self, capability: Capability, os_name: str = "linux") -> GpuDriver | None:
        """The driver window of a GPU's architecture, or None when the GPU list says
        nothing about it (an architecture every driver of the matrix supports)."""
        key = ("gpu-driver", capability.canonical, os_name)
        return self._cached(key, lambda: self._gpu_driver(capability, os_name))

    def _gpu_driver(self, capability: Capability, os_name: str) -> GpuDriver | None:
        arch = self.gpus.architecture(capability)
        if arch is None:
            return None
        minimum = None
        verified = arch.verified
        if arch.first_cuda is not None:
            toolkit = self.cuda_toolkit(arch.first_cuda)
            if toolkit is not None:
                minimum = toolkit.windows if os_name == "windows" else toolkit.linux
                verified = verified and toolkit.verified
        return GpuDriver(minimum, arch.first_cuda, arch.last_driver, arch.name, verified)

    # -- channels and targets
    def channel(self, name: str) -> Channel:
        if name not in self.channels:
            raise LockgenError(
                f"unknown channel {name!r} (known: {', '.join(sorted(self.channels))})"
            )
        return self.channels[name]

    def target(self, name: str) -> Target:
        if name not in self.targets:
            known = ", ".join(self.targets) or "none loaded"
            raise LockgenError(f"unknown target {name!r} (known targets: {known})")
        return self.targets[name]

    # -- the rows of `lockgen matrix`

    def build_rows(
        self, releases: Sequence[Release] | None = None, cuda: Version | None = None
    ) -> list[dict[str, Any]]:
        """One row per CUDA build of ``releases`` (default: all), only ``cuda``'s if given:
        the build, its driver floor, arch list, verification and sources, with stable keys
        (``lockgen matrix --format json``)."""
        rows = []
        for r in self.releases if releases is None else releases:
            for b in r.builds:
                if cuda is not None and b.cuda != cuda:
                    continue
                floor = self.driver_floor(b.cuda)
                archs = self.arch_list(r.torch, b.cuda)
                rows.append(
                    {
                        "torch": r.torch.raw,
                        "torchvision": r.torchvision.raw if r.torchvision else None,
                        "python": [p.raw for p in r.python],
                        "released": r.released,
                        "cuda": b.cuda.raw,
                        "cudnn": b.cudnn.raw if b.cudnn else None,
                        "status": b.status,
                        "pypi_default": b.cuda == r.pypi_default_cuda,
                        "driver_linux": floor.full.raw if floor and floor.full else None,
                        "driver_linux_min": floor.minimum.raw if floor else None,
                        "archs": list(archs.names) if archs else None,
                        "verified": r.verified and b.verified,
                        "unverified": list(r.unverified)
                        + ([] if b.verified else ["build"])
                        + ([] if archs is None or archs.verified else ["archs"]),
                        "source": sorted(set(r.source + b.source)),
                    }
                )
        return rows

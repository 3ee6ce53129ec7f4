"""The compatibility matrix (facts) and the targets (choices), loaded and validated.

``data/matrix.toml`` (lockgen's package data) holds what is true about PyTorch releases
(their platforms and Python wheels, torchvision's), their CUDA builds, driver floors, GPU
architectures per build and channels; ``data/gpus.toml`` NVIDIA's GPU list (names, compute
capabilities, the drivers each GPU family needs); ``data/targets.toml`` names the
environments the project generates. All are read once, validated at the edge, and turned
into frozen dataclasses; the rest of lockgen never sees raw TOML.

Public API
----------
``load_matrix(path=None, targets=None, gpus=None) -> Matrix``
    Reads the matrix (default: ``$LOCKGEN_ENVS/matrix.toml`` when there is one, else
    lockgen's own ``data/matrix.toml``, installed with it), the targets file beside it (or
    ``targets``) and NVIDIA's GPU list ``gpus.toml`` beside it (or ``gpus``). A bad file
    raises :class:`MatrixError` naming the file, the entry and the problem.
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
``Target`` — what render / lock / verify / flake need, all resolved:
    ``name``, ``description``, ``torch``, ``torchvision``, ``python`` (the one Python of the
    conda env, uv project and Nix shell), ``pythons`` (every Python the pip and uv locks
    cover), ``cuda`` (Version or None for cpu), ``cudnn`` (Version or None), ``tag``
    (``cu121`` / ``cpu``), ``is_cpu``, ``release``, ``build``, ``platforms`` (conda subdirs),
    ``conda_channel`` (a Channel, ``conda-forge`` or ``pytorch``; None: no conda env),
    ``has_conda``, ``conda_channels`` (``("pytorch", "nvidia", "defaults")`` /
    ``("conda-forge",)``), ``conda_specs`` (match specs that pin the variant's build string,
    e.g. ``pytorch 2.5.1 *cuda12.1*``, ``pytorch-cuda 12.1.*``, ``pytorch 2.8.0 cuda129*``,
    ``cuda-version 12.9.*``), ``virtual_packages`` (``{platform: {"__cuda": "12.9",
    "__glibc": "2.28", ...}}``), ``pip_source`` (a PipSource: PyPI when its torch is this
    build on every platform of the target, else the wheel index folder), ``pip_index_url``
    (``https://download.pytorch.org/whl/cu121``), ``pip_requirements`` (``("torch==2.14.1",
    "torchvision==0.29.1")``), ``driver_floor`` (a DriverFloor: ``minimum`` = minor-version-
    compatibility floor, ``full`` = toolkit driver), ``arch_lists`` (per platform, an
    ArchList: ``archs`` as Capabilities, ``names`` like ``("7.5", ..., "12.0+PTX")``,
    ``torch_cuda_arch_list`` like ``"7.5;8.0;...;12.0+PTX"``; the wheels' list, else the
    conda channel's), ``arch_list`` (the first platform's), ``verified``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

from lockgen.errors import LockgenError
from lockgen.gpus import SEGMENTS, Architecture, Gpu, GpuList
from lockgen.versions import ALL, NONE, Capability, Driver, Version, cuda_tag, parse_cuda

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SCHEMA = 1
STATUSES = ("stable", "experimental")
OK, MVC, TOO_OLD = "ok", "minor-version-compat", "too-old"
CHANNEL_KINDS = ("pip", "conda")
PLATFORMS = ("linux-64", "linux-aarch64", "win-64", "osx-arm64", "osx-64")


class MatrixError(LockgenError):
    """A malformed or inconsistent matrix / targets file."""


DATA_DIR = Path(__file__).resolve().parent / "data"
"""lockgen's own facts, installed with it: matrix.toml, targets.toml, gpus.toml, nix.toml."""


def facts_dir() -> Path:
    """Where the facts are read from: ``$LOCKGEN_ENVS`` when it holds a ``matrix.toml``, else
    lockgen's own data (:data:`DATA_DIR`)."""
    env = os.environ.get("LOCKGEN_ENVS")
    if env and (Path(env) / "matrix.toml").is_file():
        return Path(env)
    return DATA_DIR


def default_envs_dir() -> Path:
    """Where generated environments are written and looked for: ``$LOCKGEN_ENVS`` if set,
    else ``envs/`` in the current folder (a checkout's root, or any project's)."""
    env = os.environ.get("LOCKGEN_ENVS")
    return Path(env) if env else Path("envs")


def envs_dir_of(matrix_path: Path) -> Path:
    """The generated environments that go with a matrix file: beside it, unless it is
    lockgen's own (then :func:`default_envs_dir`)."""
    folder = Path(matrix_path).resolve().parent
    return default_envs_dir() if folder == DATA_DIR else folder


def fact_label(path: Path) -> str:
    """How a generated file names a fact it came from: ``lockgen/data/matrix.toml`` for
    lockgen's own (its path inside the package, wherever that is installed), else the file's
    folder and name (``envs/matrix.toml``)."""
    path = Path(path)
    own = path.resolve().parent == DATA_DIR
    return f"lockgen/data/{path.name}" if own else f"{path.parent.name}/{path.name}"


# --------------------------------------------------------------------------------------------
# The data


@dataclass(frozen=True)
class Build:
    """One CUDA build of a release (``torch 2.1`` + CUDA 12.1 + cuDNN 8.9.2.26)."""

    cuda: Version
    cudnn: Version | None
    status: str
    source: tuple[str, ...]
    verified: bool
    note: str = ""
    cudnn_release_md: Version | None = None

    @property
    def tag(self) -> str:
        return cuda_tag(self.cuda)

    def cudnn_matches(self, cudnn: Version) -> bool:
        known = [c for c in (self.cudnn, self.cudnn_release_md) if c is not None]
        return any(k.matches_prefix(cudnn) for k in known)


@dataclass(frozen=True)
class Release:
    """A PyTorch minor release and everything shipped with it."""

    torch: Version
    torchvision: Version | None
    released: str
    python: tuple[Version, ...]
    python_experimental: tuple[Version, ...]
    pypi_default_cuda: Version
    pypi_default_cudnn: Version
    builds: tuple[Build, ...]
    source: tuple[str, ...]
    verified: bool
    unverified: tuple[str, ...] = ()
    note: str = ""
    platforms: tuple[str, ...] = ("linux-64",)
    python_platforms: Mapping[str, tuple[Version, ...]] = field(default_factory=dict)
    torchvision_python: tuple[Version, ...] = ()
    torchvision_python_platforms: Mapping[str, tuple[Version, ...]] = field(default_factory=dict)
    pypi_default_platforms: tuple[str, ...] = ("linux-64",)

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


@dataclass(frozen=True)
class CudaMajor:
    """Minor-version-compatibility driver floor of one CUDA major."""

    major: int
    linux_floor: Version
    windows_floor: Version | None
    source: tuple[str, ...]
    verified: bool
    note: str = ""


@dataclass(frozen=True)
class CudaToolkit:
    """The driver bundled with a CUDA toolkit (GA): the floor without minor-version compat."""

    version: Version
    linux: Version
    windows: Version | None
    source: tuple[str, ...]
    verified: bool
    note: str = ""


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
class ArchList:
    """The GPU architectures compiled into the builds of some releases on some platforms."""

    channel: str
    cuda: tuple[Version, ...]
    torch_min: Version
    torch_max: Version
    platforms: tuple[str, ...]
    archs: tuple[Capability, ...]
    source: tuple[str, ...]
    verified: bool
    note: str = ""

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
class Channel:
    """How to ask a package source for a build (pip index or conda channel)."""

    name: str
    kind: str
    source: tuple[str, ...]
    verified: bool
    note: str = ""
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


def conda_version_spec(version: Version) -> str:
    """``2.14.1`` → ``2.14.1``; a minor ``2.5`` → ``2.5.*``."""
    return version.raw if len(version.raw.split(".")) >= 3 else f"{version.raw}.*"


def pip_version_spec(version: Version) -> str:
    """``2.14.1`` → ``==2.14.1``; a minor ``2.5`` → ``==2.5.*``."""
    return "==" + conda_version_spec(version)


PYPI, WHEEL_INDEX = "pypi", "wheel-index"


@dataclass(frozen=True)
class PipSource:
    """Where a target's torch wheels come from: ``kind`` is :data:`PYPI` (PyPI's torch is the
    target's build on every platform of the target) or :data:`WHEEL_INDEX` (the PyTorch wheel
    index folder of the build)."""

    kind: str
    url: str
    why: str


@dataclass(frozen=True)
class Target:
    """A named environment the project generates, resolved against the matrix.

    ``python`` is the one Python of the single-interpreter environments (the conda env, the uv
    project's ``.python-version``, the Nix shell); ``pythons`` every Python the pip and uv locks
    cover (``python`` among them). ``conda_channel`` is None for a target no conda channel of
    the matrix supplies. ``arch_lists`` has one entry per platform.
    """

    name: str
    description: str
    torch: Version
    torchvision: Version
    python: Version
    cuda: Version | None
    release: Release
    build: Build | None
    conda_channel: Channel | None
    pip_channel: Channel
    platforms: tuple[str, ...]
    arch_lists: Mapping[str, ArchList]
    driver_floor: DriverFloor | None
    base_virtual_packages: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    pythons: tuple[Version, ...] = ()

    @property
    def arch_list(self) -> ArchList | None:
        """The arch list of the first platform (None for the CPU target)."""
        return self.arch_lists.get(self.platforms[0])

    @property
    def is_cpu(self) -> bool:
        return self.cuda is None

    @property
    def tag(self) -> str:
        return cuda_tag(self.cuda)

    @property
    def cudnn(self) -> Version | None:
        return self.build.cudnn if self.build else None

    @property
    def verified(self) -> bool:
        parts = [self.release.verified, self.pip_channel.verified]
        if self.conda_channel is not None:
            parts.append(self.conda_channel.verified)
        if self.build:
            parts.append(self.build.verified)
        parts += [a.verified for a in self.arch_lists.values()]
        if self.driver_floor:
            parts.append(self.driver_floor.verified)
        return all(parts)

    @property
    def pip_index_url(self) -> str:
        """The PyTorch wheel index folder of the target's build (``.../whl/cu126``)."""
        return self.pip_channel.wheel_index.format(tag=self.tag)

    @property
    def pip_source(self) -> PipSource:
        """PyPI when its torch is this build on every platform of the target (PyPI carries
        one CUDA build per release, ``pypi_default``), else the wheel index folder."""
        r = self.release
        if (
            self.cuda is not None
            and self.cuda == r.pypi_default_cuda
            and set(self.platforms) <= set(r.pypi_default_platforms)
        ):
            where = " and ".join(self.platforms)
            return PipSource(
                PYPI,
                self.pip_channel.index_url,
                f"PyPI's torch {r.torch} for {where} is the CUDA {self.cuda} build",
            )
        return PipSource(
            WHEEL_INDEX, self.pip_index_url, f"the PyTorch wheel index folder for {self.tag}"
        )

    @property
    def has_conda(self) -> bool:
        return self.conda_channel is not None

    @property
    def pip_requirements(self) -> tuple[str, ...]:
        return (
            f"torch{pip_version_spec(self.torch)}",
            f"torchvision{pip_version_spec(self.torchvision)}",
        )

    @property
    def conda_channels(self) -> tuple[str, ...]:
        return self.conda_channel.channels if self.conda_channel else ()

    @property
    def conda_specs(self) -> tuple[str, ...]:
        """Match specs (rattler / conda-lock syntax) that pin the build, not just the version;
        empty for a target without a conda channel."""
        ch = self.conda_channel
        if ch is None:
            return ()
        build, vision = ch.cpu_build, ""
        if self.cuda is not None:
            build = ch.cuda_glob(ch.cuda_build, self.cuda)
            if ch.torchvision_cuda_build:
                vision = " " + ch.cuda_glob(ch.torchvision_cuda_build, self.cuda)
        specs = [
            f"python {conda_version_spec(self.python)}",
            f"pytorch {conda_version_spec(self.torch)} {build}",
            f"torchvision {conda_version_spec(self.torchvision)}{vision}",
        ]
        if self.cuda is not None:
            specs.append(f"{ch.cuda_metapackage} {self.cuda.raw}.*")
        elif ch.cpu_metapackage:
            specs.append(ch.cpu_metapackage)
        return tuple(specs)

    @property
    def virtual_packages(self) -> dict[str, dict[str, str]]:
        """Per platform, the virtual packages a solve for this target assumes."""
        out: dict[str, dict[str, str]] = {}
        for platform in self.platforms:
            vp = dict(self.base_virtual_packages.get(platform, {}))
            if self.cuda is not None:
                vp["__cuda"] = self.cuda.raw
            out[platform] = vp
        return out

    def pip_install_command(self) -> str:
        reqs = " ".join(f'"{r}"' if "*" in r else r for r in self.pip_requirements)
        return f"pip install {reqs} --index-url {self.pip_index_url}"

    @property
    def python_range(self) -> str:
        """``3.10-3.14`` (or ``3.11``): the Pythons the locks cover."""
        ps = sorted(self.pythons)
        return ps[0].raw if len(ps) == 1 else f"{ps[0].raw}-{ps[-1].raw}"

    def summary(self) -> str:
        cuda = f"CUDA {self.cuda} + cuDNN {self.cudnn or '?'}" if self.cuda else "CPU"
        return (
            f"{self.name}: torch {self.torch} + torchvision {self.torchvision} + "
            f"Python {self.python} + {cuda}"
        )


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
            return ArchList(
                channel,
                a.cuda,
                a.torch_min,
                a.torch_max,
                a.platforms,
                a.archs,
                a.source,
                False,
                note,
            )
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


# --------------------------------------------------------------------------------------------
# Loading and validation


class _Entry:
    """Reads one TOML table with type checks; every error names file, entry and problem."""

    def __init__(self, file: Path, label: str, data: object):
        self.file, self.label = file, label
        if not isinstance(data, dict):
            self.fail(f"expected a table, got {type(data).__name__}")
        self.data: dict[str, Any] = dict(data)  # type: ignore[arg-type]
        self.seen: set[str] = set()

    def fail(self, problem: str) -> NoReturn:
        raise MatrixError(f"{self.file}: {self.label}: {problem}")

    def _get(self, key: str, required: bool) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if required:
                self.fail(f"missing key {key!r}")
            return None
        return self.data[key]

    def text(self, key: str, required: bool = True, default: str = "") -> str:
        v = self._get(key, required)
        if v is None:
            return default
        if not isinstance(v, str):
            self.fail(f"{key!r} must be a string, got {v!r}")
        return v

    def flag(self, key: str) -> bool:
        v = self._get(key, True)
        if not isinstance(v, bool):
            self.fail(f"{key!r} must be true or false, got {v!r}")
        return v

    def integer(self, key: str) -> int:
        v = self._get(key, True)
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(f"{key!r} must be an integer, got {v!r}")
        return v

    def strs(self, key: str, required: bool = True) -> tuple[str, ...]:
        v = self._get(key, required)
        if v is None:
            return ()
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            self.fail(f"{key!r} must be a string or a list of strings, got {v!r}")
        return tuple(v)

    def version(self, key: str, required: bool = True) -> Version | None:
        v = self._get(key, required)
        if v is None or v == "":
            if required:
                self.fail(f"{key!r} must not be empty")
            return None
        return self.as_version(v, key)

    def versions(self, key: str, required: bool = True) -> tuple[Version, ...]:
        return tuple(self.as_version(x, key) for x in self.strs(key, required))

    def as_version(self, v: object, key: str) -> Version:
        if not isinstance(v, str):
            self.fail(f'{key!r} must be a version string like "2.1", got {v!r}')
        try:
            parsed = Version.parse(v)
        except LockgenError:
            self.fail(f"bad version {v!r} in {key!r}")
        if parsed.local:
            self.fail(f"bad version {v!r} in {key!r}: no local '+' part allowed here")
        return parsed

    def platform_versions(self, key: str) -> dict[str, tuple[Version, ...]]:
        """An optional ``{platform = ["3.10", ...]}`` table."""
        out: dict[str, tuple[Version, ...]] = {}
        for platform, raw in self.table(key, required=False).items():
            if platform not in PLATFORMS:
                self.fail(f"{key}: unknown platform {platform!r} (known: {', '.join(PLATFORMS)})")
            if not isinstance(raw, list) or not raw:
                self.fail(f"{key}.{platform} must be a non-empty list of versions")
            out[platform] = tuple(self.as_version(x, f"{key}.{platform}") for x in raw)
        return out

    def table(self, key: str, required: bool = True) -> dict[str, Any]:
        v = self._get(key, required)
        if v is None:
            return {}
        if not isinstance(v, dict):
            self.fail(f"{key!r} must be a table")
        return v

    def tables(self, key: str) -> list[Any]:
        v = self._get(key, False)
        if v is None:
            return []
        if not isinstance(v, list):
            self.fail(f"{key!r} must be an array of tables ([[{key}]])")
        return v

    def provenance(self, sources: Mapping[str, str]) -> tuple[tuple[str, ...], bool, str]:
        src = self.strs("source")
        if not src:
            self.fail("'source' must name at least one source")
        for s in src:
            if s not in sources:
                self.fail(f"unknown source {s!r} (define it in [sources])")
        return src, self.flag("verified"), self.text("note", required=False)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            self.fail(
                f"unknown key {unknown[0]!r}"
                + (f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else "")
            )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise MatrixError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise MatrixError(f"{path}: is a folder, not a TOML file") from None
    except OSError as exc:
        raise MatrixError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise MatrixError(f"{path}: not UTF-8 text: {exc}") from None
    except RecursionError:
        raise MatrixError(f"{path}: not valid TOML: nested too deeply") from None
    except tomllib.TOMLDecodeError as exc:
        raise MatrixError(f"{path}: not valid TOML: {exc}") from None


def _expected_torchvision(torch: Version) -> Version | None:
    """The pairing every release of the matrix follows: 1.N → 0.(N+1), 2.N → 0.(N+15)."""
    major, minor = torch.minor.padded(2)
    if major == 1:
        return Version((0, minor + 1), f"0.{minor + 1}")
    if major == 2:
        return Version((0, minor + 15), f"0.{minor + 15}")
    return None


def _check_top(top: _Entry, allowed: Iterable[str] = ("schema",)) -> None:
    for key in allowed:
        top.seen.add(key)
    schema = top.data.get("schema")
    if schema != SCHEMA:
        top.fail(f"'schema' must be {SCHEMA}, got {schema!r}")
    top.done()


def _load_release(file: Path, raw: object, sources: Mapping[str, str]) -> Release:
    label = "release"
    if isinstance(raw, dict) and isinstance(raw.get("torch"), str):
        label = f"release {raw['torch']}"
    e = _Entry(file, label, raw)
    torch = e.version("torch")
    assert torch is not None
    if len(torch.raw.split(".")) != 2:
        e.fail(f"'torch' must be a minor release like \"2.1\", got {torch.raw!r}")
    unverified = e.strs("unverified", required=False)
    torchvision = e.version("torchvision", required="torchvision" not in unverified)
    if torchvision is not None:
        expected = _expected_torchvision(torch)
        if expected is not None and torchvision.minor != expected:
            e.fail(f"torchvision {torchvision} does not match torch {torch} (expected {expected})")
    released = e.text("released")
    python = e.versions("python")
    if not python:
        e.fail("'python' must list at least one version")
    python_exp = e.versions("python_experimental", required=False)
    for p in python_exp:
        if p not in python:
            e.fail(f"python_experimental {p} is not in 'python'")
    platforms = e.strs("platforms")
    for p in platforms:
        if p not in PLATFORMS:
            e.fail(f"unknown platform {p!r} (known: {', '.join(PLATFORMS)})")
    if "linux-64" not in platforms:
        e.fail("'platforms' must include linux-64 (the builds and 'python' are linux-64's)")
    python_platforms = e.platform_versions("python_platforms")
    tv_python = e.versions("torchvision_python", required=torchvision is not None)
    tv_python_platforms = e.platform_versions("torchvision_python_platforms")
    for key, table in (
        ("python_platforms", python_platforms),
        ("torchvision_python_platforms", tv_python_platforms),
    ):
        for p in table:
            if p == "linux-64" or p not in platforms:
                e.fail(f"{key}: {p} is linux-64 or not one of 'platforms'")
    pd = _Entry(file, f"{label} pypi_default", e.table("pypi_default"))
    pd_cuda, pd_cudnn = pd.version("cuda"), pd.version("cudnn")
    pd_platforms = pd.strs("platforms", required=False) or ("linux-64",)
    pd.done()
    for p in pd_platforms:
        if p not in platforms:
            pd.fail(f"platform {p!r} is not one of the release's 'platforms'")
    builds: list[Build] = []
    for i, b in enumerate(e.tables("build")):
        blabel = f"{label} build #{i + 1}"
        if isinstance(b, dict) and isinstance(b.get("cuda"), str):
            blabel = f"{label} build {b['cuda']}"
        be = _Entry(file, blabel, b)
        cuda = be.version("cuda")
        assert cuda is not None
        status = be.text("status")
        if status not in STATUSES:
            be.fail(f"'status' must be one of {', '.join(STATUSES)}, got {status!r}")
        src, verified, note = be.provenance(sources)
        cudnn = be.version("cudnn", required=verified)
        cudnn_md = be.version("cudnn_release_md", required=False)
        be.done()
        if any(x.cuda == cuda for x in builds):
            be.fail(f"duplicate build for CUDA {cuda}")
        builds.append(Build(cuda, cudnn, status, src, verified, note, cudnn_md))
    if not builds:
        e.fail("no CUDA builds ([[release.build]])")
    default = next((b for b in builds if b.cuda == pd_cuda), None)
    if default is None:
        e.fail(
            f"pypi_default CUDA {pd_cuda} is not one of its builds "
            f"({', '.join(b.cuda.raw for b in builds)})"
        )
    elif default.cudnn is not None and default.cudnn != pd_cudnn:
        e.fail(
            f"pypi_default cuDNN {pd_cudnn} differs from build {pd_cuda}'s cuDNN {default.cudnn}"
        )
    src, verified, note = e.provenance(sources)
    if unverified and verified:
        e.fail("'verified' is true but 'unverified' lists fields")
    e.done()
    assert pd_cuda is not None and pd_cudnn is not None
    return Release(
        torch,
        torchvision,
        released,
        python,
        python_exp,
        pd_cuda,
        pd_cudnn,
        tuple(builds),
        src,
        verified,
        unverified,
        note,
        tuple(platforms),
        python_platforms,
        tv_python,
        tv_python_platforms,
        tuple(pd_platforms),
    )


def _load_matrix_data(file: Path, data: dict[str, Any]) -> Matrix:
    top = _Entry(file, "top level", data)
    src_table = top.table("sources")
    sources: dict[str, str] = {}
    for k, v in src_table.items():
        if not isinstance(v, str) or not v:
            top.fail(f"source {k!r} must be a non-empty string")
        sources[k] = v

    releases = [_load_release(file, r, sources) for r in top.tables("release")]
    if not releases:
        top.fail("no [[release]] entries")
    seen: set[Version] = set()
    for r in releases:
        if r.torch in seen:
            raise MatrixError(f"{file}: release {r.torch}: duplicate release")
        seen.add(r.torch)
    releases.sort(key=lambda r: r.torch)

    majors: list[CudaMajor] = []
    for raw in top.tables("cuda_major"):
        label = f"cuda_major {raw.get('major', '?')}" if isinstance(raw, dict) else "cuda_major"
        e = _Entry(file, label, raw)
        major = e.integer("major")
        linux = e.version("linux_floor")
        windows = e.version("windows_floor", required=False)
        src, verified, note = e.provenance(sources)
        e.done()
        if any(m.major == major for m in majors):
            e.fail("duplicate entry")
        assert linux is not None
        majors.append(CudaMajor(major, linux, windows, src, verified, note))

    toolkits: list[CudaToolkit] = []
    for raw in top.tables("cuda"):
        label = f"cuda {raw.get('version', '?')}" if isinstance(raw, dict) else "cuda"
        e = _Entry(file, label, raw)
        version = e.version("version")
        linux = e.version("linux")
        windows = e.version("windows", required=False)
        src, verified, note = e.provenance(sources)
        e.done()
        assert version is not None and linux is not None
        if any(t.version == version for t in toolkits):
            e.fail("duplicate entry")
        major = next((m for m in majors if m.major == version.major), None)
        if major is None:
            e.fail(f"no [[cuda_major]] entry for CUDA {version.major}")
        elif linux < major.linux_floor:
            e.fail(
                f"toolkit driver {linux} is below the CUDA {version.major} floor "
                f"{major.linux_floor}"
            )
        toolkits.append(CudaToolkit(version, linux, windows, src, verified, note))
    toolkits.sort(key=lambda t: t.version)

    for r in releases:
        for b in r.builds:
            if not any(t.version == b.cuda for t in toolkits):
                raise MatrixError(
                    f"{file}: release {r.torch} build {b.cuda}: no [[cuda]] "
                    f"entry gives the driver for CUDA {b.cuda}"
                )

    channels: dict[str, Channel] = {}
    for name, raw in top.table("channel").items():
        e = _Entry(file, f"channel.{name}", raw)
        kind = e.text("kind")
        if kind not in CHANNEL_KINDS:
            e.fail(f"'kind' must be one of {', '.join(CHANNEL_KINDS)}, got {kind!r}")
        src, verified, note = e.provenance(sources)
        ch = Channel(
            name,
            kind,
            src,
            verified,
            note,
            index_url=e.text("index_url", required=kind == "pip"),
            wheel_index=e.text("wheel_index", required=kind == "pip"),
            channels=e.strs("channels", required=kind == "conda"),
            torch_max=e.version("torch_max", required=False),
            cuda_metapackage=e.text("cuda_metapackage", required=kind == "conda"),
            cuda_metapackage_versions=e.versions("cuda_metapackage_versions", required=False),
            cuda_build=e.text("cuda_build", required=kind == "conda"),
            torchvision_cuda_build=e.text("torchvision_cuda_build", required=False),
            cpu_build=e.text("cpu_build", required=kind == "conda"),
            cpu_metapackage=e.text("cpu_metapackage", required=False),
        )
        e.done()
        if kind == "pip" and "{tag}" not in ch.wheel_index:
            e.fail("'wheel_index' must contain {tag}")
        for key in ("cuda_build", "torchvision_cuda_build"):
            try:
                ch.cuda_glob(getattr(ch, key), Version.parse("12.1"))
            except (KeyError, IndexError, ValueError):
                e.fail(f"{key!r} may use only the placeholders {{cuda}} and {{nodot}}")
        channels[name] = ch
    if "pip" not in channels:
        top.fail("no [channel.pip] entry")

    arch_lists: list[ArchList] = []
    cuda_known = {b.cuda for r in releases for b in r.builds}
    for i, raw in enumerate(top.tables("archs")):
        e = _Entry(file, f"archs #{i + 1}", raw)
        channel = e.text("channel")
        if channel not in channels:
            e.fail(f"unknown channel {channel!r}")
        cudas = e.versions("cuda")
        for c in cudas:
            if c not in cuda_known:
                e.fail(f"CUDA {c} is not a build of any release")
        tmin, tmax = e.version("torch_min"), e.version("torch_max")
        assert tmin is not None and tmax is not None
        for t in (tmin, tmax):
            if t not in seen:
                e.fail(f"torch {t} is not a release of the matrix")
        if tmin > tmax:
            e.fail(f"torch_min {tmin} is after torch_max {tmax}")
        platforms = e.strs("platforms")
        for p in platforms:
            if p not in PLATFORMS:
                e.fail(f"unknown platform {p!r} (known: {', '.join(PLATFORMS)})")
        archs_raw = e.strs("archs")
        if not archs_raw:
            e.fail("'archs' is empty")
        try:
            archs = tuple(Capability.parse_arch(a) for a in archs_raw)
        except LockgenError as exc:
            e.fail(str(exc))
        if any(a.ptx for a in archs[:-1]):
            e.fail("only the last arch may carry +PTX")
        src, verified, note = e.provenance(sources)
        e.done()
        row = ArchList(channel, cudas, tmin, tmax, tuple(platforms), archs, src, verified, note)
        _check_arch_overlap(e, row, arch_lists, releases)
        arch_lists.append(row)

    vps: dict[str, dict[str, str]] = {}
    for platform, raw in top.table("virtual_packages", required=False).items():
        e = _Entry(file, f"virtual_packages.{platform}", raw)
        if platform not in PLATFORMS:
            e.fail(f"unknown platform {platform!r}")
        pkgs = {}
        for k in list(e.data):
            if k.startswith("__"):
                pkgs[k] = e.text(k)
        e.provenance(sources)
        e.done()
        vps[platform] = pkgs

    _check_top(top)
    return Matrix(
        file,
        sources,
        tuple(releases),
        tuple(majors),
        tuple(toolkits),
        tuple(arch_lists),
        channels,
        vps,
    )


def _check_arch_overlap(
    e: _Entry, row: ArchList, earlier: list[ArchList], releases: list[Release]
) -> None:
    """Two [[archs]] rows must not both give the arch list of one channel, torch release,
    CUDA version and platform: which one holds would depend on the order of the file."""
    for i, other in enumerate(earlier):
        if other.channel != row.channel:
            continue
        for r in releases:
            for cuda in row.cuda:
                for platform in row.platforms:
                    if row.covers(r.torch, cuda, platform) and other.covers(
                        r.torch, cuda, platform
                    ):
                        e.fail(
                            f"gives the arch list of {row.channel} torch {r.torch} + CUDA {cuda} "
                            f"on {platform}, which archs #{i + 1} gives already"
                        )


def _capability(e: _Entry, text: str) -> Capability:
    try:
        return Capability.parse(text)
    except LockgenError as exc:
        e.fail(str(exc))


def _load_gpus(file: Path, data: dict[str, Any], m: Matrix) -> GpuList:
    """``gpus.toml``: NVIDIA's table rows ([[capability]]) and the GPU families'
    driver facts ([[architecture]])."""
    top = _Entry(file, "top level", data)
    sources: dict[str, str] = {}
    for k, v in top.table("sources").items():
        if not isinstance(v, str) or not v:
            top.fail(f"source {k!r} must be a non-empty string")
        sources[k] = v
    gpus: dict[tuple[str, ...], Gpu] = {}
    for i, raw in enumerate(top.tables("capability")):
        label = (
            f"capability {raw.get('capability', '#' + str(i + 1))}"
            if isinstance(raw, dict)
            else f"capability #{i + 1}"
        )
        e = _Entry(file, label, raw)
        cap = _capability(e, e.text("capability"))
        names = {seg: e.strs(seg, required=False) for seg in SEGMENTS}
        src, verified, _ = e.provenance(sources)
        e.done()
        if not any(names.values()):
            e.fail(f"names no GPU (give one of {', '.join(SEGMENTS)})")
        for seg, seg_names in names.items():
            for name in seg_names:
                gpu = Gpu(name, cap, seg, src, verified)
                if not gpu.key:
                    e.fail(f"GPU name {name!r} has no letters or digits")
                if gpu.key in gpus:
                    e.fail(f"GPU {name!r} is listed twice (also as {gpus[gpu.key].label})")
                gpus[gpu.key] = gpu
    archs: list[Architecture] = []
    for i, raw in enumerate(top.tables("architecture")):
        e = _Entry(file, f"architecture #{i + 1}", raw)
        name = e.text("name")
        caps = tuple(_capability(e, c) for c in e.strs("capabilities"))
        first = e.version("first_cuda", required=False)
        last = e.version("last_driver", required=False)
        src, verified, _ = e.provenance(sources)
        e.done()
        if not caps:
            e.fail("'capabilities' is empty")
        if first is None and last is None:
            e.fail("gives neither 'first_cuda' nor 'last_driver'")
        if first is not None and m.cuda_toolkit(first) is None:
            e.fail(f"first_cuda {first}: no [[cuda]] entry of the matrix gives its driver")
        for c in caps:
            if any(a.covers(c) for a in archs):
                e.fail(f"capability {c} is already in another [[architecture]]")
        archs.append(Architecture(name, caps, first, last, src, verified))
    _check_top(top)
    return GpuList(tuple(gpus.values()), tuple(archs))


def _load_targets(file: Path, data: dict[str, Any], m: Matrix) -> dict[str, Target]:
    top = _Entry(file, "top level", data)
    table = top.table("target")
    _check_top(top)
    if not table:
        raise MatrixError(f"{file}: top level: no [target.*] entries")
    targets: dict[str, Target] = {}
    for name, raw in table.items():
        e = _Entry(file, f"target {name!r}", raw)
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
            e.fail("target names are lower-case letters, digits, '-' and '_'")
        description = e.text("description", required=False)
        torch = e.version("torch")
        torchvision = e.version("torchvision")
        python = e.version("python")
        assert torch is not None and torchvision is not None and python is not None
        cuda_text = e.text("cuda")
        try:
            cuda = parse_cuda(cuda_text)
        except LockgenError as exc:
            e.fail(str(exc))
        release = m.find_release(torch)
        if release is None:
            e.fail(f"torch {torch} resolves to no release of the matrix")
        if release.torchvision is None:
            e.fail(f"torch {release.torch} has no verified torchvision in the matrix")
        elif torchvision.minor != release.torchvision:
            e.fail(
                f"torchvision {torchvision} does not match torch {torch} "
                f"(the matrix pairs it with {release.torchvision})"
            )
        pythons = e.versions("pythons", required=False) or (python,)
        if python not in pythons:
            e.fail(f"python {python} is not one of its 'pythons'")
        build = None
        if cuda is not None:
            build = release.build(cuda)
            if build is None:
                e.fail(
                    f"torch {release.torch} has no CUDA {cuda} build "
                    f"(builds: {', '.join(c.raw for c in release.cuda_versions)})"
                )
            assert build is not None
            if not build.verified:
                e.fail(f"the CUDA {cuda} build of torch {release.torch} is not verified")
        cudnn = e.version("cudnn", required=False)
        if cudnn is not None:
            if build is None:
                e.fail("a CPU target has no cuDNN")
            elif not build.cudnn_matches(cudnn):
                e.fail(
                    f"cuDNN {cudnn} does not match the matrix (torch {release.torch} + "
                    f"CUDA {cuda} ships cuDNN {build.cudnn})"
                )
        channel = _target_conda_channel(e, m, release, cuda)
        platforms = e.strs("platforms")
        if not platforms:
            e.fail("'platforms' is empty")
        for p in platforms:
            if p not in PLATFORMS:
                e.fail(f"unknown platform {p!r} (known: {', '.join(PLATFORMS)})")
            missing = [v.raw for v in pythons if not release.pairs_python(v, p)]
            if missing:
                e.fail(
                    f"torch {release.torch} + torchvision {release.torchvision} have no {p} "
                    f"wheels for Python {', '.join(missing)} (torch: "
                    f"{', '.join(v.raw for v in release.python_for(p)) or 'none'}; torchvision: "
                    f"{', '.join(v.raw for v in release.torchvision_python_for(p)) or 'none'})"
                )
        e.done()
        arch_lists: dict[str, ArchList] = {}
        floor = None
        if cuda is not None:
            for p in platforms:
                arch_lists[p] = _target_arch_list(e, m, release, cuda, p, channel)
            floor = m.driver_floor(cuda)
            if floor is None:
                e.fail(f"no driver floor in the matrix for CUDA {cuda}")
        targets[name] = Target(
            name,
            description,
            torch,
            torchvision,
            python,
            cuda,
            release,
            build,
            channel,
            m.channels["pip"],
            tuple(platforms),
            arch_lists,
            floor,
            m.virtual_packages,
            tuple(pythons),
        )
    return targets


def _target_conda_channel(
    e: _Entry, m: Matrix, release: Release, cuda: Version | None
) -> Channel | None:
    """The target's conda channel (None when it names none), checked against the channel's
    own limits; whether it builds the CUDA variant is render's question (its facts may be
    missing, which only ``--allow-unverified`` accepts)."""
    ch_name = e.text("conda_channel", required=False)
    if not ch_name:
        return None
    if ch_name not in m.channels or m.channels[ch_name].kind != "conda":
        conda = ", ".join(n for n, c in m.channels.items() if c.kind == "conda")
        e.fail(f"conda_channel {ch_name!r} is not a conda channel of the matrix (known: {conda})")
    channel = m.channels[ch_name]
    if channel.torch_max is not None and release.torch > channel.torch_max:
        e.fail(f"channel {ch_name!r} has no torch after {channel.torch_max}")
    if (
        cuda is not None
        and channel.cuda_metapackage_versions
        and cuda not in channel.cuda_metapackage_versions
    ):
        e.fail(f"channel {ch_name!r} has no {channel.cuda_metapackage} {cuda}")
    return channel


def _target_arch_list(
    e: _Entry,
    m: Matrix,
    release: Release,
    cuda: Version,
    platform: str,
    channel: Channel | None,
) -> ArchList:
    """The arch list of the wheels (what pip, uv and the Nix shell install), else of the
    target's conda channel, else another channel's (then unverified)."""
    for ch in ("pip", channel.name if channel else None):
        exact = next(
            (
                a
                for a in m.arch_lists
                if a.channel == ch and a.covers(release.torch, cuda, platform)
            ),
            None,
        )
        if exact is not None:
            return exact
    found = m.arch_list(release.torch, cuda, platform, "pip")
    if found is None:
        e.fail(f"no arch list in the matrix for torch {release.torch} + CUDA {cuda} on {platform}")
    return found


def _beside(file: Path, given: str | Path | bool | None, name: str) -> Path | None:
    """The companion file to load: ``given`` if a path, else ``name`` beside the matrix when
    it exists (``False``: none)."""
    if given is False:
        return None
    if isinstance(given, (str, Path)):
        return Path(given)
    candidate = file.with_name(name)
    return candidate if candidate.exists() else None


def load_matrix(
    path: str | Path | None = None,
    targets: str | Path | bool | None = None,
    gpus: str | Path | bool | None = None,
) -> Matrix:
    """Load and validate the matrix, its targets and the GPU list.

    ``targets`` / ``gpus``: a path; ``None`` for ``targets.toml`` / ``gpus.toml`` beside the
    matrix when it exists; ``False`` to load none.
    """
    file = Path(path) if path is not None else facts_dir() / "matrix.toml"
    m = _load_matrix_data(file, _read_toml(file))
    gfile = _beside(file, gpus, "gpus.toml")
    if gfile is not None:
        m = replace(m, gpus=_load_gpus(gfile, _read_toml(gfile), m), gpus_path=gfile)
    tfile = _beside(file, targets, "targets.toml")
    if tfile is None:
        return m
    return replace(m, targets=_load_targets(tfile, _read_toml(tfile), m), targets_path=tfile)

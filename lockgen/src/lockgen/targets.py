"""The targets: the named environments the project generates (``targets.toml``), each
resolved against the matrix into a :class:`Target` that render, lock, verify and flake read
(its build, channels, arch lists, driver floor, specs and requirements).

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
    conda channel's), ``arch_list`` (the first platform's), ``verified``; for an LLM stack
    target, ``stack`` (its exact pins beside torch: ``("transformers==5.25.0", ...)``, part of
    ``pip_requirements``), ``is_stack`` and ``glibc`` (the oldest glibc its wheels need, when
    above the matrix's ``__glibc``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lockgen.matrix import ArchList, Build, Channel, DriverFloor, Release
from lockgen.versions import Version, cuda_tag


def conda_version_spec(version: Version) -> str:
    """``2.14.1`` → ``2.14.1``; a minor ``2.5`` → ``2.5.*``."""
    return version.raw if len(version.raw.split(".")) >= 3 else f"{version.raw}.*"


def pip_version_spec(version: Version) -> str:
    """``2.14.1`` → ``==2.14.1``; a minor ``2.5`` → ``==2.5.*``."""
    return "==" + conda_version_spec(version)


PYPI, WHEEL_INDEX = "pypi", "wheel-index"

# Why an LLM stack target has no conda environment and no Nix shell: what lockgen promises
# about a stack is that every compiled package links torch's CUDA major, and its facts
# (lockgen/data/stack*.toml) describe PyPI's files (and some PyTorch index and GitHub builds),
# no conda channel's and no nixpkgs' builds of the stack.
STACK_NO_CONDA = (
    "the stack facts (lockgen/data/stack*.toml) record no conda channel's builds of the "
    "stack's packages nor the CUDA major they link, so lockgen cannot promise they match "
    "torch's; install the pip or uv lock"
)
STACK_NO_NIX = (
    "nixpkgs' builds of the stack's packages and the CUDA major they link are not in the "
    "facts (lockgen/data/nix.toml pins nixpkgs for the CUDA toolchain and Python only), so "
    "lockgen cannot promise they match torch's; install the pip or uv lock"
)


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
    stack: tuple[str, ...] = ()  # an LLM stack target: its exact pins beside torch
    glibc: str | None = None  # the oldest glibc its wheels need, when above the matrix's
    prereleases: tuple[str, ...] = ()  # packages its locks may pin at a pre-release

    @property
    def is_stack(self) -> bool:
        """An LLM fine-tuning stack target: torch, torchvision and the pins in ``stack``."""
        return bool(self.stack)

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
            *self.stack,
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
            if self.glibc is not None:
                vp["__glibc"] = self.glibc
            if self.cuda is not None:
                vp["__cuda"] = self.cuda.raw
            out[platform] = vp
        return out

    @property
    def pip_shell_words(self) -> str:
        """``pip_requirements`` as shell words (quoted where a shell would glob them)."""
        return " ".join(f'"{r}"' if set("*[") & set(r) else r for r in self.pip_requirements)

    def pip_install_command(self) -> str:
        return f"pip install {self.pip_shell_words} --index-url {self.pip_index_url}"

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

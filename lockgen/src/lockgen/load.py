"""Reading the facts: where they are (lockgen's own package data, or ``$LOCKGEN_ENVS`` /
``--matrix``), where the generated environments go, and one loader per TOML table of
``matrix.toml``, ``gpus.toml`` and ``targets.toml``, which validate at the edge and build the
frozen dataclasses of :mod:`lockgen.matrix` and :mod:`lockgen.targets`.

``load_matrix(path=None, targets=None, gpus=None) -> Matrix``
    Reads the matrix (default: ``$LOCKGEN_ENVS/matrix.toml`` when there is one, else
    lockgen's own ``data/matrix.toml``, installed with it), the targets file beside it (or
    ``targets``) and NVIDIA's GPU list ``gpus.toml`` beside it (or ``gpus``). A bad file
    raises :class:`~lockgen.errors.MatrixError` naming the file, the entry and the problem.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from lockgen.errors import LockgenError, MatrixError
from lockgen.gpus import SEGMENTS, Architecture, Gpu, GpuList
from lockgen.index import canonical_name
from lockgen.matrix import (
    CHANNEL_KINDS,
    PLATFORMS,
    STATUSES,
    ArchList,
    Build,
    Channel,
    CudaMajor,
    CudaToolkit,
    Matrix,
    Release,
)
from lockgen.tables import Table, check_top, read_toml
from lockgen.targets import PYPI, STACK_NO_CONDA, Target
from lockgen.versions import Capability, Version, parse_cuda

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


def _expected_torchvision(torch: Version) -> Version | None:
    """The pairing every release of the matrix follows: 1.N → 0.(N+1), 2.N → 0.(N+15)."""
    major, minor = torch.minor.padded(2)
    if major == 1:
        return Version((0, minor + 1), f"0.{minor + 1}")
    if major == 2:
        return Version((0, minor + 15), f"0.{minor + 15}")
    return None


def _load_release(file: Path, raw: object, sources: Mapping[str, str]) -> Release:
    label = "release"
    if isinstance(raw, dict) and isinstance(raw.get("torch"), str):
        label = f"release {raw['torch']}"
    e = Table(file, label, raw)
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
    patches = e.versions("patches", required=False)
    for v in patches:
        if v.minor != torch or v.raw.count(".") != 2:
            e.fail(f"patches: {v} is not a patch release of torch {torch}")
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
    pd = Table(file, f"{label} pypi_default", e.table("pypi_default"))
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
        be = Table(file, blabel, b)
        cuda = be.version("cuda")
        assert cuda is not None
        status = be.text("status")
        if status not in STATUSES:
            be.fail(f"'status' must be one of {', '.join(STATUSES)}, got {status!r}")
        prov = be.provenance(sources)
        cudnn = be.version("cudnn", required=prov.verified)
        cudnn_md = be.version("cudnn_release_md", required=False)
        be.done()
        if any(x.cuda == cuda for x in builds):
            be.fail(f"duplicate build for CUDA {cuda}")
        builds.append(
            Build(cuda=cuda, cudnn=cudnn, status=status, provenance=prov, cudnn_release_md=cudnn_md)
        )
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
    prov = e.provenance(sources)
    if unverified and prov.verified:
        e.fail("'verified' is true but 'unverified' lists fields")
    e.done()
    assert pd_cuda is not None and pd_cudnn is not None
    return Release(
        torch=torch,
        torchvision=torchvision,
        released=released,
        python=python,
        python_experimental=python_exp,
        pypi_default_cuda=pd_cuda,
        pypi_default_cudnn=pd_cudnn,
        builds=tuple(builds),
        provenance=prov,
        unverified=unverified,
        platforms=tuple(platforms),
        python_platforms=python_platforms,
        torchvision_python=tv_python,
        torchvision_python_platforms=tv_python_platforms,
        pypi_default_platforms=tuple(pd_platforms),
        patches=patches,
    )


def _load_matrix_data(file: Path, data: dict[str, Any]) -> Matrix:
    """``matrix.toml``: one loader per table, each checking what it refers to."""
    top = Table(file, "top level", data)
    sources = _load_sources(top)
    releases = _load_releases(file, top, sources)
    majors = _load_cuda_majors(file, top, sources)
    toolkits = _load_cuda_toolkits(file, top, sources, majors, releases)
    channels = _load_channels(file, top, sources)
    arch_lists = _load_arch_lists(file, top, sources, channels, releases)
    virtual_packages = _load_virtual_packages(file, top, sources)
    check_top(top)
    return Matrix(
        path=file,
        sources=sources,
        releases=tuple(releases),
        cuda_majors=tuple(majors),
        cuda_toolkits=tuple(toolkits),
        arch_lists=tuple(arch_lists),
        channels=channels,
        virtual_packages=virtual_packages,
    )


def _load_sources(top: Table) -> dict[str, str]:
    """``[sources]``: the name of each source and where it is."""
    src_table = top.table("sources")
    sources: dict[str, str] = {}
    for k, v in src_table.items():
        if not isinstance(v, str) or not v:
            top.fail(f"source {k!r} must be a non-empty string")
        sources[k] = v
    return sources


def _load_releases(file: Path, top: Table, sources: Mapping[str, str]) -> list[Release]:
    """``[[release]]``, oldest first, no torch twice."""
    releases = [_load_release(file, r, sources) for r in top.tables("release")]
    if not releases:
        top.fail("no [[release]] entries")
    seen: set[Version] = set()
    for r in releases:
        if r.torch in seen:
            raise MatrixError(f"{file}: release {r.torch}: duplicate release")
        seen.add(r.torch)
    releases.sort(key=lambda r: r.torch)
    return releases


def _load_cuda_majors(file: Path, top: Table, sources: Mapping[str, str]) -> list[CudaMajor]:
    """``[[cuda_major]]``: the driver floor of each CUDA major version."""
    majors: list[CudaMajor] = []
    for raw in top.tables("cuda_major"):
        label = f"cuda_major {raw.get('major', '?')}" if isinstance(raw, dict) else "cuda_major"
        e = Table(file, label, raw)
        major = e.integer("major")
        linux = e.version("linux_floor")
        windows = e.version("windows_floor", required=False)
        prov = e.provenance(sources)
        e.done()
        if any(m.major == major for m in majors):
            e.fail("duplicate entry")
        assert linux is not None
        majors.append(
            CudaMajor(major=major, linux_floor=linux, windows_floor=windows, provenance=prov)
        )
    return majors


def _load_cuda_toolkits(
    file: Path,
    top: Table,
    sources: Mapping[str, str],
    majors: list[CudaMajor],
    releases: list[Release],
) -> list[CudaToolkit]:
    """``[[cuda]]``: each toolkit's driver, at or above its major's floor; every build of a
    release needs one."""
    toolkits: list[CudaToolkit] = []
    for raw in top.tables("cuda"):
        label = f"cuda {raw.get('version', '?')}" if isinstance(raw, dict) else "cuda"
        e = Table(file, label, raw)
        version = e.version("version")
        linux = e.version("linux")
        windows = e.version("windows", required=False)
        prov = e.provenance(sources)
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
        toolkits.append(CudaToolkit(version=version, linux=linux, windows=windows, provenance=prov))
    toolkits.sort(key=lambda t: t.version)

    for r in releases:
        for b in r.builds:
            if not any(t.version == b.cuda for t in toolkits):
                raise MatrixError(
                    f"{file}: release {r.torch} build {b.cuda}: no [[cuda]] "
                    f"entry gives the driver for CUDA {b.cuda}"
                )
    return toolkits


def _load_channels(file: Path, top: Table, sources: Mapping[str, str]) -> dict[str, Channel]:
    """``[channel.*]``: where builds come from (the pip one is required)."""
    channels: dict[str, Channel] = {}
    for name, raw in top.table("channel").items():
        e = Table(file, f"channel.{name}", raw)
        kind = e.text("kind")
        if kind not in CHANNEL_KINDS:
            e.fail(f"'kind' must be one of {', '.join(CHANNEL_KINDS)}, got {kind!r}")
        ch = Channel(
            name=name,
            kind=kind,
            provenance=e.provenance(sources),
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
    return channels


def _load_arch_lists(
    file: Path,
    top: Table,
    sources: Mapping[str, str],
    channels: Mapping[str, Channel],
    releases: list[Release],
) -> list[ArchList]:
    """``[[archs]]``: the GPU architectures of a channel's builds, no two rows overlapping."""
    arch_lists: list[ArchList] = []
    cuda_known = {b.cuda for r in releases for b in r.builds}
    for i, raw in enumerate(top.tables("archs")):
        e = Table(file, f"archs #{i + 1}", raw)
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
            if t not in {r.torch for r in releases}:
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
        prov = e.provenance(sources)
        e.done()
        row = ArchList(
            channel=channel,
            cuda=cudas,
            torch_min=tmin,
            torch_max=tmax,
            platforms=tuple(platforms),
            archs=archs,
            provenance=prov,
        )
        _check_arch_overlap(e, row, arch_lists, releases)
        arch_lists.append(row)
    return arch_lists


def _load_virtual_packages(
    file: Path, top: Table, sources: Mapping[str, str]
) -> dict[str, dict[str, str]]:
    """``[virtual_packages.<platform>]``: what a conda solve assumes of the machine."""
    vps: dict[str, dict[str, str]] = {}
    for platform, raw in top.table("virtual_packages", required=False).items():
        e = Table(file, f"virtual_packages.{platform}", raw)
        if platform not in PLATFORMS:
            e.fail(f"unknown platform {platform!r}")
        pkgs = {}
        for k in list(e.data):
            if k.startswith("__"):
                pkgs[k] = e.text(k)
        e.provenance(sources)
        e.done()
        vps[platform] = pkgs
    return vps


def _check_arch_overlap(
    e: Table, row: ArchList, earlier: list[ArchList], releases: list[Release]
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


def _capability(e: Table, text: str) -> Capability:
    try:
        return Capability.parse(text)
    except LockgenError as exc:
        e.fail(str(exc))


def _load_gpus(file: Path, data: dict[str, Any], m: Matrix) -> GpuList:
    """``gpus.toml``: NVIDIA's table rows ([[capability]]) and the GPU families'
    driver facts ([[architecture]])."""
    top = Table(file, "top level", data)
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
        e = Table(file, label, raw)
        cap = _capability(e, e.text("capability"))
        names = {seg: e.strs(seg, required=False) for seg in SEGMENTS}
        prov = e.provenance(sources)
        e.done()
        if not any(names.values()):
            e.fail(f"names no GPU (give one of {', '.join(SEGMENTS)})")
        for seg, seg_names in names.items():
            for name in seg_names:
                gpu = Gpu(name=name, capability=cap, segment=seg, provenance=prov)
                if not gpu.key:
                    e.fail(f"GPU name {name!r} has no letters or digits")
                if gpu.key in gpus:
                    e.fail(f"GPU {name!r} is listed twice (also as {gpus[gpu.key].label})")
                gpus[gpu.key] = gpu
    archs: list[Architecture] = []
    for i, raw in enumerate(top.tables("architecture")):
        e = Table(file, f"architecture #{i + 1}", raw)
        name = e.text("name")
        caps = tuple(_capability(e, c) for c in e.strs("capabilities"))
        first = e.version("first_cuda", required=False)
        last = e.version("last_driver", required=False)
        prov = e.provenance(sources)
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
        archs.append(
            Architecture(
                name=name, capabilities=caps, first_cuda=first, last_driver=last, provenance=prov
            )
        )
    check_top(top)
    return GpuList(tuple(gpus.values()), tuple(archs))


def _load_targets(file: Path, data: dict[str, Any], m: Matrix) -> dict[str, Target]:
    top = Table(file, "top level", data)
    table = top.table("target")
    check_top(top)
    if not table:
        raise MatrixError(f"{file}: top level: no [target.*] entries")
    targets: dict[str, Target] = {}
    for name, raw in table.items():
        e = Table(file, f"target {name!r}", raw)
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
        if torch.suffix:
            e.fail(f"torch {torch} is a pre-, post- or development release: a target pins a "
                   "final release the matrix knows")  # fmt: skip
        unknown = release.unknown_patch(torch)
        if unknown:
            e.fail(unknown)
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
        stack = _target_stack(e)
        prereleases = tuple(canonical_name(n) for n in e.strs("prereleases", required=False))
        glibc = e.text("glibc", required=False) or None
        if glibc is not None and not re.fullmatch(r"2\.\d+", glibc):
            e.fail(f"glibc {glibc!r} is not a glibc version like 2.31")
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
            stack,
            glibc,
            prereleases,
        )
        if stack:
            _check_stack_target(e, targets[name])
    return targets


# a stack pin: a PyPI name, optional extras, one exact version
_STACK_PIN = re.compile(
    r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9._,-]+\])?==([0-9][A-Za-z0-9.]*)"
)


def _target_stack(e: Table) -> tuple[str, ...]:
    """An LLM stack target's pins beside torch (``stack = ["transformers==5.25.0", ...]``):
    each one package, optional extras and one exact version, no torch nor torchvision."""
    pins = e.strs("stack", required=False)
    seen: set[str] = set()
    for pin in pins:
        got = _STACK_PIN.fullmatch(pin)
        if got is None:
            e.fail(f"stack pin {pin!r} is not NAME==VERSION or NAME[EXTRA]==VERSION")
        name = canonical_name(got.group(1))
        if name in ("torch", "torchvision") or name in seen:
            e.fail(f"stack pin {pin!r}: torch and torchvision are the target's own fields, "
                   "and a package is pinned once")  # fmt: skip
        seen.add(name)
    return tuple(pins)


def _check_stack_target(e: Table, t: Target) -> None:
    """A stack target takes torch from PyPI (the stack's facts are PyPI's files) and has no
    conda channel (no channel's builds of the stack are in the facts)."""
    if t.pip_source.kind != PYPI:
        e.fail(
            f"a stack target takes torch from PyPI, whose files the stack facts describe; "
            f"torch {t.torch} + CUDA {t.cuda} is not PyPI's build ({t.pip_source.why})"
        )
    if t.conda_channel is not None:
        e.fail("a stack target has no conda channel: " + STACK_NO_CONDA)


def _target_conda_channel(
    e: Table, m: Matrix, release: Release, cuda: Version | None
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
    e: Table,
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
    m = _load_matrix_data(file, read_toml(file))
    gfile = _beside(file, gpus, "gpus.toml")
    if gfile is not None:
        m = replace(m, gpus=_load_gpus(gfile, read_toml(gfile), m), gpus_path=gfile)
    tfile = _beside(file, targets, "targets.toml")
    if tfile is None:
        return m
    return replace(m, targets=_load_targets(tfile, read_toml(tfile), m), targets_path=tfile)

"""The conda format: conda-lock environment specs, the conda-lock lockfile, and its verification.

Rendering
---------
conda-lock inputs per target: ``envs/<target>.yml`` and ``envs/<target>.virtual-packages.yml``.

``envs/<target>.yml`` is an environment file conda-lock reads: the target's channels, its
``platforms`` and its dependencies — ``pytorch`` pinned by *build string* (``cuda*`` /
``*cuda*``, or ``cpu*`` for the CPU target) plus the CUDA selector (``cuda-version 13.0.*`` on
conda-forge, ``pytorch-cuda 12.1.*`` on the legacy channel), ``torchvision``, ``python`` and
the project's own needs (:data:`PROJECT_SPECS`). The build pin is what turns "no CUDA build
fits" into a solver error instead of a silent CPU build.

Only targets with a ``conda_channel`` get them: a target that no conda channel of the matrix
supplies has no conda environment (:class:`RenderRefused` names why).

``envs/<target>.virtual-packages.yml`` is conda-lock's ``--virtual-package-spec`` for that
target (``__cuda`` = the target's CUDA, ``__glibc`` etc. from the matrix). conda-lock's own
default assumes ``__cuda 11.4``, under which every CUDA 12/13 build is unsatisfiable. The
spec format is keyed by platform only, so one file cannot serve several targets on the same
platform: each target gets its own.

Public API
----------
``channel_support(matrix, target) -> Support``
    Can the target's conda channel supply its CUDA build, according to the matrix's
    ``[[archs]]`` facts for that channel? ``supplied``, ``unknown`` (no fact either way),
    ``unavailable`` (the channel builds this release for other CUDA versions only) or
    ``none`` (the target names no conda channel).
``render_target(matrix, target, envs_dir, allow_unverified=False) -> list[Path]``
    Writes both files (atomically); raises :class:`RenderRefused` for ``unavailable`` and,
    unless ``allow_unverified``, for ``unknown`` — with the explanation.
``env_yml_text(matrix, target)``, ``virtual_packages_text(target)``, ``target_paths(...)``.

The lockfile
------------
conda-lock lockfiles, read and written through conda-lock's own models.

Everything here goes through ``conda_lock`` itself so that ``conda-lock install`` /
``conda-lock render`` accept what lockgen writes and lockgen reads what conda-lock writes:

* the lock *specification* comes from ``conda_lock.src_parser.make_lock_spec`` reading
  ``envs/<target>.yml`` (with ``--channel`` overrides exactly as ``conda-lock lock --channel``
  applies them);
* the per-platform ``content_hash`` is ``conda_lock.content_hash.compute_content_hashes`` of
  that specification and the virtual-package repo built from
  ``envs/<target>.virtual-packages.yml`` by
  ``conda_lock.virtual_package.virtual_package_repo_from_specification`` — the same two calls
  ``conda-lock lock -f ENV --virtual-package-spec VP`` makes. (Semantics, for reference: per
  platform, sha256 of the sorted-keys JSON of the channels, the platform's dependency specs
  sorted by (manager, name), and the virtual packages' fake repodata for that platform and
  noarch.) So a lock made by lockgen and one made by conda-lock from the same inputs carry
  the same hashes, and editing either input makes ``verify`` report the lock as stale;
* files are written with ``conda_lock.lockfile.write_conda_lock_file`` (version 1 format) and
  read with ``parse_conda_lock_file``.

conda-lock filters virtual packages out of the lockfile, so what a lock was solved for is
kept in ``metadata.custom_metadata`` under the ``lockgen.*`` keys (:data:`META_TARGET` etc.).

Verifying
---------
``verify_lock(lock, matrix, envs_dir, ...) -> Report``: the checks ``lockgen verify`` runs on
a conda lockfile (listed in :mod:`lockgen.verify`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lockgen.errors import LockgenError
from lockgen.findings import Report
from lockgen.formats.locks import (
    MAX_LOCK_PACKAGES,
    META_TARGET,
    check_file_name,
    exact_release_problem,
    read_lock_text,
    resolve_target,
)
from lockgen.load import default_envs_dir
from lockgen.matrix import Matrix
from lockgen.output import write_text, write_texts
from lockgen.targets import STACK_NO_CONDA, Target
from lockgen.versions import Version

if TYPE_CHECKING:  # pragma: no cover
    from conda_lock.lockfile.v2prelim.models import LockedDependency, Lockfile
    from conda_lock.models.lock_spec import LockSpecification


# What the project needs besides torch/torchvision: numpy (pyproject dependencies), ninja
# (the extension build), pip (for `pip install --no-build-isolation -e .`).
PROJECT_SPECS = ("numpy", "ninja", "pip")

SUPPLIED, UNKNOWN, UNAVAILABLE, NO_CHANNEL = "supplied", "unknown", "unavailable", "none"


class RenderRefused(LockgenError):
    """The target's channel cannot (or is not known to) supply its build."""


@dataclass(frozen=True)
class Support:
    status: str
    reason: str

    @property
    def ok(self) -> bool:
        return self.status == SUPPLIED


@dataclass(frozen=True)
class TargetPaths:
    env: Path
    virtual_packages: Path
    lock: Path
    requirements: Path


def target_paths(envs_dir: Path, name: str) -> TargetPaths:
    envs_dir = Path(envs_dir)
    return TargetPaths(
        envs_dir / f"{name}.yml",
        envs_dir / f"{name}.virtual-packages.yml",
        envs_dir / f"{name}.lock",
        envs_dir / f"{name}.requirements.txt",
    )


def channel_support(matrix: Matrix, target: Target) -> Support:
    """What the matrix says about the target's conda channel supplying its build."""
    ch = target.conda_channel
    if target.is_stack:
        return Support(NO_CHANNEL, f"no conda channel, being an LLM stack target: {STACK_NO_CONDA}")
    if ch is None:
        return Support(NO_CHANNEL, f"no conda channel: {_conda_elsewhere(matrix, target)}")
    if target.is_cpu:
        return Support(SUPPLIED, f"{ch.name} publishes CPU builds of the releases it carries")
    assert target.cuda is not None
    facts = [a for a in matrix.arch_lists if a.channel == ch.name]
    missing: list[str] = []
    unavailable: list[str] = []
    for platform in target.platforms:
        if any(a.covers(target.torch, target.cuda, platform) for a in facts):
            continue
        same_release = sorted(
            {
                c.raw
                for a in facts
                for c in a.cuda
                if a.torch_min <= target.torch.minor <= a.torch_max and platform in a.platforms
            }
        )
        if same_release:
            unavailable.append(
                f"{ch.name} builds torch {target.torch.minor} for CUDA "
                f"{', '.join(same_release)} on {platform}, not CUDA {target.cuda}"
            )
        else:
            known = sorted(
                {
                    f"{a.torch_min}"
                    if a.torch_min == a.torch_max
                    else f"{a.torch_min}-{a.torch_max}"
                    for a in facts
                }
            )
            cover = (
                f"its {ch.name} facts cover torch {', '.join(known)} only"
                if known
                else f"it has no [[archs]] facts for {ch.name}"
            )
            missing.append(
                f"the matrix records no {ch.name} build of torch "
                f"{target.torch.minor} for CUDA {target.cuda} on {platform} "
                f"({cover})"
            )
    if unavailable:
        return Support(UNAVAILABLE, "; ".join(unavailable + missing))
    if missing:
        return Support(UNKNOWN, "; ".join(missing))
    return Support(
        SUPPLIED,
        f"the matrix records {ch.name} builds of torch {target.torch.minor} for CUDA {target.cuda}",
    )


def _conda_elsewhere(matrix: Matrix, target: Target) -> str:
    """What the conda channels of the matrix build instead (for a target that names none)."""
    torch, platform = target.torch.minor, target.platforms[0]
    parts = []
    for name, ch in matrix.channels.items():
        if ch.kind != "conda":
            continue
        facts = [a for a in matrix.arch_lists if a.channel == name]
        if ch.torch_max is not None and torch > ch.torch_max:
            parts.append(f"{name} ends at torch {ch.torch_max}")
            continue
        cudas = sorted(
            {
                c
                for a in facts
                if a.torch_min <= torch <= a.torch_max and platform in a.platforms
                for c in a.cuda
            }
        )
        if cudas:
            parts.append(
                f"{name} builds torch {torch} on {platform} for CUDA "
                f"{', '.join(c.raw for c in cudas)}"
            )
        elif facts:
            newest = max(a.torch_max for a in facts)
            parts.append(f"{name}'s builds in the matrix end at torch {newest}")
    return "; ".join(parts) or "the matrix has no conda channel"


_BARE_VERSION = re.compile(r"^\d+(\.\d+)*$")


def normalise_spec(spec: str) -> str:
    """``pytorch 2.14.1 cuda*`` → ``pytorch ==2.14.1 cuda*``: an exact pin written so that
    conda, mamba, rattler and conda-lock all read it the same way (rattler rejects a bare
    version)."""
    parts = spec.split()
    if len(parts) >= 2 and _BARE_VERSION.match(parts[1]):
        parts[1] = "==" + parts[1]
    return " ".join(parts)


def env_specs(target: Target) -> list[str]:
    specs = [normalise_spec(s) for s in target.conda_specs]
    names = {s.split()[0] for s in specs}
    specs += [s for s in PROJECT_SPECS if s.split()[0] not in names]
    return specs


def env_name(target: Target) -> str:
    return f"gpufit-{target.name}"


_PLAIN_SCALAR = re.compile(r"[A-Za-z_][A-Za-z0-9_.*<>=!,|/:+~ -]*", re.ASCII)


def yaml_scalar(value: str) -> str:
    """``value`` as a YAML scalar that reads back as exactly that string: plain where YAML
    leaves it alone (``pytorch 2.5.1 *cuda*``, ``conda-forge``), else double-quoted and
    escaped (JSON's string syntax is YAML's)."""
    plain = (
        _PLAIN_SCALAR.fullmatch(value)
        and ": " not in value
        and not value.endswith((":", " "))
        and value.lower() not in ("true", "false", "yes", "no", "on", "off", "null", "y", "n")
    )
    return value if plain else json.dumps(value)


def _comment(text: str) -> str:
    """One comment line whatever ``text`` holds (a line break would end the comment)."""
    return "# " + " ".join(str(text).split())


def env_yml_text(matrix: Matrix, target: Target) -> str:
    support = channel_support(matrix, target)
    t = target.name
    lines = [
        f"# Generated by `lockgen render {t}` from lockgen/data/matrix.toml and",
        "# lockgen/data/targets.toml; do not edit: change those and re-render.",
        _comment(target.summary()),
    ]
    if not support.ok:
        lines.append(_comment(f"UNVERIFIED CHANNEL: {support.reason}"))
    lines += [
        f"# Lock:    lockgen lock {t}",
        f"#   or:    conda-lock lock -f envs/{t}.yml --virtual-package-spec "
        f"envs/{t}.virtual-packages.yml --lockfile envs/{t}.lock",
        f"# Install: conda-lock install -n {env_name(target)} envs/{t}.lock",
        f"#   or:    lockgen install envs/{t}.lock --prefix DIR",
        f"name: {env_name(target)}",
        "channels:",
        *[f"  - {yaml_scalar(c)}" for c in target.conda_channels],
        "platforms:",
        *[f"  - {p}" for p in target.platforms],
        "dependencies:",
        *[f"  - {yaml_scalar(s)}" for s in env_specs(target)],
    ]
    return "\n".join(lines) + "\n"


def virtual_packages_text(target: Target) -> str:
    lines = [
        f"# Generated by `lockgen render {target.name}`: the virtual packages a solve for this",
        "# target assumes (conda-lock --virtual-package-spec). conda-lock's default would be",
        "# __cuda 11.4, under which CUDA 12/13 builds are unsatisfiable.",
        "subdirs:",
    ]
    for platform, pkgs in target.virtual_packages.items():
        lines += [f"  {platform}:", "    packages:"]
        lines += [
            f"      {yaml_scalar(name)}: {json.dumps(version)}" for name, version in pkgs.items()
        ]
    return "\n".join(lines) + "\n"


def check_supported(matrix: Matrix, target: Target, allow_unverified: bool = False) -> Support:
    support = channel_support(matrix, target)
    if support.status == NO_CHANNEL:
        raise RenderRefused(
            f"target {target.name} has {support.reason}: no conda env to render or lock"
        )
    channel = target.conda_channel.name if target.conda_channel else ""
    if support.status == UNAVAILABLE:
        raise RenderRefused(
            f"target {target.name}: channel {channel} cannot supply the "
            f"CUDA {target.cuda} build of torch {target.torch}: {support.reason}. Choose a "
            "CUDA version or channel the matrix lists for this release "
            "(lockgen/data/targets.toml)."
        )
    if support.status == UNKNOWN and not allow_unverified:
        raise RenderRefused(
            f"target {target.name}: not known whether channel {channel} "
            f"supplies the CUDA {target.cuda} build of torch {target.torch}: "
            f"{support.reason}. Add the channel's facts to lockgen/data/matrix.toml, or pass "
            f"--allow-unverified to render it anyway (the lock then fails loudly if the "
            f"build does not exist)."
        )
    return support


def render_target(
    matrix: Matrix, target: Target, envs_dir: Path, allow_unverified: bool = False
) -> list[Path]:
    check_supported(matrix, target, allow_unverified)
    paths = target_paths(envs_dir, target.name)
    return write_texts(
        {
            paths.env: env_yml_text(matrix, target),
            paths.virtual_packages: virtual_packages_text(target),
        }
    )


def rendered_is_current(matrix: Matrix, target: Target, envs_dir: Path) -> list[str]:
    """Problems if the committed spec files differ from what ``render`` would write now."""
    paths = target_paths(envs_dir, target.name)
    problems = []
    for path, text in (
        (paths.env, env_yml_text(matrix, target)),
        (paths.virtual_packages, virtual_packages_text(target)),
    ):
        if not path.exists():
            problems.append(f"{path.name} is missing: run `lockgen render {target.name}`")
        elif path.read_text() != text:
            problems.append(
                f"{path.name} differs from what `lockgen render {target.name}` "
                f"writes from the matrix now"
            )
    return problems


# -- the conda-lock lockfile ------------------------------------------------------------------


META_CUDA = "lockgen.cuda"  # the __cuda the solve assumed ("" for a CPU target)
META_VIRTUAL_PACKAGES = "lockgen.virtual_packages"  # JSON {platform: {name: "version"}}
META_ENGINE = "lockgen.engine"
META_CHANNEL_OVERRIDES = "lockgen.channel_overrides"  # JSON list, [] when none
META_CHANNEL_SUPPORT = "lockgen.channel_support"  # supplied / unknown (render's verdict)


def _require_conda_lock():
    """Import conda-lock (quietly: its vendored conda warns about its own deprecations)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            import conda_lock.content_hash  # noqa: F401
            import conda_lock.lockfile  # noqa: F401
            import conda_lock.src_parser  # noqa: F401
            import conda_lock.virtual_package  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LockgenError("this command needs conda-lock (pip install conda-lock==4.0.3)") from exc


def lock_spec(env_file: Path, channel_overrides: Sequence[str] = ()) -> LockSpecification:
    """The conda-lock specification of an environment file, as ``conda-lock lock`` sees it."""
    _require_conda_lock()
    from conda_lock.lookup import DEFAULT_MAPPING_URL
    from conda_lock.src_parser import make_lock_spec

    if not env_file.exists():
        raise LockgenError(
            f"{env_file} does not exist: run `lockgen render "
            f"{env_file.name.removesuffix('.yml')}` first"
        )
    load_yaml(env_file)  # refuses aliases before conda-lock's own reader expands them
    try:
        return make_lock_spec(
            src_files=[env_file],
            channel_overrides=list(channel_overrides) or None,
            mapping_url=DEFAULT_MAPPING_URL,
        )
    except Exception as exc:
        raise LockgenError(f"{env_file}: conda-lock cannot read it: {exc}") from exc


def read_virtual_packages(vp_file: Path) -> dict[str, dict[str, str]]:
    """``{platform: {name: "version[ build]"}}`` from a conda-lock virtual-package spec."""
    if not vp_file.exists():
        raise LockgenError(f"{vp_file} does not exist: run `lockgen render` first")
    data = load_yaml(vp_file) or {}
    try:
        out: dict[str, dict[str, str]] = {}
        for platform, sub in (data.get("subdirs") or {}).items():
            out[platform] = {k: str(v) for k, v in ((sub or {}).get("packages") or {}).items()}
    except (AttributeError, TypeError) as exc:
        raise LockgenError(f"{vp_file} is not a virtual-package spec: {exc}") from None
    return out


def content_hashes(spec: LockSpecification, vp_file: Path) -> dict[str, str]:
    """conda-lock's per-platform content hash of ``spec`` + the virtual-package spec file."""
    _require_conda_lock()
    from conda_lock.content_hash import compute_content_hashes
    from conda_lock.virtual_package import virtual_package_repo_from_specification

    repo = virtual_package_repo_from_specification(vp_file)
    return compute_content_hashes(spec, repo)


def build_lockfile(
    packages: Sequence[LockedDependency],
    spec: LockSpecification,
    hashes: Mapping[str, str],
    sources: Sequence[str],
    custom: Mapping[str, str],
) -> Lockfile:
    _require_conda_lock()
    from conda_lock.lockfile.v1.models import LockMeta, TimeMeta
    from conda_lock.lockfile.v2prelim.models import Lockfile

    return Lockfile(
        package=list(packages),
        metadata=LockMeta(
            content_hash=dict(hashes),
            channels=list(spec.channels),
            platforms=list(spec.platforms),
            sources=list(sources),
            time_metadata=TimeMeta.create(),
            custom_metadata=dict(custom),
        ),
    )


def lockfile_text(lock: Lockfile, name: str) -> str:
    """The file conda-lock would write for ``lock`` under the file name ``name``."""
    _require_conda_lock()
    from conda_lock.lockfile import write_conda_lock_file

    lock = lock.model_copy(deep=True)
    with tempfile.TemporaryDirectory(prefix="lockgen-") as tmp:
        path = Path(tmp) / name
        write_conda_lock_file(lock, path, metadata_choices=None)
        return path.read_text()


def write_lockfile(lock: Lockfile, path: Path) -> Path:
    """Write atomically: on any failure the previous file at ``path`` is left untouched."""
    return write_text(path, lambda: lockfile_text(lock, path.name))


def load_yaml(path: Path) -> object:
    """The YAML document of a lockfile or spec, read with :func:`no_alias_loader` (no
    anchors, no aliases: a kilobyte of nested aliases would otherwise expand to gigabytes)
    from a regular file of at most :data:`~lockgen.formats.locks.MAX_LOCK_BYTES`; any problem
    is a :class:`LockgenError` naming the file."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with conda-lock (the lock extra)
        _require_conda_lock()
        raise
    text = read_lock_text(Path(path), "YAML file")
    fast = getattr(yaml, "CSafeLoader", None)  # libyaml: a 16 MiB file in seconds, not minutes
    try:
        if fast is None:
            return yaml.load(text, Loader=no_alias_loader())
        _check_events(Path(path), yaml.parse(text, Loader=fast))
        return yaml.load(text, Loader=fast)
    except yaml.YAMLError as exc:
        raise LockgenError(f"{path} is not readable YAML: {exc}") from None
    except RecursionError:
        raise LockgenError(f"{path}: YAML nested too deeply") from None


# A CUDA lock is some tens of thousands of YAML nodes; the events of a document are counted
# (in C) before any is composed into Python objects.
MAX_YAML_EVENTS = 2_000_000


def _check_events(path: Path, events) -> None:
    """No anchors, no aliases, at most :data:`MAX_YAML_EVENTS` events."""
    import yaml

    for n, event in enumerate(events):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise LockgenError(
                f"{path}: YAML anchors and aliases are not allowed in a lockfile "
                f"(line {event.start_mark.line + 1})"
            )
        if n > MAX_YAML_EVENTS:
            raise LockgenError(f"{path} holds over {MAX_YAML_EVENTS} YAML nodes: not a lockfile")


@functools.cache
def no_alias_loader() -> type:
    """A ``yaml.SafeLoader`` that refuses anchors and aliases (built on first use: PyYAML
    comes with the ``lock`` extra)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses anchors (``&a``) and aliases (``*a``)."""

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    "YAML anchors and aliases are not allowed in a lockfile",
                    event.start_mark,
                )
            return super().compose_node(parent, index)

    return _Loader


def read_lockfile(path: Path) -> Lockfile:
    """Parse a conda-lock lockfile as ``conda_lock.lockfile.parse_conda_lock_file`` does
    (versions 1 and 2), from YAML read by :func:`load_yaml`."""
    path = Path(path)
    content = load_yaml(path)  # before conda-lock is imported: a bad file is refused at once
    _require_conda_lock()
    from conda_lock.lockfile import lockfile_v1_to_v2
    from conda_lock.lockfile.v1.models import Lockfile as LockfileV1
    from conda_lock.lockfile.v2prelim.models import Lockfile

    if not isinstance(content, dict):
        raise LockgenError(f"{path} is not a conda-lock lockfile: not a YAML mapping")
    version = content.pop("version", None)
    _check_package_list(path, content.get("package"))
    try:
        if version == 1:
            lock = lockfile_v1_to_v2(LockfileV1.model_validate(content))
        elif version == 2:
            lock = Lockfile.model_validate(content)
        else:
            raise LockgenError(
                f"{path} is not a conda-lock lockfile: version {version!r} (lockgen reads 1 and 2)"
            )
        lock.toposort_inplace()
    except LockgenError:
        raise
    except Exception as exc:
        raise LockgenError(f"{path} is not a conda-lock lockfile: {_one_line(exc)}") from None
    return lock


def _check_package_list(path: Path, packages: object) -> None:
    """At most :data:`~lockgen.formats.locks.MAX_LOCK_PACKAGES` packages, and no package
    twice for one platform (conda-lock's own reader only asserts that, without a word)."""
    if not isinstance(packages, list):
        return
    if len(packages) > MAX_LOCK_PACKAGES:
        raise LockgenError(
            f"{path} lists {len(packages)} packages: not a lock (at most {MAX_LOCK_PACKAGES})"
        )
    seen: set[tuple] = set()
    for p in packages:
        if not isinstance(p, dict):
            continue
        key = (p.get("manager"), p.get("name"), p.get("platform"))
        if key in seen and all(isinstance(k, str) for k in key):
            raise LockgenError(
                f"{path} is not a conda-lock lockfile: {key[0]} package {key[1]} is listed "
                f"twice for {key[2]}"
            )
        seen.add(key)


def _one_line(exc: Exception) -> str:
    """A reader's error in one line: pydantic's as a count and the first, others' first line
    (or the exception's name when it says nothing)."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and hasattr(exc, "error_count"):
        first = exc.errors()[0] if exc.error_count() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{exc.error_count()} validation errors; first: {where}: {first.get('msg', '?')}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def custom(lock: Lockfile) -> dict[str, str]:
    return dict(lock.metadata.custom_metadata or {})


def recorded_virtual_packages(lock: Lockfile) -> dict[str, dict[str, str]]:
    raw = custom(lock).get(META_VIRTUAL_PACKAGES)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return {}


def recorded_channel_overrides(lock: Lockfile) -> list[str]:
    raw = custom(lock).get(META_CHANNEL_OVERRIDES)
    try:
        return list(json.loads(raw)) if raw else []
    except ValueError:
        return []


_MD5 = re.compile(r"^[0-9a-f]{32}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# -- build strings ----------------------------------------------------------------------------

_LEGACY_CUDA = re.compile(r"(?:^|_)cuda(\d+\.\d+)(?:_|$)")
_NODOT_CUDA = re.compile(r"(?:^|_)cu(?:da)?(\d{2,3})(?:_|$)")
_CPU = re.compile(r"(?:^|_)cpu(?:_|$)")
_LEGACY_CUDNN = re.compile(r"(?:^|_)cudnn(\d+(?:\.\d+)*)(?:_|$)")


def build_cuda(build: str) -> Version | str | None:
    """The CUDA version a pytorch/torchvision build string names; ``"cpu"`` for a CPU build;
    None when it says neither. ``py3.11_cuda12.1_cudnn8.9.2_0`` → 12.1,
    ``cuda130_mkl_py311_h1234567_200`` → 13.0, ``py311_cu121`` → 12.1, ``cpu_mkl_…`` → cpu."""
    if _CPU.search(build):
        return "cpu"
    m = _LEGACY_CUDA.search(build)
    if m:
        return Version.parse(m.group(1))
    m = _NODOT_CUDA.search(build)
    if m:
        d = m.group(1)
        return Version((int(d[:-1]), int(d[-1])), f"{int(d[:-1])}.{d[-1]}")
    return None


def build_cudnn(build: str) -> Version | None:
    m = _LEGACY_CUDNN.search(build)
    return Version.parse(m.group(1)) if m else None


# -- conda lockfiles --------------------------------------------------------------------------


def _check_torch(report: Report, target: Target, platform: str, pkgs: dict) -> None:
    torch = pkgs.get("pytorch")
    if torch is None:
        report.error("torch", f"{platform}: no pytorch package in the lock")
        return
    build = torch.build or ""
    got = build_cuda(build)
    desc = f"{platform}: pytorch {torch.version} build {build}"
    if target.is_cpu:
        if got != "cpu":
            report.error(
                "torch", f"{desc} is not a CPU build, but target {target.name} is CPU-only"
            )
    elif got == "cpu":
        report.error(
            "torch",
            f"{desc} is the CPU build; target {target.name} needs the "
            f"CUDA {target.cuda} build (pin `pytorch * cuda*` and give the "
            f"solve __cuda={target.cuda})",
        )
    elif got is None:
        report.error("torch", f"{desc}: the build string names no CUDA version")
    elif got != target.cuda:
        report.error(
            "torch", f"{desc} is a CUDA {got} build, target {target.name} is CUDA {target.cuda}"
        )
    problem = exact_release_problem("pytorch", torch.version, target.torch, None)
    if problem:
        report.error("torch", f"{platform}: {problem}")
    vision = pkgs.get("torchvision")
    if vision is None:
        report.error("torch", f"{platform}: no torchvision package in the lock")
    else:
        vgot = build_cuda(vision.build or "")
        if target.is_cpu and vgot not in ("cpu", None):
            report.error(
                "torch",
                f"{platform}: torchvision build {vision.build} is a CUDA build in a CPU target",
            )
        elif not target.is_cpu and vgot == "cpu":
            report.error("torch", f"{platform}: torchvision build {vision.build} is the CPU build")
        elif isinstance(vgot, Version) and vgot != target.cuda:
            report.error(
                "torch",
                f"{platform}: torchvision build {vision.build} is for CUDA "
                f"{vgot}, not {target.cuda}",
            )
        problem = exact_release_problem("torchvision", vision.version, target.torchvision, None)
        if problem:
            report.error("torch", f"{platform}: {problem}")
    # cuDNN
    if target.cudnn is not None:
        cudnn = build_cudnn(build)
        if cudnn is not None:
            if not target.cudnn.matches_prefix(cudnn):
                report.error(
                    "cudnn",
                    f"{platform}: pytorch build {build} has cuDNN {cudnn}, "
                    f"the matrix says {target.cudnn}",
                )
        elif "cudnn" in pkgs:
            v = Version.parse(pkgs["cudnn"].version.split("+")[0])
            if v.major != target.cudnn.major:
                report.error(
                    "cudnn",
                    f"{platform}: cudnn {v} is not cuDNN "
                    f"{target.cudnn.major} (matrix: {target.cudnn})",
                )
            elif not v.matches_prefix(target.cudnn.minor):
                report.warn(
                    "cudnn",
                    f"{platform}: cudnn {v} differs from the pip build's "
                    f"{target.cudnn} (the channel ships its own cuDNN)",
                )


def _check_cuda_selector(report: Report, target: Target, platform: str, pkgs: dict) -> None:
    if target.cuda is None:
        return
    meta = target.conda_channel.cuda_metapackage
    names = [meta] + [n for n in ("cuda-version",) if n != meta]
    found = False
    for name in names:
        pkg = pkgs.get(name)
        if pkg is None:
            continue
        found = True
        v = Version.parse(pkg.version.split("+")[0])
        if not v.matches_prefix(target.cuda):
            report.error("cuda", f"{platform}: {name} {pkg.version} is not CUDA {target.cuda}")
    if not found:
        report.error("cuda", f"{platform}: no {meta} package pins CUDA {target.cuda}")


def _check_hashes(report: Report, lock: Lockfile) -> None:
    for p in lock.package:
        where = f"{p.platform}: {p.name} {p.version}"
        if not p.url:
            report.error("hash", f"{where} has no URL")
        md5, sha = (p.hash.md5 or ""), (p.hash.sha256 or "")
        if p.manager == "conda" and not _MD5.match(md5):
            report.error("hash", f"{where}: md5 {md5!r} is missing or malformed")
        if not _SHA256.match(sha):
            report.error("hash", f"{where}: sha256 {sha!r} is missing or malformed")


def _check_packages(report: Report, lock: Lockfile) -> None:
    """Every package is of a platform of the lock, and a conda package's version and
    dependency specs are ones conda can read."""
    import rattler
    from rattler.exceptions import InvalidMatchSpecError, InvalidVersionError

    for p in lock.package:
        where = f"{p.platform}: {p.name} {p.version}"
        if p.platform not in lock.metadata.platforms:
            report.error(
                "platform",
                f"{where}: {p.platform} is not a platform of the lock "
                f"({', '.join(lock.metadata.platforms)})",
            )
        if p.manager != "conda":
            continue
        try:
            rattler.Version(p.version)
        except InvalidVersionError as exc:
            report.error("package", f"{where}: not a conda version ({exc})")
        for name, spec in p.dependencies.items():
            try:
                rattler.MatchSpec(f"{name} {spec}".strip())
            except InvalidMatchSpecError as exc:
                report.error("package", f"{where}: dependency {name} {spec!r} ({exc})")


# conda's "defaults" on Linux; "name" channels live on anaconda.org
DEFAULTS_CHANNELS = ["https://repo.anaconda.com/pkgs/main", "https://repo.anaconda.com/pkgs/r"]
_ANACONDA = "https://conda.anaconda.org/"
_ARCHIVE_SUFFIXES = (".conda", ".tar.bz2")


def channel_urls(channel: str) -> list[str]:
    """The base URLs of a channel as a lock names it: a URL as given, ``defaults`` as conda
    expands it on Linux, a name on anaconda.org."""
    if "://" in channel:
        return [channel.rstrip("/")]
    if channel == "defaults":
        return list(DEFAULTS_CHANNELS)
    return [_ANACONDA + channel.strip("/")]


def lock_channels(lock: Lockfile, target: Target) -> list[str]:
    """The channels the lock's packages may come from: the ``--channel`` overrides the lock
    was solved from, recorded in it, else the target's own."""
    return recorded_channel_overrides(lock) or list(target.conda_channels)


def _check_channels(report: Report, lock: Lockfile, target: Target) -> list[str]:
    """The lock names the channels it was solved from; returns their base URLs."""
    channels = lock_channels(lock, target)
    named = [str(getattr(c, "url", c)) for c in lock.metadata.channels]
    if named != channels:
        report.error(
            "channel",
            f"the lock names the channels {', '.join(named) or 'none'}, target {target.name}'s "
            f"are {', '.join(channels)}",
        )
    if recorded_channel_overrides(lock):
        report.warn(
            "channel",
            f"solved with --channel {' '.join(channels)} instead of target {target.name}'s "
            f"channels ({', '.join(target.conda_channels)}): its packages are held to those",
        )
    return [u for c in channels for u in channel_urls(c)]


def archive_name(p: LockedDependency) -> tuple[str, ...]:
    """The file names a conda package of this name, version and build has."""
    return tuple(f"{p.name}-{p.version}-{p.build}{suffix}" for suffix in _ARCHIVE_SUFFIXES)


def package_url_problem(p: LockedDependency, bases: Sequence[str]) -> str | None:
    """Why a conda package's URL is not ``<channel>/<platform or noarch>/<its file>`` for one
    of the channel base URLs, written plainly (None: it is). A URL is parsed once, here:
    backslashes, ``.``/``..`` or empty segments, encoded separators, queries, fragments and
    credentials are refused, so that every reader (lockgen, rattler) finds the same file."""
    import urllib.parse

    url = p.url or ""
    parts = urllib.parse.urlsplit(url)
    if (
        parts.scheme not in ("https", "http", "file")
        or parts.query
        or parts.fragment
        or "\\" in url
        or "@" in parts.netloc
        or "?" in url
        or "#" in url
    ):
        return f"{url!r} is not a plain http(s):// or file:// URL"
    segments = urllib.parse.unquote(parts.path).split("/")[1:]
    if any(s in ("", ".", "..") for s in segments) or re.search(r"%(2f|5c|2e)", url, re.I):
        return f"{url} has an empty, '.', '..' or encoded separator segment"
    base, subdir, filename = url.rsplit("/", 2)
    if base not in bases:
        return f"{url} is not in the lock's channels ({', '.join(bases)})"
    if subdir not in (p.platform, "noarch"):
        return f"{url} is in {subdir}/, not {p.platform}/ or noarch/"
    if urllib.parse.unquote(filename) not in archive_name(p):
        return f"{url} is the file {filename}, the entry is {p.name} {p.version} {p.build}"
    return None


def _check_urls(report: Report, lock: Lockfile, bases: Sequence[str]) -> None:
    for p in lock.package:
        where = f"{p.platform}: {p.name} {p.version}"
        if p.manager != "conda":
            report.error(
                "source", f"{where} is a {p.manager} package: lockgen's conda locks hold conda ones"
            )
            continue
        problem = package_url_problem(p, bases)
        if problem:
            report.error("source", f"{where}: {problem}")


def check_channel_hashes(lock: Lockfile, report: Report, bases: Sequence[str]) -> None:
    """Compare each conda package (whose URL lies in one of ``bases``) with the record its
    channel's repodata publishes for that file: name, version, build, md5 and sha256."""
    import rattler

    groups: dict[tuple[str, str], list] = defaultdict(list)
    for p in lock.package:
        if p.manager != "conda" or package_url_problem(p, bases):
            continue  # reported by the URL check
        base, subdir, _ = p.url.rsplit("/", 2)
        groups[(base, subdir)].append(p)

    async def fetch():
        gateway = rattler.Gateway()
        out = {}
        for (base, subdir), pkgs in groups.items():
            res = await gateway.query(
                [rattler.Channel(base)], [subdir], sorted({p.name for p in pkgs}), recursive=False
            )
            out[(base, subdir)] = {r.url: r for recs in res for r in recs}
        return out

    try:
        published = asyncio.run(fetch())
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        report.error("hash", f"cannot read the channels' repodata to compare hashes: {first}")
        return
    for key, pkgs in groups.items():
        index = published.get(key, {})
        for p in pkgs:
            rec = index.get(p.url)
            where = f"{p.platform}: {p.name} {p.version} ({p.url.rsplit('/', 1)[-1]})"
            if rec is None:
                report.error("hash", f"{where} is not in its channel's repodata")
                continue
            said = (str(rec.name.normalized), str(rec.version), str(rec.build))
            if said != (p.name, p.version, p.build):
                report.error(
                    "hash",
                    f"{where}: the channel publishes this file as {' '.join(said)}, the lock "
                    f"says {p.name} {p.version} {p.build}",
                )
            md5 = rec.md5.hex() if rec.md5 else None
            sha = rec.sha256.hex() if rec.sha256 else None
            if md5 and p.hash.md5 != md5 or sha and p.hash.sha256 != sha:
                report.error(
                    "hash",
                    f"{where}: hash differs from the channel's "
                    f"(lock md5 {p.hash.md5}, channel {md5})",
                )


def _check_content_hash(
    report: Report, lock: Lockfile, target: Target, envs_dir: Path, matrix: Matrix
) -> None:
    paths = target_paths(envs_dir, target.name)
    for problem in rendered_is_current(matrix, target, envs_dir):
        report.error("stale", f"{problem}; re-render and re-lock")
    if not paths.env.exists() or not paths.virtual_packages.exists():
        return
    try:
        spec = lock_spec(paths.env, recorded_channel_overrides(lock))
        now = content_hashes(spec, paths.virtual_packages)
    except LockgenError as exc:
        report.error("stale", str(exc))
        return
    for platform in target.platforms:
        have = lock.metadata.content_hash.get(platform)
        if have is None:
            continue  # reported by the platform check
        if now.get(platform) != have:
            report.error(
                "stale",
                f"{platform}: content hash {have[:12]}… does not match "
                f"{paths.env.name} + {paths.virtual_packages.name} now "
                f"({now.get(platform, '?')[:12]}…): the inputs changed "
                f"since this lock was made; run `lockgen lock "
                f"{target.name}`",
            )


def verify_lock(
    lock: Lockfile,
    matrix: Matrix,
    envs_dir: Path | None = None,
    target: Target | None = None,
    lock_name: str = "",
    check_channels: bool = False,
) -> Report:
    envs_dir = Path(envs_dir) if envs_dir else default_envs_dir()
    meta = custom(lock)
    name = meta.get(META_TARGET) or (lock_name.removesuffix(".lock") if lock_name else None)
    report = Report(lock_name or "<lock>", name)
    if target is None:
        target = resolve_target(matrix, name, report)
        if target is None:
            return report
        if lock_name:
            check_file_name(report, Path(lock_name), ".lock", target)
    report.target = target.name
    if META_CUDA in meta:
        want = target.cuda.raw if target.cuda else ""
        if meta[META_CUDA] != want:
            report.error(
                "target",
                f"the lock was solved for __cuda={meta[META_CUDA] or 'none'}"
                f", target {target.name} is {want or 'CPU'}",
            )
    else:
        report.warn(
            "target", "the lock does not record the __cuda it was solved for (not made by lockgen?)"
        )
    if meta.get(META_CHANNEL_SUPPORT, "supplied") != "supplied":
        report.warn(
            "channel",
            f"rendered with --allow-unverified: the matrix does not "
            f"confirm that {target.conda_channel.name} supplies this build",
        )

    by_platform: dict[str, dict] = defaultdict(dict)
    for p in lock.package:
        if p.manager == "conda":
            by_platform[p.platform][p.name] = p
    for platform in target.platforms:
        if platform not in lock.metadata.platforms or not by_platform.get(platform):
            report.error(
                "platform",
                f"{platform} is missing from the lock (target "
                f"{target.name} needs {', '.join(target.platforms)})",
            )
            continue
        pkgs = by_platform[platform]
        _check_torch(report, target, platform, pkgs)
        _check_cuda_selector(report, target, platform, pkgs)
    bases = _check_channels(report, lock, target)
    _check_urls(report, lock, bases)
    _check_hashes(report, lock)
    _check_packages(report, lock)
    if check_channels:
        check_channel_hashes(lock, report, bases)
    _check_content_hash(report, lock, target, envs_dir, matrix)
    report.checked = [
        "target",
        "platforms",
        "channels and URLs",
        "hashes",
        "torch build",
        "CUDA",
        "cuDNN",
        "content hash",
    ] + (["channel hashes"] if check_channels else [])
    return report

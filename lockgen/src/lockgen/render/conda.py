"""conda-lock inputs per target: ``envs/<target>.yml`` and ``envs/<target>.virtual-packages.yml``.

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
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lockgen.errors import LockgenError
from lockgen.matrix import Matrix, Target
from lockgen.output import write_texts

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

"""What a user can install for a target now, per installer, and with which command.

``routes(matrix, target, envs_dir, nix_config=None) -> tuple[Route, ...]`` gives one
:class:`Route` per flavor (``pip``, ``uv``, ``conda``, ``nix``):

* ``locked``  a committed lock in ``envs/``: the command installs exactly it;
* ``no lock`` the flavor exists but its lock is not committed (made by ``lock`` where its
  channel or index is reachable: ``.github/workflows/lock.yml`` for the PyTorch wheel index
  and the conda channels); ``command`` installs now without a lock, ``lock`` says how the
  lock is made;
* ``none``    the flavor has no environment for this target, and ``note`` says why.

``lockgen targets`` prints these; the README's table says the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lockgen.errors import LockgenError
from lockgen.matrix import Matrix
from lockgen.targets import PYPI, STACK_NO_NIX, Target

LOCKED, NO_LOCK, NONE = "locked", "no lock", "none"
FLAVORS = ("pip", "uv", "conda", "nix")
WORKFLOW = ".github/workflows/lock.yml"


@dataclass(frozen=True)
class Route:
    flavor: str
    status: str
    command: str = ""
    lock: str = ""
    note: str = ""

    def to_json(self) -> dict:
        return {
            "status": self.status,
            "command": self.command or None,
            "lock": self.lock or None,
            "note": self.note or None,
        }


def _lock_how(target: Target, flavor: str, networked: bool) -> str:
    """How the missing lock is made: here, or where the wheel index / conda channels are
    reachable (the networked workflow)."""
    local = f"lockgen lock {target.name} --flavor {flavor}"
    return f"{WORKFLOW}, or {local} with network" if networked else local


def pip_route(target: Target, envs_dir: Path) -> Route:
    lock = Path(envs_dir) / f"{target.name}.requirements.txt"
    if lock.exists():
        return Route(
            "pip", LOCKED, f"pip install --require-hashes -r envs/{target.name}.requirements.txt"
        )
    source = target.pip_source
    pins = target.pip_shell_words
    if source.kind == PYPI:
        return Route("pip", NO_LOCK, f"pip install {pins}", _lock_how(target, "pip", False))
    return Route(
        "pip",
        NO_LOCK,
        f"pip install {pins} --index-url {source.url}",
        _lock_how(target, "pip", True),
    )


def uv_route(target: Target, envs_dir: Path) -> Route:
    from lockgen.formats.uv import uv_paths

    paths = uv_paths(envs_dir, target.name)
    project = f"envs/uv/{target.name}"
    if not paths.pyproject.exists():
        return Route("uv", NONE, note=f"{project} is not rendered: `lockgen render {target.name}`")
    if paths.lock.exists():
        return Route("uv", LOCKED, f"uv sync --locked --project {project}")
    networked = target.pip_source.kind != PYPI
    return Route("uv", NO_LOCK, f"uv sync --project {project}", _lock_how(target, "uv", networked))


def conda_route(matrix: Matrix, target: Target, envs_dir: Path) -> Route:
    from lockgen.formats.conda import SUPPLIED, channel_support, env_name, target_paths

    support = channel_support(matrix, target)
    if support.status != SUPPLIED:
        return Route("conda", NONE, note=support.reason)
    paths = target_paths(envs_dir, target.name)
    if paths.lock.exists():
        return Route(
            "conda", LOCKED, f"conda-lock install -n {env_name(target)} envs/{target.name}.lock"
        )
    return Route(
        "conda",
        NO_LOCK,
        f"conda-lock lock -f envs/{target.name}.yml --virtual-package-spec "
        f"envs/{target.name}.virtual-packages.yml --lockfile envs/{target.name}.lock && "
        f"conda-lock install -n {env_name(target)} envs/{target.name}.lock",
        _lock_how(target, "conda", True),
    )


def nix_route(target: Target, shells: dict | None, pip: Route, why_not: str = "") -> Route:
    if target.is_stack:
        return Route("nix", NONE, note=f"no dev shell for an LLM stack target: {STACK_NO_NIX}")
    if shells is None or target.name not in shells:
        return Route("nix", NONE, note=why_not or "no dev shell for this target in flake.nix")
    if pip.status == LOCKED:
        return Route(
            "nix",
            LOCKED,
            f"GPUFIT_INSTALL=1 nix develop .#{target.name}",
            note="the shell installs torch from the pip lock; flake.lock comes from "
            ".github/workflows/flake.yml",
        )
    return Route(
        "nix",
        NO_LOCK,
        f"nix develop .#{target.name}",
        lock=pip.lock,
        note="the shell has the toolchain; torch needs the pip lock",
    )


def nix_shells(matrix: Matrix, nix_config=None) -> tuple[dict | None, str]:
    """The flake's shells by target name, or (None, why) when the Nix facts do not load."""
    from lockgen.formats.nix import load_nix_config, plan_shells

    try:
        config = load_nix_config(nix_config, matrix)
        return {s.name: s for s in plan_shells(matrix, config)}, ""
    except LockgenError as exc:
        return None, str(exc)


def routes(
    matrix: Matrix, target: Target, envs_dir: Path, shells: dict | None = None, why_not: str = ""
) -> tuple[Route, ...]:
    pip = pip_route(target, envs_dir)
    return (
        pip,
        uv_route(target, envs_dir),
        conda_route(matrix, target, envs_dir),
        nix_route(target, shells, pip, why_not),
    )

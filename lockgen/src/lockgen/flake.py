"""``lockgen flake``: write (or check) ``flake.nix``.

``generate(matrix, nix_config=None) -> str`` renders the flake (see
:mod:`lockgen.formats.nix`); ``DEFAULT_FLAKE_PATH`` is ``flake.nix`` in the current folder
(run it from the repository root), whatever folder the matrix lies in; ``write_flake`` writes
it atomically (a reader or a kill never sees half a flake; the destination is never read
first, so ``-o /dev/full`` is a clean error); ``stale`` says
whether a committed file differs from what the matrix gives now; ``lock_problems`` whether a
``flake.lock`` (written by a networked Nix) locks every nixpkgs input at the commit and
narHash ``lockgen/data/nix.toml`` pins.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from lockgen.errors import LockgenError
from lockgen.formats.nix import NixConfig, load_nix_config, render_flake
from lockgen.matrix import Matrix
from lockgen.output import write_text

DEFAULT_FLAKE_PATH = Path("flake.nix")


def generate(matrix: Matrix, nix_config: NixConfig | str | Path | None = None) -> str:
    if not isinstance(nix_config, NixConfig):
        nix_config = load_nix_config(nix_config, matrix)
    return render_flake(matrix, nix_config)


def write_flake(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:class:`lockgen.output.CannotWrite` if not)."""
    return write_text(path, text)


def stale(path: Path, text: str) -> str | None:
    """None when ``path`` holds ``text``; else a short unified diff (or 'missing')."""
    if not path.exists():
        return f"{path} is missing"
    if not path.is_file():
        raise LockgenError(f"{path} is not a file: --check compares a flake.nix file")
    try:
        current = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LockgenError(f"cannot read {path}: {exc}") from None
    if current == text:
        return None
    diff = difflib.unified_diff(
        current.splitlines(),
        text.splitlines(),
        f"{path} (committed)",
        f"{path} (from the matrix)",
        lineterm="",
        n=1,
    )
    lines = list(diff)
    more = f"\n... ({len(lines) - 40} more diff lines)" if len(lines) > 40 else ""
    return "\n".join(lines[:40]) + more


def lock_problems(config: NixConfig, lock_path: Path) -> list[str]:
    """What is wrong with ``flake.lock`` against the pins of ``config`` (empty: nothing)."""
    try:
        data = json.loads(Path(lock_path).read_text())
        nodes = data["nodes"]
        root = nodes[data["root"]].get("inputs", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"{lock_path} is not a readable flake.lock: {exc!r}"]
    problems = []
    for i in config.inputs:
        node_name = root.get(i.input)
        if not isinstance(node_name, str) or node_name not in nodes:
            problems.append(f"{i.input}: not locked in {lock_path}")
            continue
        locked = nodes[node_name].get("locked") or {}
        if locked.get("rev") != i.rev:
            problems.append(
                f"{i.input}: locked at {locked.get('rev') or '?'}, "
                f"lockgen/data/nix.toml pins {i.rev}"
            )
        if i.nar_hash and locked.get("narHash") != i.nar_hash:
            problems.append(
                f"{i.input}: narHash {locked.get('narHash') or '?'} is not the "
                f"{i.nar_hash} lockgen/data/nix.toml records for {i.rev[:12]}"
            )
    return problems

"""``lockgen flake``: write (or check) ``flake.nix`` at the repository root.

``generate(matrix, nix_config=None) -> str`` renders the flake (see
:mod:`lockgen.render.nix`); ``default_flake_path(matrix)`` is ``flake.nix`` beside the
``envs/`` folder; ``write_flake`` writes it only when the text changed; ``stale`` says
whether a committed file differs from what the matrix gives now; ``lock_problems`` whether a
``flake.lock`` (written by a networked Nix) locks every nixpkgs input at the commit and
narHash ``envs/nix.toml`` pins.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from lockgen.matrix import Matrix
from lockgen.render.nix import NixConfig, load_nix_config, render_flake


def default_flake_path(matrix: Matrix) -> Path:
    return Path(matrix.path).resolve().parent.parent / "flake.nix"


def generate(matrix: Matrix, nix_config: NixConfig | str | Path | None = None) -> str:
    if not isinstance(nix_config, NixConfig):
        nix_config = load_nix_config(nix_config, matrix)
    return render_flake(matrix, nix_config)


def write_flake(path: Path, text: str) -> bool:
    """Write ``text`` to ``path``; False when it already held exactly that."""
    if path.exists() and path.read_text() == text:
        return False
    path.write_text(text)
    return True


def stale(path: Path, text: str) -> str | None:
    """None when ``path`` holds ``text``; else a short unified diff (or 'missing')."""
    if not path.exists():
        return f"{path} is missing"
    current = path.read_text()
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
                f"{i.input}: locked at {locked.get('rev') or '?'}, envs/nix.toml pins {i.rev}"
            )
        if i.nar_hash and locked.get("narHash") != i.nar_hash:
            problems.append(
                f"{i.input}: narHash {locked.get('narHash') or '?'} is not the "
                f"{i.nar_hash} envs/nix.toml records for {i.rev[:12]}"
            )
    return problems

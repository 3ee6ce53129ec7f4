"""``lockgen flake``: write (or check) ``flake.nix`` at the repository root.

``generate(matrix, nix_config=None) -> str`` renders the flake (see
:mod:`lockgen.render.nix`); ``default_flake_path(matrix)`` is ``flake.nix`` beside the
``envs/`` folder; ``write_flake`` writes it only when the text changed; ``stale`` says
whether a committed file differs from what the matrix gives now.
"""

from __future__ import annotations

import difflib
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

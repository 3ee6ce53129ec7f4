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
import stat
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


# a flake.lock of a few inputs is a few KiB; nixpkgs' own has under 100 nodes
MAX_FLAKE_LOCK_BYTES = 4 * 1024 * 1024


def _read_flake_lock(lock_path: Path) -> tuple[dict, dict]:
    """``(nodes, root inputs)`` of a flake.lock; :class:`LockgenError` in one line if not."""
    try:
        st = lock_path.stat()
    except OSError as exc:
        raise LockgenError(f"cannot read {lock_path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise LockgenError(f"{lock_path} is not a regular file: give a flake.lock")
    if st.st_size > MAX_FLAKE_LOCK_BYTES:
        raise LockgenError(
            f"{lock_path} is {st.st_size} bytes; a flake.lock is at most "
            f"{MAX_FLAKE_LOCK_BYTES} bytes"
        )
    try:
        with lock_path.open("rb") as f:
            raw = f.read(MAX_FLAKE_LOCK_BYTES + 1)
        data = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise LockgenError(f"cannot read {lock_path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise LockgenError(f"{lock_path} is not UTF-8 text: not a flake.lock") from None
    except RecursionError:
        raise LockgenError(f"{lock_path} nests too deeply: not a flake.lock") from None
    except ValueError as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LockgenError(f"{lock_path} is not JSON ({why[:120]}): not a flake.lock") from None
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
        raise LockgenError(f"{lock_path} has no 'nodes' table: not a flake.lock")
    nodes, root_name = data["nodes"], data.get("root")
    if not isinstance(root_name, str) or not isinstance(nodes.get(root_name), dict):
        raise LockgenError(f"{lock_path} names no root node in 'nodes': not a flake.lock")
    inputs = nodes[root_name].get("inputs", {})
    if not isinstance(inputs, dict):
        raise LockgenError(f"{lock_path}: the root node's 'inputs' is not a table")
    return nodes, inputs


def _shown(value: object) -> str:
    """A locked field as one short line: the text itself, or what kind of value it is."""
    if isinstance(value, str) and value.isprintable() and 0 < len(value) <= 100:
        return value
    if isinstance(value, str) and value:
        return f"(a {len(value)}-character string)"
    return "?" if value in (None, "") else f"(a JSON {type(value).__name__}, not a string)"


def lock_problems(config: NixConfig, lock_path: Path) -> list[str]:
    """What is wrong with ``flake.lock`` against the pins of ``config`` (empty: nothing);
    :class:`LockgenError` when it is not a readable flake.lock at all."""
    nodes, root = _read_flake_lock(Path(lock_path))
    problems = []
    for i in config.inputs:
        node_name = root.get(i.input)
        if not isinstance(node_name, str) or node_name not in nodes:
            problems.append(f"{i.input}: not locked in {lock_path}")
            continue
        locked = nodes[node_name].get("locked") if isinstance(nodes[node_name], dict) else None
        if not isinstance(locked, dict):
            problems.append(f"{i.input}: node {node_name!r} has no 'locked' table")
            continue
        if locked.get("rev") != i.rev:
            problems.append(
                f"{i.input}: locked at {_shown(locked.get('rev'))}, "
                f"lockgen/data/nix.toml pins {i.rev}"
            )
        if i.nar_hash and locked.get("narHash") != i.nar_hash:
            problems.append(
                f"{i.input}: narHash {_shown(locked.get('narHash'))} is not the "
                f"{i.nar_hash} lockgen/data/nix.toml records for {i.rev[:12]}"
            )
    return problems

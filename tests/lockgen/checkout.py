"""Where lockgen's tests find this checkout's files: the facts (lockgen's package data, one
copy) and the generated environments committed in ``envs/``."""

from __future__ import annotations

import shutil
from pathlib import Path

from lockgen.load import DATA_DIR

REPO = Path(__file__).resolve().parents[2]
ENVS = REPO / "envs"  # generated and committed: specs, locks, uv projects
FACTS = DATA_DIR  # matrix.toml, targets.toml, gpus.toml, nix.toml


def envs_with_facts(dst: Path) -> Path:
    """A copy of ``envs/`` with the facts beside the generated files (what ``LOCKGEN_ENVS`` or
    ``--matrix`` may point at), free to edit."""
    shutil.copytree(ENVS, dst)
    for fact in FACTS.glob("*.toml"):
        shutil.copy(fact, dst / fact.name)
    return dst

"""`lockgen targets`: what a user can install now per target and installer, and how."""

from __future__ import annotations

import io
import json

from checkout import ENVS

from lockgen.cli import main
from lockgen.routes import LOCKED, NO_LOCK, NONE, nix_shells, routes


def _routes(matrix, name, envs=ENVS):
    shells, why = nix_shells(matrix)
    return {r.flavor: r for r in routes(matrix, matrix.target(name), envs, shells, why)}


def test_a_pypi_served_target_is_locked_for_pip_uv_and_nix(matrix):
    r = _routes(matrix, "cu130")
    assert r["pip"].status == LOCKED
    assert r["pip"].command == "pip install --require-hashes -r envs/cu130.requirements.txt"
    assert r["uv"].status == LOCKED
    assert r["uv"].command == "uv sync --locked --project envs/uv/cu130"
    assert r["nix"].status == LOCKED and r["nix"].command == "GPUFIT_INSTALL=1 nix develop .#cu130"
    assert r["conda"].status == NONE
    assert "conda-forge's builds in the matrix end at torch 2.13" in r["conda"].note


def test_a_wheel_index_target_says_the_lock_needs_the_workflow(matrix):
    r = _routes(matrix, "cu126")
    assert r["pip"].status == NO_LOCK
    assert r["pip"].command == (
        "pip install torch==2.14.1 torchvision==0.29.1 "
        "--index-url https://download.pytorch.org/whl/cu126"
    )
    assert r["pip"].lock.startswith(".github/workflows/lock.yml")
    assert r["uv"].status == NO_LOCK and r["uv"].command == "uv sync --project envs/uv/cu126"
    assert r["nix"].status == NO_LOCK and "needs the pip lock" in r["nix"].note


def test_a_conda_target_gives_the_conda_lock_commands(matrix):
    r = _routes(matrix, "cu129")
    assert r["conda"].status == NO_LOCK
    assert r["conda"].command.startswith("conda-lock lock -f envs/cu129.yml --virtual-package-spec")
    assert "conda-lock install -n gpufit-cu129 envs/cu129.lock" in r["conda"].command


def test_statuses_follow_the_files_in_envs(matrix, tmp_path):
    r = _routes(matrix, "cu130", tmp_path)
    assert r["pip"].status == NO_LOCK and r["pip"].lock == "lockgen lock cu130 --flavor pip"
    assert r["pip"].command == "pip install torch==2.14.1 torchvision==0.29.1"
    assert r["uv"].status == NONE and "lockgen render cu130" in r["uv"].note
    (tmp_path / "cu129.lock").write_text("x")
    assert _routes(matrix, "cu129", tmp_path)["conda"].status == LOCKED


def test_cli_targets_table_and_json(matrix):
    out = io.StringIO()
    assert main(["targets"], out=out) == 0
    text = out.getvalue()
    for t in matrix.targets.values():
        assert f"\n{t.name}: torch {t.torch} " in "\n" + text
    assert "  pip    locked   pip install --require-hashes -r envs/cu124.requirements.txt" in text
    assert "  conda  none     no conda channel:" in text
    out = io.StringIO()
    assert main(["targets", "--format", "json"], out=out) == 0
    data = {t["name"]: t for t in json.loads(out.getvalue())}
    assert set(data) == set(matrix.targets)
    assert data["cu130"]["install"]["uv"] == {
        "status": "locked",
        "command": "uv sync --locked --project envs/uv/cu130",
        "lock": None,
        "note": None,
    }
    assert data["cu130"]["pythons"] == ["3.10", "3.11", "3.12", "3.13", "3.14"]
    assert data["cu130"]["arch_lists"]["linux-aarch64"][-1] == "12.0+PTX"


def test_the_readme_table_says_what_lockgen_targets_says(matrix):
    """The README's per-target table is the `lockgen targets` statuses, row for row."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells[3:]
    assert set(rows) == set(matrix.targets)
    word = {LOCKED: "locked", NO_LOCK: "no lock", NONE: "—"}
    for name in matrix.targets:
        want = [word[r.status] for r in _routes(matrix, name).values()]
        assert rows[name] == want, name

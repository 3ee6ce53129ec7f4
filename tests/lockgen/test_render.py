"""lockgen render: conda-lock inputs per target, refusal of unsupplied builds, atomic writes."""

from __future__ import annotations

import dataclasses
import io
import os

import pytest
import yaml

from lockgen.atomic import atomic_write_text
from lockgen.cli import main
from lockgen.matrix import ArchList
from lockgen.render.conda import (
    SUPPLIED,
    UNAVAILABLE,
    UNKNOWN,
    RenderRefused,
    channel_support,
    env_specs,
    env_yml_text,
    normalise_spec,
    render_target,
    target_paths,
    virtual_packages_text,
)
from lockgen.versions import Capability, Version


def test_env_yml_pins_the_cuda_build_and_the_cuda_version(matrix):
    cu130 = yaml.safe_load(env_yml_text(matrix, matrix.target("cu130")))
    assert cu130["channels"] == ["conda-forge"]
    assert cu130["platforms"] == ["linux-64"]
    deps = cu130["dependencies"]
    assert "pytorch ==2.14.1 cuda*" in deps
    assert "cuda-version 13.0.*" in deps
    assert "python 3.11.*" in deps
    assert {"numpy", "ninja", "pip"} <= set(deps)
    cu121 = yaml.safe_load(env_yml_text(matrix, matrix.target("cu121")))
    assert cu121["channels"] == ["pytorch", "nvidia", "defaults"]
    assert "pytorch 2.5.* *cuda*" in cu121["dependencies"]
    assert "pytorch-cuda 12.1.*" in cu121["dependencies"]
    cpu = env_specs(matrix.target("cpu"))
    assert "pytorch ==2.14.1 cpu*" in cpu
    assert not any(s.startswith("cuda-version") for s in cpu)


def test_every_target_pins_pytorch_by_build(matrix):
    for t in matrix.targets.values():
        torch = next(s for s in env_specs(t) if s.startswith("pytorch "))
        assert len(torch.split()) == 3, torch
        assert ("cpu" if t.is_cpu else "cuda") in torch.split()[2]


def test_normalise_spec_makes_bare_versions_exact():
    assert normalise_spec("pytorch 2.14.1 cuda*") == "pytorch ==2.14.1 cuda*"
    assert normalise_spec("pytorch 2.5.* *cuda*") == "pytorch 2.5.* *cuda*"
    assert normalise_spec("numpy") == "numpy"


def test_virtual_packages_spec_is_conda_locks_format(matrix):
    from lockgen.lockfile import _require_conda_lock

    _require_conda_lock()
    from conda_lock.virtual_package import VirtualPackageSpec

    data = yaml.safe_load(virtual_packages_text(matrix.target("cu121")))
    spec = VirtualPackageSpec.model_validate(data)
    pkgs = spec.subdirs["linux-64"].packages
    assert pkgs["__cuda"] == "12.1" and pkgs["__glibc"] == "2.28"
    cpu = yaml.safe_load(virtual_packages_text(matrix.target("cpu")))
    assert "__cuda" not in cpu["subdirs"]["linux-64"]["packages"]


def test_conda_lock_reads_the_rendered_env_file(matrix, tmp_path):
    from lockgen.lockfile import lock_spec

    render_target(matrix, matrix.target("cu121"), tmp_path)
    spec = lock_spec(target_paths(tmp_path, "cu121").env)
    deps = {d.name: d for d in spec.dependencies["linux-64"]}
    assert deps["pytorch"].build == "*cuda*" and deps["pytorch"].version == "2.5.*"
    assert [c.url for c in spec.channels] == ["pytorch", "nvidia", "defaults"]


def test_channel_support_from_the_matrix_facts(matrix):
    assert channel_support(matrix, matrix.target("cu121")).status == SUPPLIED
    assert channel_support(matrix, matrix.target("cpu")).status == SUPPLIED
    s = channel_support(matrix, matrix.target("cu130"))
    assert s.status == UNKNOWN and "conda-forge" in s.reason


def _with_cf_facts(matrix, torch_minor, cudas):
    facts = ArchList(
        "conda-forge",
        tuple(Version.parse(c) for c in cudas),
        Version.parse(torch_minor),
        Version.parse(torch_minor),
        ("linux-64",),
        (Capability.parse("8.0"),),
        ("cf-feedstock",),
        True,
    )
    return dataclasses.replace(matrix, arch_lists=(*matrix.arch_lists, facts))


def test_render_refuses_a_build_the_channel_does_not_make(matrix, tmp_path):
    m = _with_cf_facts(matrix, "2.14", ["12.9", "13.0"])
    assert channel_support(m, m.target("cu130")).status == SUPPLIED
    cu126 = m.target("cu126")
    s = channel_support(m, cu126)
    assert s.status == UNAVAILABLE
    assert "CUDA 12.9, 13.0" in s.reason and "not CUDA 12.6" in s.reason
    with pytest.raises(RenderRefused, match="cannot supply the CUDA 12.6 build"):
        render_target(m, cu126, tmp_path, allow_unverified=True)
    assert not list(tmp_path.iterdir())


def test_render_refuses_unknown_unless_allowed(matrix, tmp_path):
    with pytest.raises(RenderRefused, match="--allow-unverified"):
        render_target(matrix, matrix.target("cu130"), tmp_path)
    paths = render_target(matrix, matrix.target("cu130"), tmp_path, allow_unverified=True)
    assert "# UNVERIFIED CHANNEL:" in paths[0].read_text()


def test_cli_render_all_reports_refusals(matrix, tmp_path):
    out = io.StringIO()
    rc = main(["render", "--all", "--envs", str(tmp_path)], out=out)
    assert rc == 1
    text = out.getvalue()
    assert "refused cu130" in text and "wrote" in text
    assert (tmp_path / "cu121.yml").exists() and not (tmp_path / "cu130.yml").exists()
    out = io.StringIO()
    assert main(["render", "--all", "--allow-unverified", "--envs", str(tmp_path)], out=out) == 0
    assert len(list(tmp_path.glob("*.yml"))) == 2 * len(matrix.targets)


def test_cli_render_needs_a_target_or_all(tmp_path):
    err = io.StringIO()
    assert main(["render", "--envs", str(tmp_path)], err=err) == 2
    assert "--all" in err.getvalue()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "x.lock"
    atomic_write_text(path, "old\n")

    def boom() -> str:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write_text(path, boom)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["x.lock"]
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["x.lock"]


def test_atomic_write_failure_during_replace(tmp_path, monkeypatch):
    path = tmp_path / "x.lock"
    atomic_write_text(path, "old\n")

    def fail(*_a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["x.lock"]


def test_committed_specs_match_the_matrix(matrix):
    """envs/<target>.yml and its virtual packages, where committed, are what render writes
    now: a matrix or targets change must be re-rendered (and re-locked)."""
    from lockgen.matrix import default_envs_dir
    from lockgen.render.conda import rendered_is_current

    envs = default_envs_dir()
    committed = [t for t in matrix.targets.values() if (envs / f"{t.name}.yml").exists()]
    for t in committed:
        assert rendered_is_current(matrix, t, envs) == [], t.name


def test_committed_pip_locks_verify(matrix):
    from lockgen.matrix import default_envs_dir
    from lockgen.verify import verify_file

    for path in sorted(default_envs_dir().glob("*.requirements.txt")):
        report = verify_file(path, matrix)
        assert report.ok, report.format()

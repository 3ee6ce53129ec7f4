"""lockgen render: conda-lock inputs per target, refusal of unsupplied builds, atomic writes."""

from __future__ import annotations

import dataclasses
import io
import os

import pytest
import yaml
from checkout import ENVS, FACTS

from lockgen.cli import main
from lockgen.formats.conda import (
    NO_CHANNEL,
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
from lockgen.matrix import ArchList
from lockgen.output import CannotWrite, write_text
from lockgen.provenance import Provenance
from lockgen.versions import Capability, Version


def test_env_yml_pins_the_cuda_build_and_the_cuda_version(matrix, conda_matrix):
    cu129 = yaml.safe_load(env_yml_text(matrix, matrix.target("cu129")))
    assert cu129["channels"] == ["conda-forge"]
    assert cu129["platforms"] == ["linux-64"]
    deps = cu129["dependencies"]
    assert "pytorch ==2.8.0 cuda129*" in deps and "torchvision ==0.23.0 cuda129*" in deps
    assert "cuda-version 12.9.*" in deps
    assert "python 3.11.*" in deps
    assert {"numpy", "ninja", "pip"} <= set(deps)
    cu121 = yaml.safe_load(env_yml_text(matrix, matrix.target("cu121")))
    assert cu121["channels"] == ["pytorch", "nvidia", "defaults"]
    assert "pytorch ==2.5.1 *cuda12.1*" in cu121["dependencies"]
    assert "pytorch-cuda 12.1.*" in cu121["dependencies"]
    cpu = env_specs(conda_matrix.target("cpu-conda"))
    assert "pytorch ==2.8.0 cpu*" in cpu
    assert not any(s.startswith("cuda-version") for s in cpu)


def test_every_conda_target_pins_pytorch_by_build(matrix):
    conda = [t for t in matrix.targets.values() if t.has_conda]
    assert {t.name for t in conda} == {"cu118", "cu121", "cu124", "cu129"}
    for t in conda:
        torch = next(s for s in env_specs(t) if s.startswith("pytorch "))
        assert len(torch.split()) == 3, torch
        assert f"cuda{t.cuda}" in torch or f"cuda{t.cuda.raw.replace('.', '')}" in torch


def test_a_target_without_a_conda_channel_has_no_conda_env(matrix, tmp_path):
    s = channel_support(matrix, matrix.target("cu130"))
    assert s.status == NO_CHANNEL
    assert "conda-forge's builds in the matrix end at torch 2.13" in s.reason
    assert "pytorch ends at torch 2.5" in s.reason
    s = channel_support(matrix, matrix.target("cu128"))
    assert "conda-forge builds torch 2.8 on linux-64 for CUDA 12.9" in s.reason
    with pytest.raises(RenderRefused, match="cu130 has no conda channel"):
        render_target(matrix, matrix.target("cu130"), tmp_path)
    assert not list(tmp_path.iterdir())


def test_normalise_spec_makes_bare_versions_exact():
    assert normalise_spec("pytorch 2.14.1 cuda*") == "pytorch ==2.14.1 cuda*"
    assert normalise_spec("pytorch 2.5.* *cuda*") == "pytorch 2.5.* *cuda*"
    assert normalise_spec("numpy") == "numpy"


def test_virtual_packages_spec_is_conda_locks_format(matrix):
    from lockgen.formats.conda import _require_conda_lock

    _require_conda_lock()
    from conda_lock.virtual_package import VirtualPackageSpec

    data = yaml.safe_load(virtual_packages_text(matrix.target("cu121")))
    spec = VirtualPackageSpec.model_validate(data)
    pkgs = spec.subdirs["linux-64"].packages
    assert pkgs["__cuda"] == "12.1" and pkgs["__glibc"] == "2.28"
    cpu = yaml.safe_load(virtual_packages_text(matrix.target("cpu")))
    assert "__cuda" not in cpu["subdirs"]["linux-64"]["packages"]


def test_conda_lock_reads_the_rendered_env_file(matrix, tmp_path):
    from lockgen.formats.conda import lock_spec

    render_target(matrix, matrix.target("cu121"), tmp_path)
    spec = lock_spec(target_paths(tmp_path, "cu121").env)
    deps = {d.name: d for d in spec.dependencies["linux-64"]}
    assert deps["pytorch"].build == "*cuda12.1*" and deps["pytorch"].version == "==2.5.1"
    assert [c.url for c in spec.channels] == ["pytorch", "nvidia", "defaults"]


def test_channel_support_from_the_matrix_facts(matrix, conda_matrix):
    assert channel_support(matrix, matrix.target("cu121")).status == SUPPLIED
    assert channel_support(matrix, matrix.target("cu129")).status == SUPPLIED
    assert channel_support(conda_matrix, conda_matrix.target("cpu-conda")).status == SUPPLIED
    # conda-forge's facts end at 2.13: a 2.14 build on it is not known either way
    cf = dataclasses.replace(matrix.target("cu130"), conda_channel=matrix.channel("conda-forge"))
    s = channel_support(matrix, cf)
    assert s.status == UNKNOWN and "conda-forge" in s.reason
    # ... and conda-forge never built CUDA 12.8 for Linux (12.9 from 2.7.1 on)
    cf128 = dataclasses.replace(matrix.target("cu128"), conda_channel=matrix.channel("conda-forge"))
    s = channel_support(matrix, cf128)
    assert s.status == UNAVAILABLE and "CUDA 12.9 on linux-64, not CUDA 12.8" in s.reason


def _with_cf_facts(matrix, torch_minor, cudas):
    facts = ArchList(
        channel="conda-forge",
        cuda=tuple(Version.parse(c) for c in cudas),
        torch_min=Version.parse(torch_minor),
        torch_max=Version.parse(torch_minor),
        platforms=("linux-64", "linux-aarch64"),
        archs=(Capability.parse("8.0"),),
        provenance=Provenance(("cf-feedstock",), True),
    )
    return dataclasses.replace(matrix, arch_lists=(*matrix.arch_lists, facts))


def _on_conda_forge(matrix, name):
    return dataclasses.replace(matrix.target(name), conda_channel=matrix.channel("conda-forge"))


def test_render_refuses_a_build_the_channel_does_not_make(matrix, tmp_path):
    m = _with_cf_facts(matrix, "2.14", ["12.9", "13.0"])
    assert channel_support(m, _on_conda_forge(m, "cu130")).status == SUPPLIED
    cu126 = _on_conda_forge(m, "cu126")
    s = channel_support(m, cu126)
    assert s.status == UNAVAILABLE
    assert "CUDA 12.9, 13.0" in s.reason and "not CUDA 12.6" in s.reason
    with pytest.raises(RenderRefused, match="cannot supply the CUDA 12.6 build"):
        render_target(m, cu126, tmp_path, allow_unverified=True)
    assert not list(tmp_path.iterdir())


def test_render_refuses_unknown_unless_allowed(matrix, tmp_path):
    cu130 = _on_conda_forge(matrix, "cu130")
    with pytest.raises(RenderRefused, match="--allow-unverified"):
        render_target(matrix, cu130, tmp_path)
    paths = render_target(matrix, cu130, tmp_path, allow_unverified=True)
    assert "# UNVERIFIED CHANNEL:" in paths[0].read_text()


def test_cli_render_all_writes_every_flavor_of_every_target(matrix, tmp_path):
    out = io.StringIO()
    assert main(["render", "--all", "--envs", str(tmp_path)], out=out) == 0
    conda = {n for n, t in matrix.targets.items() if t.has_conda}
    assert {p.name for p in tmp_path.glob("*.yml")} == {
        f"{n}{ext}" for n in conda for ext in (".yml", ".virtual-packages.yml")
    }
    assert {p.parent.name for p in tmp_path.glob("uv/*/pyproject.toml")} == set(matrix.targets)
    assert "refused" not in out.getvalue()
    out = io.StringIO()
    assert main(["render", "--all", "--flavor", "conda", "--envs", str(tmp_path)], out=out) == 0
    assert "skipped cu130: no conda channel" in out.getvalue()


def test_cli_render_all_reports_refusals(tmp_path):
    """A conda channel the matrix says cannot make the build is refused even with
    --allow-unverified; one it has no facts for only without it."""
    text = (FACTS / "targets.toml").read_text()
    for name in ("cu128", "cu130"):
        block = f"[target.{name}]"
        head, _, tail = text.partition(block)
        tail = tail.replace(
            'platforms = ["linux-64', 'conda_channel = "conda-forge"\nplatforms = ["linux-64', 1
        )
        text = head + block + tail
    targets = tmp_path / "targets.toml"
    targets.write_text(text)
    envs = tmp_path / "envs"
    for extra, refused in (([], {"cu128", "cu130"}), (["--allow-unverified"], {"cu128"})):
        out = io.StringIO()
        rc = main(
            ["--targets", str(targets), "render", "--all", "--envs", str(envs), *extra], out=out
        )
        assert rc == 1
        lines = out.getvalue().splitlines()
        assert {ln.split()[1] for ln in lines if ln.startswith("refused")} == refused
        assert (envs / "cu121.yml").exists() and not (envs / "cu128.yml").exists()


def test_cli_render_needs_a_target_or_all(tmp_path):
    err = io.StringIO()
    assert main(["render", "--envs", str(tmp_path)], err=err) == 2
    assert "--all" in err.getvalue()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "x.lock"
    write_text(path, "old\n")

    def boom() -> str:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_text(path, boom)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["x.lock"]
    write_text(path, "new\n")
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["x.lock"]


def test_atomic_write_failure_during_replace(tmp_path, monkeypatch):
    path = tmp_path / "x.lock"
    write_text(path, "old\n")

    def fail(*_a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(CannotWrite, match="cannot write .*x.lock: disk full"):
        write_text(path, "new\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["x.lock"]


def test_committed_specs_match_the_matrix(matrix):
    """envs/<target>.yml and its virtual packages, where committed, are what render writes
    now: a matrix or targets change must be re-rendered (and re-locked)."""
    from lockgen.formats.conda import rendered_is_current

    envs = ENVS
    conda = [t for t in matrix.targets.values() if t.has_conda]
    for t in conda:
        assert rendered_is_current(matrix, t, envs) == [], t.name
    # no spec of a target (or a conda env) that no longer exists
    assert {p.name for p in envs.glob("*.yml")} == {
        f"{t.name}{ext}" for t in conda for ext in (".yml", ".virtual-packages.yml")
    }


def test_committed_pip_locks_verify(matrix):
    from lockgen.verify import verify_file

    for path in sorted(ENVS.glob("*.requirements.txt")):
        report = verify_file(path, matrix)
        assert report.ok, report.format()

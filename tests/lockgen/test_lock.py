"""lockgen lock against a tiny local conda channel built in the test (no network)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from checkout import ENVS
from conda_channel import build_channel, render_and_lock

from lockgen.cli import main
from lockgen.formats import conda as lf
from lockgen.formats.conda import render_target, target_paths
from lockgen.solve import CondaLockSolver, RattlerSolver, SolveError, SolveJob, lock_target


@pytest.fixture(scope="module")
def matrix(conda_matrix):
    return conda_matrix


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    return build_channel(tmp_path_factory.mktemp("channel"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("rattler-cache")


@pytest.fixture(scope="module")
def locked(matrix, channel, cache, tmp_path_factory):
    envs = tmp_path_factory.mktemp("envs")
    return envs, render_and_lock(matrix, envs, channel, cache)


def _pkgs(lock, platform="linux-64"):
    return {p.name: p for p in lock.package if p.platform == platform}


def test_every_target_gets_its_cuda_build(matrix, locked):
    envs, results = locked
    assert set(results) == {n for n, t in matrix.targets.items() if t.has_conda}
    for name, res in results.items():
        t = matrix.target(name)
        assert res.path == envs / f"{name}.lock" and res.path.exists()
        assert res.report.ok, res.report.format()
        pkgs = _pkgs(lf.read_lockfile(res.path))
        build = pkgs["pytorch"].build
        if t.is_cpu:
            assert build.startswith("cpu_")
        elif t.conda_channel.name == "pytorch":
            assert f"_cuda{t.cuda}_" in build
            assert pkgs["pytorch-cuda"].version == t.cuda.raw
            assert pkgs["torchvision"].build == f"py311_{t.tag}"
        else:
            assert build.startswith(f"cuda{t.tag[2:]}_")
            assert pkgs["cuda-version"].version == t.cuda.raw
        assert {"python", "numpy", "ninja", "pip"} <= set(pkgs)


def test_lock_records_what_it_was_solved_for(locked):
    _envs, results = locked
    meta = lf.custom(lf.read_lockfile(results["cu121"].path))
    assert meta[lf.META_TARGET] == "cu121"
    assert meta[lf.META_CUDA] == "12.1"
    assert (
        lf.recorded_virtual_packages(lf.read_lockfile(results["cu121"].path))["linux-64"]["__cuda"]
        == "12.1"
    )
    assert lf.custom(lf.read_lockfile(results["cpu-conda"].path))[lf.META_CUDA] == ""


def test_content_hash_is_conda_locks(locked, channel):
    """The lock's hash is what conda-lock computes for the same env file, virtual packages
    and channels (computed here straight through conda-lock's API)."""
    from conda_lock.content_hash import compute_content_hashes
    from conda_lock.lookup import DEFAULT_MAPPING_URL
    from conda_lock.src_parser import make_lock_spec
    from conda_lock.virtual_package import virtual_package_repo_from_specification

    envs, results = locked
    paths = target_paths(envs, "cu129")
    spec = make_lock_spec(
        src_files=[paths.env], channel_overrides=[channel.as_uri()], mapping_url=DEFAULT_MAPPING_URL
    )
    want = compute_content_hashes(
        spec, virtual_package_repo_from_specification(paths.virtual_packages)
    )
    assert lf.read_lockfile(results["cu129"].path).metadata.content_hash == want


def _job(matrix, envs, channel, name, edit=None, vp=None):
    """A solve job for a target, optionally with the env file edited (trap experiments)."""
    paths = target_paths(envs, name)
    env = paths.env
    if edit:
        env = envs / f"{name}-edited.yml"
        env.write_text(edit(paths.env.read_text()))
    spec = lf.lock_spec(env, [channel.as_uri()])
    vps = vp or lf.read_virtual_packages(paths.virtual_packages)
    return SolveJob(name, spec, env, paths.virtual_packages, vps, (channel.as_uri(),))


CONDA_LOCK_DEFAULT_VP = {
    "linux-64": {
        "__unix": "0",
        "__linux": "5.10",
        "__glibc": "2.28",
        "__archspec": "1 x86_64",
        "__cuda": "11.4",
    }
}


def test_the_cpu_trap_is_real_without_the_build_pin(matrix, locked, channel, cache):
    """conda-forge style. Without the build pin, a solve on a machine without a GPU (no
    __cuda: what `conda-lock --without-cuda` or a GPU-less conda sees) quietly picks the CPU
    build next to cuda-version 12.9; so does conda-lock's default __cuda=11.4 when the spec
    names no cuda-version. With the pin each is an error that names __cuda."""
    envs, _ = locked
    solver = RattlerSolver(cache_dir=cache)
    no_gpu = {
        "linux-64": {k: v for k, v in CONDA_LOCK_DEFAULT_VP["linux-64"].items() if k != "__cuda"}
    }

    def unpin(s):
        return s.replace("pytorch ==2.8.0 cuda129*", "pytorch ==2.8.0").replace(" cuda129*", "")

    pkgs = {
        p.name: p
        for p in solver.solve(_job(matrix, envs, channel, "cu129", edit=unpin, vp=no_gpu))[
            "linux-64"
        ]
    }
    assert pkgs["pytorch"].build.startswith("cpu_")
    assert pkgs["cuda-version"].version == "12.9"

    no_selector = lambda s: unpin(s).replace("cuda-version 12.9.*", "ninja")  # noqa: E731
    pkgs = {
        p.name: p
        for p in solver.solve(
            _job(matrix, envs, channel, "cu129", edit=no_selector, vp=CONDA_LOCK_DEFAULT_VP)
        )["linux-64"]
    }
    assert pkgs["pytorch"].build.startswith("cpu_")

    for vp in (no_gpu, CONDA_LOCK_DEFAULT_VP):
        with pytest.raises(SolveError, match=r"__cuda"):
            solver.solve(_job(matrix, envs, channel, "cu129", vp=vp))


def test_cuda_star_alone_admits_a_neighbouring_cuda_build(matrix, locked, channel, cache):
    """conda-forge builds of one release for CUDA 12.8 and 12.9 both accept cuda-version
    12.9 (they ask for >=12.8,<13 and >=12.9,<13): `pytorch * cuda*` may take the 12.8 one.
    The target's own variant glob (cuda129*) cannot."""
    envs, _ = locked
    solver = RattlerSolver(cache_dir=cache)

    def any_cuda(s):
        return s.replace("cuda129*", "cuda*")

    pkgs = {
        p.name: p
        for p in solver.solve(_job(matrix, envs, channel, "cu129", edit=any_cuda))["linux-64"]
    }
    assert pkgs["cuda-version"].version == "12.9"
    assert pkgs["pytorch"].build.startswith("cuda128_")
    pinned = {p.name: p for p in solver.solve(_job(matrix, envs, channel, "cu129"))["linux-64"]}
    assert pinned["pytorch"].build.startswith("cuda129_")
    assert pinned["torchvision"].build.startswith("cuda129_")


def test_the_legacy_channel_trap_picks_cpu_even_with_cuda_present(matrix, locked, channel, cache):
    """pytorch+nvidia style: equal build numbers; without the build pin the CPU pytorch is
    chosen next to pytorch-cuda 12.1 although __cuda=12.1 is there."""
    envs, _ = locked
    job = _job(
        matrix,
        envs,
        channel,
        "cu121",
        edit=lambda s: s.replace("pytorch ==2.5.1 *cuda12.1*", "pytorch ==2.5.1"),
    )
    pkgs = {p.name: p for p in RattlerSolver(cache_dir=cache).solve(job)["linux-64"]}
    assert pkgs["pytorch"].build == "py3.11_cpu_0"
    assert pkgs["pytorch-cuda"].version == "12.1"


def test_conflict_explains_the_cuda_requirement(matrix, locked, channel, cache):
    envs, _ = locked
    vp = {"linux-64": {"__glibc": "2.28", "__cuda": "11.8"}}
    with pytest.raises(SolveError) as exc:
        RattlerSolver(cache_dir=cache).solve(_job(matrix, envs, channel, "cu129", vp=vp))
    msg = str(exc.value)
    assert "cu129" in msg and "linux-64" in msg and "__cuda=11.8" in msg
    assert "__cuda >=12" in msg


def test_failed_solve_leaves_the_previous_lock(matrix, locked, channel, cache, tmp_path):
    envs, results = locked
    target = matrix.target("cu121")
    render_target(matrix, target, tmp_path)
    path = target_paths(tmp_path, "cu121").lock
    path.write_text(results["cu121"].path.read_text())
    before = path.read_bytes()
    empty = build_channel(tmp_path / "empty-channel", packages=[])
    with pytest.raises(SolveError, match="no solution"):
        lock_target(
            matrix, target, tmp_path, RattlerSolver(cache_dir=cache), channels=[empty.as_uri()]
        )
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cu121.lock",
        "cu121.virtual-packages.yml",
        "cu121.yml",
        "empty-channel",
    ]


def test_interrupted_write_leaves_the_previous_lock(matrix, channel, cache, tmp_path, monkeypatch):
    target = matrix.target("cu121")
    render_target(matrix, target, tmp_path)
    path = target_paths(tmp_path, "cu121").lock
    path.write_text("previous\n")

    real = lf.lockfile_text
    calls = []

    def interrupted(lock, name):
        calls.append(name)
        if len(calls) == 2:  # the first call renders the verification copy
            raise KeyboardInterrupt
        return real(lock, name)

    monkeypatch.setattr(lf, "lockfile_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lock_target(
            matrix, target, tmp_path, RattlerSolver(cache_dir=cache), channels=[channel.as_uri()]
        )
    assert path.read_text() == "previous\n"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_lock_that_fails_verification_is_not_written(matrix, channel, cache, tmp_path):
    """A solver that returns a CPU pytorch for a CUDA target: verify refuses it."""
    target = matrix.target("cu129")
    render_target(matrix, target, tmp_path, allow_unverified=True)

    class CpuSolver(RattlerSolver):
        def solve(self, job):
            out = super().solve(job)
            job2 = _job(
                matrix,
                tmp_path,
                channel,
                "cu129",
                edit=lambda s: s.replace("cuda129*", "cpu*").replace(
                    "cuda-version 12.9.*", "numpy"
                ),
            )
            out["linux-64"] = super().solve(job2)["linux-64"]
            return out

    with pytest.raises(SolveError, match="CPU build"):
        lock_target(
            matrix,
            target,
            tmp_path,
            CpuSolver(cache_dir=cache),
            channels=[channel.as_uri()],
            allow_unverified=True,
        )
    assert not target_paths(tmp_path, "cu129").lock.exists()


def test_lock_refuses_stale_specs(matrix, channel, tmp_path):
    target = matrix.target("cu121")
    render_target(matrix, target, tmp_path)
    env = target_paths(tmp_path, "cu121").env
    env.write_text(env.read_text().replace("numpy", "numpy >=2"))
    with pytest.raises(Exception, match="lockgen render cu121"):
        lock_target(matrix, target, tmp_path, channels=[channel.as_uri()])


def test_conda_lock_render_reads_the_lock(locked, tmp_path):
    envs, results = locked
    lock = results["cu121"].path
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "conda_lock",
            "render",
            "-k",
            "explicit",
            "-p",
            "linux-64",
            "--filename-template",
            str(tmp_path / "out-{platform}.lock"),
            str(lock),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "out-linux-64.lock").read_text()
    assert "@EXPLICIT" in text
    assert "pytorch-2.5.1-py3.11_cuda12.1_cudnn9.1.0_0.tar.bz2#" in text


def test_conda_lock_engine_runs_conda_lock(matrix, locked, channel, tmp_path):
    """The conda-lock engine's command line, and its output taken as the solve (the fake
    runner stands in for conda-lock + micromamba by writing a lock)."""
    envs, results = locked
    seen = []

    def run(argv, env):
        seen.append(list(argv))
        out = argv[argv.index("--lockfile") + 1]
        with open(out, "w") as f:
            f.write(results["cu121"].path.read_text())
        return subprocess.CompletedProcess(argv, 0, "", "")

    solver = CondaLockSolver(conda="/opt/micromamba", run=run)
    job = _job(matrix, envs, channel, "cu121")
    pkgs = solver.solve(job)
    argv = seen[0]
    assert argv[argv.index("--conda") + 1] == "/opt/micromamba"
    assert argv[argv.index("-f") + 1] == str(job.env_file)
    assert argv[argv.index("--virtual-package-spec") + 1] == str(job.virtual_packages_file)
    assert argv[argv.index("--channel") + 1] == channel.as_uri()
    assert any(p.name == "pytorch" for p in pkgs["linux-64"])

    def failing(argv, env):
        return subprocess.CompletedProcess(
            argv, 1, "", "Could not solve: nothing provides __cuda >=12"
        )

    with pytest.raises(SolveError, match="__cuda >=12"):
        CondaLockSolver(conda="/opt/micromamba", run=failing).solve(job)


def test_conda_lock_engine_needs_an_executable(matrix, locked, channel, monkeypatch):
    import lockgen.solve as solve

    envs, _ = locked
    monkeypatch.setattr(solve, "find_conda_executable", lambda: None)
    with pytest.raises(Exception, match="conda, mamba or micromamba"):
        CondaLockSolver().solve(_job(matrix, envs, channel, "cu121"))


def test_cli_lock_with_local_channel(matrix, channel, cache, tmp_path):
    out = io.StringIO()
    assert main(["render", "cu124", "--envs", str(tmp_path)], out=out) == 0
    rc = main(
        [
            "lock",
            "cu124",
            "--envs",
            str(tmp_path),
            "--channel",
            channel.as_uri(),
            "--cache-dir",
            str(cache),
        ],
        out=out,
    )
    assert rc == 0, out.getvalue()
    assert "cu124.lock (target cu124): OK" in out.getvalue()
    err = io.StringIO()
    rc = main(
        ["lock", "cu130", "--envs", str(tmp_path), "--channel", channel.as_uri()], out=out, err=err
    )
    assert rc == 2 and "target cu130 has no conda channel" in err.getvalue()


def test_defaults_channel_is_expanded_for_rattler(matrix):
    """conda's `defaults` (needed by the legacy pytorch channel) is not a rattler channel name."""
    from lockgen import solve

    job = solve.prepare_job(matrix, matrix.target("cu121"), ENVS)
    assert "defaults" not in job.channels
    assert job.channels == ["pytorch", "nvidia", *solve.DEFAULTS_CHANNELS]

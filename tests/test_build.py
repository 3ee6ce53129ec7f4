"""The build's decisions (which toolkit, which architectures, CPU or CUDA) and a real nvcc
compile of every CUDA source, so CUDA code that does not compile fails here, GPU or not."""

import io
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

from gpufit import _build


def fake_toolkit(root: Path, release: str = "13.0", archs=("75", "80", "90", "100")) -> Path:
    """A folder that looks like a CUDA toolkit to _build: bin/nvcc answers the questions."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    compute = " ".join(f"compute_{a}" for a in archs)
    nvcc.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  --dryrun) echo "#\\$ TOP={root}/bin/.." >&2 ;;\n'
        f'  --version) echo "Cuda compilation tools, release {release}, V{release}.1" ;;\n'
        f"  --list-gpu-arch) for a in {compute}; do echo $a; done ;;\n"
        "esac\n"
    )
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return root


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("CUDA_HOME", "CUDA_PATH", "GPUFIT_FORCE_CPU", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    return monkeypatch


def test_wrapper_script_on_path_resolves_to_the_real_toolkit(tmp_path, clean_env):
    real = fake_toolkit(tmp_path / "cuda-13.0")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    wrapper = wrappers / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    clean_env.setenv("PATH", f"{wrappers}:{os.environ['PATH']}")
    root, how = _build.find_cuda_home()
    assert root == real.resolve()
    assert str(wrapper) in how


def test_cuda_home_is_honoured_and_checked(tmp_path, clean_env):
    real = fake_toolkit(tmp_path / "tk")
    clean_env.setenv("CUDA_HOME", str(real))
    assert _build.find_cuda_home()[0] == real.resolve()
    clean_env.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(_build.BuildConfigError, match="CUDA_HOME=.*has no bin/nvcc"):
        _build.find_cuda_home()


def test_force_cpu_wins(tmp_path, clean_env):
    clean_env.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "tk")))
    clean_env.setenv("GPUFIT_FORCE_CPU", "1")
    plan = _build.plan_build()
    assert not plan.with_cuda and "GPUFIT_FORCE_CPU" in plan.summary
    assert {p.suffix for p in _build.sources(plan.with_cuda)} == {".cpp"}


@pytest.mark.parametrize("with_cuda", [False, True])
def test_sources_hold_registration_and_autograd(with_cuda):
    # setup.py and the JIT build both compile this list: autograd lives in its own source
    names = {p.name for p in _build.sources(with_cuda)}
    assert {"registration.cpp", "autograd.cpp", "linear_relu.cpp", "linear_ce.cpp"} <= names


needs_cuda_torch = pytest.mark.skipif(
    torch.version.cuda is None, reason="needs a CUDA build of torch"
)


def no_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def fake_gpus(monkeypatch, *capabilities: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capabilities[i])


@needs_cuda_torch
def test_no_gpu_and_no_arch_list_builds_cpu_and_says_how_to_get_cuda(tmp_path, clean_env):
    # CUDA kernels for architectures this machine cannot run cost minutes and serve nobody
    clean_env.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "tk", torch.version.cuda)))
    no_gpu(clean_env)
    plan = _build.plan_build()
    assert not plan.with_cuda and plan.arch_list == ""
    assert {p.suffix for p in _build.sources(plan.with_cuda)} == {".cpp"}
    assert "no GPU visible" in plan.summary
    assert "TORCH_CUDA_ARCH_LIST=8.0 ./scripts/setup.sh" in plan.summary
    assert "\n" not in plan.summary  # one line


@needs_cuda_torch
def test_visible_gpus_select_only_their_own_archs(tmp_path, clean_env):
    clean_env.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "tk", torch.version.cuda)))
    fake_gpus(clean_env, (8, 0), (9, 0), (8, 0))
    plan = _build.plan_build()
    assert plan.with_cuda and plan.arch_list == "8.0;9.0"
    assert "the visible GPUs" in plan.summary


@needs_cuda_torch
def test_arch_list_wins_over_the_visible_gpus(tmp_path, clean_env):
    clean_env.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "tk", torch.version.cuda)))
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    fake_gpus(clean_env, (8, 0))
    assert _build.plan_build().arch_list == "9.0"


@needs_cuda_torch
@pytest.mark.parametrize(
    "arch_list, message",
    [
        ("7.0", "nvcc 13.0 cannot compile for 7.0 (it targets 7.5, 8.0, 9.0, 10.0)"),
        ("8.0;6.1+PTX", "cannot compile for 6.1"),
        ("8,0", "8,0 is not an architecture"),
        ("sm_80", "sm_80 is not an architecture"),
        (";", "names no architecture"),
    ],
)
def test_arch_list_nvcc_cannot_build_is_refused_before_building(
    tmp_path, clean_env, arch_list, message
):
    clean_env.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "tk", "13.0")))
    clean_env.setattr(torch.version, "cuda", "13.0")
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    with pytest.raises(_build.BuildConfigError, match="TORCH_CUDA_ARCH_LIST") as err:
        _build.plan_build()
    assert message in str(err.value)


@needs_cuda_torch
@pytest.mark.parametrize("arch_list", ["8.0", "7.5;9.0+PTX", "10.0 9.0a", "Ampere"])
def test_arch_lists_torch_accepts_are_kept(tmp_path, clean_env, arch_list):
    clean_env.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "tk", "13.0")))
    clean_env.setattr(torch.version, "cuda", "13.0")
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert _build.plan_build().arch_list == arch_list


@needs_cuda_torch
def test_explicit_arch_list_is_kept(tmp_path, clean_env):
    clean_env.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "tk", torch.version.cuda)))
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert _build.plan_build().arch_list == "8.0"


@needs_cuda_torch
def test_toolkit_major_mismatch_is_explained(tmp_path, clean_env):
    other = "12.4" if not torch.version.cuda.startswith("12") else "13.0"
    clean_env.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "tk", other)))
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    with pytest.raises(_build.BuildConfigError, match="majors must match.*GPUFIT_FORCE_CPU=1"):
        _build.plan_build()


def test_setup_py_refuses_a_bad_cuda_home_in_one_line(tmp_path):
    env = {**os.environ, "CUDA_HOME": str(tmp_path / "missing"), "TORCH_CUDA_ARCH_LIST": "8.0"}
    env.pop("GPUFIT_FORCE_CPU", None)
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"],
        cwd=_build.CSRC.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if torch.version.cuda is None:
        pytest.skip("a CPU torch never looks for a toolkit")
    assert result.returncode != 0
    assert "gpufit: cannot build: CUDA_HOME=" in result.stderr
    assert "Traceback" not in result.stderr


CUDA_SOURCES = sorted((_build.CSRC / "cuda").glob("*.cu"))


def _installed_build_compiled_the_cuda_sources() -> bool:
    """True when the compiled gpufit._C has CUDA kernels and was built after every file under
    csrc/ last changed: nvcc compiled these very sources then (as CI's build does)."""
    try:
        import gpufit._C as compiled
    except ImportError:
        return False
    if not compiled.with_cuda:
        return False
    built = Path(compiled.__file__).stat().st_mtime
    return all(p.stat().st_mtime <= built for p in _build.CSRC.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles_with_nvcc(source, tmp_path):
    """Compile for one architecture with the flags torch uses; no GPU needed. Where the
    installed build already compiled these sources with nvcc, that build was the test."""
    if _installed_build_compiled_the_cuda_sources():
        pytest.skip("the installed gpufit._C was compiled with nvcc from these same sources")
    cuda_home, _ = _build.find_cuda_home()
    includes = [*cpp_extension.include_paths(), str(_build.CSRC), sysconfig.get_paths()["include"]]
    cmd = [
        str(cuda_home / "bin" / "nvcc"),
        "-c",
        str(source),
        "-o",
        str(tmp_path / "out.o"),
        "-std=c++20",
        "-arch=sm_80",
        "--expt-relaxed-constexpr",
        "-Xcompiler",
        "-fPIC",
        *cpp_extension.COMMON_NVCC_FLAGS,
        *(f"-I{p}" for p in includes),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out.o").stat().st_size > 0


# ---------------------------------------------------------------- build progress


ROOT = _build.CSRC.parent


@pytest.mark.parametrize(
    "line, shown",
    [
        (
            f"  [2/6] c++ -MMD -MF x.o.d -O3 -I{ROOT}/csrc -c -c {ROOT}/csrc/linear_ce.cpp -o x.o",
            "[2/6] c++ csrc/linear_ce.cpp",
        ),
        (
            f"[5/6] /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile -c "
            f"{ROOT}/csrc/cuda/linear_ce.cu -o y.o -gencode=arch=compute_80,code=sm_80",
            "[5/6] nvcc csrc/cuda/linear_ce.cu",
        ),
        (
            "  gpufit: CPU-only build (GPUFIT_FORCE_CPU is set)",
            "CPU-only build (GPUFIT_FORCE_CPU is set)",
        ),
        ("  W1201 cpp_extension.py:183] No CUDA runtime is found", None),
        ("  writing top-level names to gpufit.egg-info/top_level.txt", None),
    ],
)
def test_progress_shows_compile_steps_and_the_plan_only(line, shown):
    assert _build.progress_line(line, ROOT) == shown


FAKE_BUILD = """
echo '  gpufit: CPU-only build (a test)'
echo 'noise that only the log keeps'
echo '  gpufit: CPU-only build (a test)'
echo "[1/2] c++ -c $1/csrc/a.cpp -o a.o"
sleep 1.5
echo "[2/2] c++ -c $1/csrc/b.cpp -o b.o"
"""


def test_watch_build_shows_progress_and_keeps_the_full_log(tmp_path):
    out = io.StringIO()
    log = tmp_path / "logs" / "build.log"
    status = _build.watch_build(["bash", "-c", FAKE_BUILD, "-", str(ROOT)], log, out, tick_s=0.3)
    assert status == 0
    shown = out.getvalue()
    assert shown.count("CPU-only build (a test)") == 1
    assert "[1/2] c++ csrc/a.cpp" in shown and "[2/2] c++ csrc/b.cpp" in shown
    assert "still running (1/2 compiled)" in shown  # the silent 1.5 s got elapsed-time lines
    assert "noise" not in shown and "done in" in shown and str(log) in shown
    assert "noise that only the log keeps" in log.read_text()


def test_watch_build_failure_shows_the_compiler_error(tmp_path):
    script = "echo ok; echo 'FAILED: x.o'; echo 'x.cpp:3: error: boom'; echo pip noise; exit 3"
    out = io.StringIO()
    status = _build.watch_build(["bash", "-c", script], tmp_path / "b.log", out, tick_s=5)
    assert status == 3
    shown = out.getvalue()
    assert "| x.cpp:3: error: boom" in shown and "| ok" not in shown
    assert "exit status 3" in shown and str(tmp_path / "b.log") in shown


def test_build_watcher_runs_as_a_script_without_torch(tmp_path):
    # scripts/setup.sh runs it by path with the venv's python, before anything is installed
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        f"sys.argv = ['_build.py', '--log', {str(tmp_path / 'l.log')!r}, '--', 'true']; "
        f"runpy.run_path({str(ROOT / 'gpufit' / '_build.py')!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "done in" in result.stdout

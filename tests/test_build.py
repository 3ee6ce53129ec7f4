"""The build's decisions (which toolkit, which architectures, CPU or CUDA) and a real nvcc
compile of every CUDA source, so CUDA code that does not compile fails here, GPU or not."""

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


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_arch_list_defaults_to_torch_archs_this_nvcc_knows(tmp_path, clean_env):
    clean_env.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "tk", torch.version.cuda)))
    if torch.cuda.is_available():
        pytest.skip("with a GPU the visible GPUs decide")
    plan = _build.plan_build()
    torch_archs = {a[3:] for a in torch.cuda.get_arch_list() if a.startswith("sm_")}
    expected = sorted(torch_archs & {"75", "80", "90", "100"}, key=int)
    assert plan.with_cuda
    assert plan.arch_list == ";".join(f"{int(a) // 10}.{int(a) % 10}" for a in expected) + "+PTX"
    assert "CUDA build" in plan.summary and plan.arch_list in plan.summary


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_explicit_arch_list_is_kept(tmp_path, clean_env):
    clean_env.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "tk", torch.version.cuda)))
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert _build.plan_build().arch_list == "8.0"


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_toolkit_major_mismatch_is_explained(tmp_path, clean_env):
    other = "12.4" if not torch.version.cuda.startswith("12") else "13.0"
    clean_env.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "tk", other)))
    with pytest.raises(_build.BuildConfigError, match="majors must match.*GPUFIT_FORCE_CPU=1"):
        _build.plan_build()


def test_setup_py_refuses_a_bad_cuda_home_in_one_line(tmp_path):
    env = {**os.environ, "CUDA_HOME": str(tmp_path / "missing")}
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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles_with_nvcc(source, tmp_path):
    """Compile for one architecture with the flags torch uses; no GPU needed."""
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

"""How to build gpufit's compiled operators: find the CUDA toolkit, pick architectures, list
sources and flags. Used by setup.py (ahead-of-time build) and by gpufit._backend (JIT build),
so both make the same decisions. Imports torch lazily and nothing from gpufit itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"


class BuildConfigError(RuntimeError):
    """The requested build cannot be made; the message says why and what to change."""


@dataclass(frozen=True)
class BuildPlan:
    with_cuda: bool
    summary: str
    cuda_home: Path | None = None
    cuda_version: str | None = None
    arch_list: str = ""  # TORCH_CUDA_ARCH_LIST form: "7.5;8.0;9.0+PTX"
    include_dirs: tuple[Path, ...] = (CSRC,)

    @property
    def arch_tag(self) -> str:
        """The arch list without separators that a shell would split on."""
        return self.arch_list.replace(";", ",")


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False).stdout


def _toolkit_root_from_nvcc(nvcc: str) -> Path | None:
    """The toolkit root of an nvcc, also when the nvcc on PATH is a wrapper script.

    nvcc's dry run prints the folder it really lives in (`#$ TOP=<root>/bin/..`), which is
    right where resolving the path of a wrapper script would land one level off.
    """
    out = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match:
        root = Path(match.group(1).strip()).resolve()
        if (root / "bin" / "nvcc").is_file():
            return root
    real = Path(nvcc).resolve()
    if real.parent.name == "bin" and (real.parent.parent / "include" / "cuda.h").is_file():
        return real.parent.parent
    return None


def find_cuda_home() -> tuple[Path | None, str]:
    """(toolkit root or None, how it was found or why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            root = Path(value)
            if not (root / "bin" / "nvcc").is_file():
                raise BuildConfigError(
                    f"{var}={value} has no bin/nvcc; point {var} at a CUDA toolkit root "
                    "(the folder holding bin/nvcc) or unset it"
                )
            return root.resolve(), f"{var}={value}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root_from_nvcc(nvcc)
        if root is not None:
            return root, f"nvcc on PATH ({nvcc} -> {root})"
    default = Path("/usr/local/cuda")
    if (default / "bin" / "nvcc").is_file():
        return default.resolve(), f"{default}"
    return None, "no nvcc on PATH, CUDA_HOME unset and no /usr/local/cuda"


def nvcc_version(cuda_home: Path) -> str:
    match = re.search(r"release (\d+\.\d+)", _run([str(cuda_home / "bin" / "nvcc"), "--version"]))
    if not match:
        raise BuildConfigError(f"cannot read the version of {cuda_home / 'bin' / 'nvcc'}")
    return match.group(1)


def nvcc_archs(cuda_home: Path) -> set[str]:
    """Compute capabilities this nvcc can compile for, as "8.0", "9.0", ..."""
    out = _run([str(cuda_home / "bin" / "nvcc"), "--list-gpu-arch"])
    return {f"{int(m) // 10}.{int(m) % 10}" for m in re.findall(r"compute_(\d+)", out)}


def _arch_key(arch: str) -> tuple[int, int]:
    major, minor = arch.split("+")[0].split(".")
    return int(major), int(minor)


def default_arch_list(cuda_home: Path) -> tuple[str, str]:
    """(TORCH_CUDA_ARCH_LIST, where it came from)."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available():
        caps = sorted(
            {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        )
        return ";".join(f"{a}.{b}" for a, b in caps), "the visible GPUs"
    # No GPU: the architectures this torch was built for, as far as this nvcc can target them.
    torch_archs = {
        f"{int(a[3:]) // 10}.{int(a[3:]) % 10}"
        for a in torch.cuda.get_arch_list()
        if a.startswith("sm_")
    }
    usable = sorted(torch_archs & nvcc_archs(cuda_home), key=_arch_key)
    if not usable:
        raise BuildConfigError(
            "no GPU is visible and this nvcc targets none of torch's architectures "
            f"({sorted(torch_archs)}); set TORCH_CUDA_ARCH_LIST, e.g. '8.0;9.0'"
        )
    usable[-1] += "+PTX"  # newer GPUs can JIT the PTX of the highest one
    return ";".join(usable), "torch's arch list (no GPU visible)"


def plan_build() -> BuildPlan:
    import torch

    if os.environ.get("GPUFIT_FORCE_CPU", "") not in ("", "0"):
        return BuildPlan(False, "CPU-only build (GPUFIT_FORCE_CPU is set)")
    if torch.version.cuda is None:
        return BuildPlan(False, f"CPU-only build (torch {torch.__version__} is a CPU build)")
    cuda_home, how = find_cuda_home()
    if cuda_home is None:
        return BuildPlan(False, f"CPU-only build ({how})")
    version = nvcc_version(cuda_home)
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise BuildConfigError(
            f"the CUDA toolkit at {cuda_home} is {version} but torch {torch.__version__} was "
            f"built with CUDA {torch.version.cuda}; the majors must match. Point CUDA_HOME at a "
            f"CUDA {torch.version.cuda.split('.')[0]}.x toolkit, or set GPUFIT_FORCE_CPU=1"
        )
    arch_list, arch_source = default_arch_list(cuda_home)
    return BuildPlan(
        True,
        f"CUDA build with nvcc {version} from {how}, archs {arch_list} (from {arch_source})",
        cuda_home=cuda_home,
        cuda_version=version,
        arch_list=arch_list,
    )


def apply(plan: BuildPlan) -> None:
    """Make torch.utils.cpp_extension use the plan's toolkit and architectures."""
    if not plan.with_cuda:
        return
    os.environ["CUDA_HOME"] = str(plan.cuda_home)
    os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = str(plan.cuda_home)  # read once at import time


def sources(with_cuda: bool) -> list[Path]:
    # CPU kernels, autograd and registration in csrc/, CUDA kernels in csrc/cuda/ (an op's .cpp
    # and .cu share a stem, and setuptools names objects by stem within a folder).
    found = sorted(CSRC.glob("*.cpp"))
    if with_cuda:
        found += sorted((CSRC / "cuda").glob("*.cu"))
    return found


def defines(plan: BuildPlan) -> list[str]:
    # The arch list goes in unquoted and is stringified in C++: no quoting survives both the
    # setuptools and the JIT ninja paths the same way.
    archs = plan.arch_tag or "none"
    return [f"-DGPUFIT_WITH_CUDA={int(plan.with_cuda)}", f"-DGPUFIT_CUDA_ARCHS_TOKENS={archs}"]


def compile_args(plan: BuildPlan) -> dict[str, list[str]]:
    args = {"cxx": ["-O3", *defines(plan)]}
    if plan.with_cuda:
        args["nvcc"] = ["-O3", "-lineinfo"]
    return args

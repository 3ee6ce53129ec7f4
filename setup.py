"""Build gpufit._C with torch.utils.cpp_extension.

Which build is made, in order:
  GPUFIT_FORCE_CPU=1                          -> CPU-only (CppExtension)
  torch is a CPU-only build                   -> CPU-only
  no TORCH_CUDA_ARCH_LIST and no visible GPU  -> CPU-only (says how to ask for CUDA)
  a CUDA toolkit is found                     -> CUDA (CUDAExtension with the .cu sources) for
                                                 TORCH_CUDA_ARCH_LIST, else the GPUs' archs
  no CUDA toolkit                             -> CPU-only
One line saying which and why is printed. Install with
    pip install --no-build-isolation -e .
so the build sees the torch that is installed (an isolated build env would download or copy a
multi-GB torch, and the extension must be built against the exact torch it runs with).
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_build_module():
    # gpufit/_build.py by path: importing the gpufit package would try to load the very
    # extension that is being built.
    path = ROOT / "gpufit" / "_build.py"
    spec = importlib.util.spec_from_file_location("gpufit_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_build = _load_build_module()


def _relative(paths):
    # setuptools refuses absolute source paths
    return [str(p.relative_to(ROOT)) for p in paths]


def extension():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    try:
        plan = _build.plan_build()
    except _build.BuildConfigError as err:
        raise SystemExit(f"gpufit: cannot build: {err}") from None
    print(f"gpufit: {plan.summary}", flush=True)
    _build.apply(plan)
    if plan.with_cuda:
        return CUDAExtension(
            "gpufit._C",
            sources=_relative(_build.sources(with_cuda=True)),
            include_dirs=[str(p) for p in plan.include_dirs],
            extra_compile_args=_build.compile_args(plan),
        )
    return CppExtension(
        "gpufit._C",
        sources=_relative(_build.sources(with_cuda=False)),
        include_dirs=[str(p) for p in plan.include_dirs],
        extra_compile_args=_build.compile_args(plan),
    )


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


def dependencies():
    # fsatomic (the atomic file writer gpufit shares with lockgen) is a folder of this
    # repository, not a published package: it is required by its path.
    return ["torch>=2.5", "numpy", f"fsatomic @ {(ROOT / 'fsatomic').as_uri()}"]


setup(
    install_requires=dependencies(),
    ext_modules=[extension()],
    cmdclass={"build_ext": build_ext_class()},
)

"""Choose, once per process, where gpufit's operator kernels come from.

  compiled   gpufit._C, built by `pip install --no-build-isolation -e .`
  jit        the same sources compiled on first import with torch.utils.cpp_extension.load
  reference  gpufit.reference registered as the kernels (pure PyTorch; slower, always works)

GPUFIT_BACKEND=auto|compiled|jit|reference picks one explicitly (default auto: the first that
works, in that order); GPUFIT_JIT=0 rules out a build on import. Falling back to the reference
warns once, naming the cause.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from dataclasses import dataclass

import torch

from gpufit import _build, _schema, reference

KINDS = ("compiled", "jit", "reference")


@dataclass(frozen=True)
class Backend:
    kind: str  # one of KINDS
    with_cuda: bool
    cuda_archs: str  # "7.5,8.0,9.0+PTX"; "" for CPU-only kernels
    detail: str

    @property
    def label(self) -> str:
        if self.kind == "reference":
            return "pure PyTorch (reference)"
        device = "CUDA + CPU" if self.with_cuda else "CPU"
        return f"{'compiled' if self.kind == 'compiled' else 'JIT-compiled'} {device}"


class BackendUnavailable(RuntimeError):
    pass


class BackendChoiceError(ValueError):
    """GPUFIT_BACKEND or GPUFIT_JIT asks for what cannot be had; the message names the valid
    values or the cause, in one line (the command line prints it without a traceback)."""


def requested_kind(requested: str | None = None) -> str:
    """The backend asked for: ``requested``, else GPUFIT_BACKEND, else "auto"."""
    raw = requested or os.environ.get("GPUFIT_BACKEND") or "auto"
    kind = raw.strip().lower()
    if kind != "auto" and kind not in KINDS:
        raise BackendChoiceError(f"GPUFIT_BACKEND={raw!r} is not one of auto, {', '.join(KINDS)}")
    return kind


def jit_allowed() -> bool:
    """GPUFIT_JIT: 1 (the default) allows building the kernels on import, 0 rules it out."""
    raw = os.environ.get("GPUFIT_JIT", "1")
    if raw.strip() not in ("0", "1", ""):
        raise BackendChoiceError(
            f"GPUFIT_JIT={raw!r} is not 0 (never build on import) or 1 (the default)"
        )
    return raw.strip() != "0"


def _load_compiled() -> Backend:
    try:
        module = importlib.import_module("gpufit._C")
    except ImportError as err:
        raise BackendUnavailable(f"gpufit._C is not importable ({err})") from err
    missing = [name for name in _schema.SCHEMAS if not hasattr(torch.ops.gpufit, name)]
    if missing:
        # The library is loaded and owns the namespace now, so no other backend can take over.
        raise RuntimeError(
            f"{module.__file__} is stale: it lacks the ops {missing} that this gpufit defines. "
            "Rebuild it with `pip install --no-build-isolation -e .`"
        )
    return Backend("compiled", bool(module.with_cuda), module.cuda_archs, module.__file__)


def _load_jit() -> Backend:
    if not jit_allowed():
        raise BackendUnavailable("JIT builds are disabled (GPUFIT_JIT=0)")
    if not _build.CSRC.is_dir():
        raise BackendUnavailable(f"no C++ sources at {_build.CSRC} (not a source checkout)")
    try:
        plan = _build.plan_build()
    except _build.BuildConfigError as err:
        raise BackendUnavailable(str(err)) from err
    from torch.utils import cpp_extension

    _build.apply(plan)
    print(
        f"gpufit: building the operators with JIT ({plan.summary}); this happens once and "
        "takes from half a minute (CPU) to a few minutes (CUDA)",
        file=sys.stderr,
        flush=True,
    )
    args = _build.compile_args(plan)
    try:
        path = cpp_extension.load(
            name="gpufit_jit_cuda" if plan.with_cuda else "gpufit_jit_cpu",
            sources=[str(p) for p in _build.sources(plan.with_cuda)],
            extra_cflags=args["cxx"],
            extra_cuda_cflags=args.get("nvcc", []),
            extra_include_paths=[str(p) for p in plan.include_dirs],
            with_cuda=plan.with_cuda,
            is_python_module=False,
        )
    except Exception as err:  # a compiler error, missing ninja, ...: all mean "not this way"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise BackendUnavailable(f"JIT build failed: {first_line}") from err
    return Backend("jit", plan.with_cuda, plan.arch_tag, str(path))


def _load_reference() -> Backend:
    library = torch.library.Library(_schema.NAMESPACE, "DEF")
    for name, schema in _schema.SCHEMAS.items():
        library.define(name + schema)
        library.impl(name, getattr(reference, name), "CompositeExplicitAutograd")
    _LIBRARIES.append(library)  # a Library deregisters its ops when collected
    return Backend("reference", False, "", "gpufit.reference")


_LIBRARIES: list[torch.library.Library] = []
_LOADERS = {"compiled": _load_compiled, "jit": _load_jit, "reference": _load_reference}


def load(requested: str | None = None) -> Backend:
    requested = requested_kind(requested)
    jit_allowed()  # a bad GPUFIT_JIT is refused whichever backend ends up chosen
    if requested != "auto":
        try:
            return _LOADERS[requested]()
        except BackendUnavailable as err:
            raise BackendChoiceError(f"GPUFIT_BACKEND={requested} cannot be used: {err}") from err
    causes = []
    for kind in ("compiled", "jit"):
        try:
            return _LOADERS[kind]()
        except BackendUnavailable as err:
            causes.append(f"{kind}: {err}")
    warnings.warn(
        "gpufit: using the pure-PyTorch reference ops (slower) because "
        + "; ".join(causes)
        + ". Build the extension with `pip install --no-build-isolation -e .`",
        RuntimeWarning,
        stacklevel=3,
    )
    return _load_reference()

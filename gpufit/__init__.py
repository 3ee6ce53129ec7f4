"""gpufit: fused training ops for PyTorch (C++ CPU and CUDA kernels via torch.library).

The names below load on first use (``gpufit.ops``, ``gpufit.fuse``, ...), so that the command
line answers ``gpufit --help`` without importing torch; ``import gpufit.ops`` loads the kernels
at once.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_LAZY = {
    "nn": ("gpufit.nn", None),
    "ops": ("gpufit.ops", None),
    "info": ("gpufit._info", "info"),
    "FusedLinearCrossEntropyLoss": ("gpufit.nn", "FusedLinearCrossEntropyLoss"),
    "FusedLinearReLU": ("gpufit.nn", "FusedLinearReLU"),
    "fuse": ("gpufit.nn", "fuse"),
}

__all__ = [
    "FusedLinearCrossEntropyLoss",
    "FusedLinearReLU",
    "fuse",
    "info",
    "nn",
    "ops",
    "__version__",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'gpufit' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

"""gpufit: fused training ops for PyTorch (C++ CPU and CUDA kernels via torch.library)."""

__version__ = "0.1.0"

from gpufit import nn, ops  # noqa: E402
from gpufit._info import info  # noqa: E402
from gpufit.nn import FusedLinearCrossEntropyLoss, FusedLinearReLU, fuse  # noqa: E402

__all__ = [
    "FusedLinearCrossEntropyLoss",
    "FusedLinearReLU",
    "fuse",
    "info",
    "nn",
    "ops",
    "__version__",
]

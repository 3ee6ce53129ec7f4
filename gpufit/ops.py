"""gpufit's operators: thin wrappers over torch.ops.gpufit.*, with their fake kernels (for
torch.compile and meta tensors) and autograd formulas. The kernels come from the backend that
gpufit._backend picked (compiled, JIT or pure-PyTorch reference).
"""

from __future__ import annotations

import torch

from gpufit import _backend

BACKEND = _backend.load()

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_tensor(op: str, name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; supported are float32, float64, bfloat16, float16"
        )


def check_linear_inputs(
    op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Raise a clear error unless x (..., K), weight (N, K), bias (N,) fit together."""
    _check_tensor(op, "x", x)
    _check_tensor(op, "weight", weight)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension, got a scalar")
    if weight.dim() != 2:
        raise ValueError(
            f"{op}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: shape mismatch, x has {x.shape[-1]} features in its last dimension but "
            f"weight {tuple(weight.shape)} expects {weight.shape[1]}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"{op}: dtype mismatch, x is {x.dtype} but weight is {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(
            f"{op}: device mismatch, x is on {x.device} but weight is on {weight.device}"
        )
    if bias is not None:
        _check_tensor(op, "bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: dtype mismatch, x is {x.dtype} but bias is {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(
                f"{op}: device mismatch, x is on {x.device} but bias is on {bias.device}"
            )


# ---------------------------------------------------------------- fused_linear_relu


def fused_linear_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """relu(x @ weight.T + bias) in one op: x (..., K), weight (N, K), bias (N,) -> (..., N).

    Same result as ``torch.relu(torch.nn.functional.linear(x, weight, bias))``; backward
    reuses the output as the ReLU mask and fuses dReLU with the bias-gradient reduction.
    """
    check_linear_inputs("fused_linear_relu", x, weight, bias)
    return torch.ops.gpufit.fused_linear_relu.default(x, weight, bias)


@torch.library.register_fake("gpufit::fused_linear_relu")
def _fused_linear_relu_fake(x, weight, bias):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "x and weight: in_features differ")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("gpufit::fused_linear_relu_backward")
def _fused_linear_relu_backward_fake(grad_out, x, weight, out, needs_input_grad):
    grad_x = x.new_empty(x.shape) if needs_input_grad else x.new_empty(0)
    return grad_x, weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _fused_linear_relu_setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.has_bias = bias is not None


def _fused_linear_relu_backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    needs_x, needs_w, needs_b = ctx.needs_input_grad
    grad_x, grad_w, grad_b = torch.ops.gpufit.fused_linear_relu_backward.default(
        grad_out, x, weight, out, needs_x
    )
    return (
        grad_x if needs_x else None,
        grad_w if needs_w else None,
        grad_b if ctx.has_bias and needs_b else None,
    )


torch.library.register_autograd(
    "gpufit::fused_linear_relu",
    _fused_linear_relu_backward,
    setup_context=_fused_linear_relu_setup_context,
)

"""Pure-PyTorch references of every gpufit op.

They define what each op computes: the tests compare the compiled kernels against them, and
they are the kernels of the fallback backend when no compiled library can be had. Each
`*_backward` has the same signature and results as its compiled counterpart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fused_linear_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.relu(F.linear(x, weight, bias))


def fused_linear_relu_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    needs_input_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = math.prod(x.shape[:-1])
    grad_z = torch.where(out > 0, grad_out, torch.zeros_like(grad_out)).reshape(rows, -1)
    grad_weight = grad_z.t().mm(x.reshape(rows, -1))
    grad_bias = grad_z.sum(0, dtype=torch.promote_types(grad_z.dtype, torch.float32))
    grad_x = grad_z.mm(weight).reshape(x.shape) if needs_input_grad else x.new_empty(0)
    return grad_x, grad_weight, grad_bias.to(out.dtype)

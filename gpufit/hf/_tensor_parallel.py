"""The fused loss of a vocabulary-sharded (tensor-parallel) head.

A head parallelized with ``ColwiseParallel`` holds its weight as a DTensor ``Shard(0)`` over a
1-D mesh: rank r has the rows ``[start_r, start_r + V_r)`` of the (V, H) weight, and every rank
has the same (replicated) input. Each rank runs ``fused_linear_cross_entropy`` on its own rows
(targets outside them are ignored there; their log-sum-exp is still computed), then the ranks
combine the per-row statistics (Megatron's vocab-parallel cross-entropy):

    lse_i = logsumexp over ranks of lse_i^r   (all-reduce MAX, then SUM of exp)
    z_i   = sum over ranks of z_i^r           (the target's logit, on the rank that holds it)
    loss_i = lse_i - z_i

The logits are never formed, not even the (N, V_r) local ones. Backward needs one more
all-reduce, of the input's gradient (each rank's rows contribute ``dlogits_r @ W_r``): every rank
ends with the loss and input gradient of the unsharded head and the gradient of its own rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from gpufit import ops
from gpufit.hf._models import UnsupportedModelError, is_fsdp2_linear

# the local ignore_index: never a row of a shard (the caller's may be, say 0 for padding)
_OFF_SHARD = -1


class _SumGradAcrossRanks(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over the group: the input of
    a column-parallel linear, whose gradient each rank has a part of."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _CombineRows(torch.autograd.Function):
    """(lse, target logit) of each row over the whole vocabulary, from each rank's statistics
    of its own rows. Every rank ends with the same values, so backward is local: d lse / d
    lse_r = exp(lse_r - lse), d z / d z_r = 1."""

    @staticmethod
    def forward(ctx, lse_local, target_logit_local, group):
        peak = lse_local.detach().clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        total = torch.exp(lse_local - peak)
        dist.all_reduce(total, group=group)
        lse = peak + torch.log(total)
        target_logit = target_logit_local.clone()
        dist.all_reduce(target_logit, group=group)
        ctx.save_for_backward(lse_local, lse)
        return lse, target_logit

    @staticmethod
    def backward(ctx, grad_lse, grad_target_logit):
        lse_local, lse = ctx.saved_tensors
        return grad_lse * torch.exp(lse_local - lse), grad_target_logit, None


def vocab_parallel_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    vocab_start: int,
    group,
    ignore_index: int = -100,
    num_items: int | torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``x @ W.T + b`` over the whole vocabulary, where this rank holds the
    rows ``[vocab_start, vocab_start + weight.shape[0])`` of W (and b) and ``group`` the others.

    x (N, H) and target (N,) (global class indices, or ignore_index) are the same on every rank.
    The mean over non-ignored rows, or with ``num_items`` their sum divided by it; softcap and
    logit_scale as in ``fused_linear_cross_entropy``. The result is the same on every rank; so
    is x's gradient, and weight's is that of this rank's rows.
    """
    if weight.shape[0] == 0:
        raise UnsupportedModelError(
            "gpufit: this rank holds no rows of the vocabulary-sharded head (more ranks than "
            "vocabulary rows)"
        )
    x = _SumGradAcrossRanks.apply(x, group)
    kept = target != ignore_index
    mine = kept & (target >= vocab_start) & (target < vocab_start + weight.shape[0])
    local_target = torch.where(mine, target - vocab_start, _OFF_SHARD)
    loss_local, lse_local = ops.fused_linear_cross_entropy(
        x, weight, local_target, bias, ignore_index=_OFF_SHARD, reduction="none",
        softcap=softcap, logit_scale=logit_scale, chunk_size=chunk_size, return_lse=True,
    )  # fmt: skip
    # loss = lse - (target's logit) on the rows whose target is here
    target_logit_local = torch.where(mine, lse_local - loss_local, 0.0)
    lse, target_logit = _CombineRows.apply(lse_local, target_logit_local, group)
    total = torch.where(kept, lse - target_logit, 0.0).sum()
    if num_items is None:
        return total / kept.sum()
    return total / num_items


# ================================================================ a DTensor head


def _describe(placements) -> str:
    return "(" + ", ".join(repr(p) for p in placements) + ")"


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def sharded_head(linear: nn.Linear, hidden_states):
    """(x, this rank's weight rows, bias rows, the first row's index, the group) of a
    vocabulary-sharded head's call, or an UnsupportedModelError naming the layout it cannot
    fuse. ``hidden_states``: the input the head's call got (a DTensor after ColwiseParallel's
    input hook)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    weight, bias = linear.weight, linear.bias
    mesh, placements = weight.device_mesh, tuple(weight.placements)
    where = f"lm_head's weight is a DTensor {_describe(placements)} over a {mesh.ndim}-D mesh"
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise UnsupportedModelError(
            f"gpufit: {where}; only a vocabulary-sharded head (Shard(0) over one mesh "
            "dimension, as ColwiseParallel makes it) is fused"
        )
    if bias is not None and (
        not is_dtensor(bias) or bias.device_mesh != mesh or tuple(bias.placements) != (Shard(0),)
    ):
        raise UnsupportedModelError(
            f"gpufit: {where}, but its bias is not sharded the same way"
        )  # fmt: skip
    if not is_dtensor(hidden_states):
        raise UnsupportedModelError(
            f"gpufit: {where}, but its input is a plain tensor (a tensor-parallel head takes a "
            "replicated DTensor, as ColwiseParallel's input hook makes it; an FSDP2 weight "
            "is gathered only in the call of its own unit)"
        )
    if is_fsdp2_linear(linear):
        raise UnsupportedModelError(
            f"gpufit: {where} inside an FSDP2 unit; FSDP with tensor parallelism (a 2-D mesh) "
            "is not supported yet"
        )
    if hidden_states.device_mesh != mesh or any(
        not isinstance(p, Replicate) for p in hidden_states.placements
    ):  # fmt: skip
        raise UnsupportedModelError(
            f"gpufit: {where}, but its input is a DTensor "
            f"{_describe(hidden_states.placements)}; the fused loss needs it replicated on the "
            "head's mesh"
        )
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    local_bias = None if bias is None else bias.to_local()
    return hidden_states.to_local(), weight.to_local(), local_bias, offset[0], mesh.get_group()

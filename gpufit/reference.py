"""Pure-PyTorch references of every gpufit op.

They define what each op computes: the tests compare the compiled kernels against them, and
they are the kernels of the fallback backend when no compiled library can be had. Each
`*_backward` has the same signature and results as its compiled counterpart.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from gpufit._linear_ce_options import LinearCEOptions

_AUTOCAST_KEYS = torch._C.DispatchKeySet(
    torch._C.DispatchKey.AutocastCPU
) | torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA)


def _without_autocast(kernel):
    """As the compiled kernels (csrc/autocast.h): nothing inside an op is autocast, also when it
    runs with autocast on (a backward op in the autograd engine); the op's own autocast rule
    has cast the inputs already."""

    @functools.wraps(kernel)
    def run(*args):
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            return kernel(*args)

    return run


@_without_autocast
def fused_linear_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.relu(F.linear(x, weight, bias))


@_without_autocast
def fused_linear_relu_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    needs_input_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # explicit sizes, not -1: a reshape of zero rows cannot infer its width
    rows = math.prod(x.shape[:-1])
    # relu's own backward (threshold_backward on its output): a nan output passes grad_out on
    grad_z = torch.where(out <= 0, torch.zeros_like(grad_out), grad_out)
    grad_z = grad_z.reshape(rows, grad_out.shape[-1])
    grad_weight = grad_z.t().mm(x.reshape(rows, x.shape[-1]))
    grad_bias = grad_z.sum(0, dtype=torch.promote_types(grad_z.dtype, torch.float32))
    grad_x = grad_z.mm(weight).reshape(x.shape) if needs_input_grad else x.new_empty(0)
    return grad_x, grad_weight, grad_bias.to(out.dtype)


# ---------------------------------------------------------------- fused_linear_cross_entropy
# The reference materialises the (N, V) logits: it defines the results, it does not save memory.
# Its gradient formulas are written out (no autograd inside a kernel), and the tests check them
# against autograd through torch.nn.functional.cross_entropy. They are made of differentiable
# ops, so they are also the double backward of the reference backend.


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_ce_grads_in_forward(dtype: torch.dtype, reduction: str, grad_mask) -> bool:
    """Whether the forward op also returns the gradients (mirrors csrc/linear_ce.h): only for a
    scalar loss, only for fp32/fp64, only if some gradient is wanted."""
    half = dtype in (torch.bfloat16, torch.float16)
    return not half and reduction != "none" and any(grad_mask)


def _linear_ce_logits(x, weight, target, bias, o):
    """The (N, V) logits in the accumulation type, capped where o.softcap says and divided by
    o.temperature, and the flat target. bf16/fp16 inputs are multiplied in fp32 (their product
    is never rounded to 8 or 11 bits), as the kernels do."""
    v, h = weight.shape
    acc = _acc_dtype(x.dtype)
    up = lambda t: None if t is None else t.to(acc)  # noqa: E731
    logits = F.linear(up(x.reshape(target.numel(), h)), up(weight), up(bias))
    if o.softcap is not None:
        logits = torch.tanh(logits / o.softcap) * o.softcap
    if o.temperature != 1.0:
        logits = logits / o.temperature
    return logits, target.reshape(-1)


def _plogp(logits):
    """p log p of each logit's softmax probability (0 where p is 0), and p."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return torch.where(p > 0, p * logp, 0), p, logp


def entropy(logits):
    """Each row's softmax entropy, -sum_j p_j log p_j."""
    return -_plogp(logits)[0].sum(-1)


def _row_outputs(logits, o, shape):
    """entropy, log_sum_sq_probs and mean_logits of each row, where o asks for them (else
    empty)."""
    none = logits.new_empty(0)
    ent = entropy(logits).reshape(shape) if o.return_entropy else none
    lss = none
    if o.return_log_sum_sq_probs:
        lss = torch.logsumexp(2 * torch.log_softmax(logits, dim=-1), dim=-1).reshape(shape)
    mean = logits.mean(-1).reshape(shape) if o.return_mean_logits else none
    return ent, lss, mean


def _class_weights(o, logits):
    return None if o.class_weight is None else o.class_weight.to(logits.dtype)


def _target_weights(w, target, valid):
    """w_t of the kept rows, 0 on ignored ones."""
    return torch.where(valid, w[torch.where(valid, target, 0)], 0)


def _reduced_scale(o, logits, target, valid):
    """d loss / d (row loss) of a reduced loss: 1 / mean's denominator (kept rows, or the sum
    of their targets' class weights), 1 / num_items for a sum with it, else 1 (0-dim)."""
    if o.reduction == "mean":
        w = _class_weights(o, logits)
        if w is None:
            return 1 / valid.sum().to(logits.dtype)
        return 1 / _target_weights(w, target, valid).sum()
    if o.num_items is not None:
        return 1 / o.num_items.to(device=logits.device, dtype=logits.dtype)
    return logits.new_ones(())


def _lse_parts(logits):
    """The rows' log-sum-exp as lse + lse_lo (csrc/linear_ce.h: lse rounded, lse_lo what the
    rounding of max + log(sum exp(z - max)) lost)."""
    m = logits.amax(-1) if logits.shape[-1] else logits.new_full(logits.shape[:-1], -math.inf)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    ls = torch.exp(logits - shift[:, None]).sum(-1).log()
    lse = shift + ls
    back = lse - shift
    lo = (shift - (lse - back)) + (ls - back)
    return lse, torch.where(torch.isfinite(lse), lo, torch.zeros_like(lo))


def _linear_ce_grads(x, weight, bias, logits, target, scale, grad_lse, o, mask, grad_entropy=None):
    """Gradients of sum_i (scale_i loss_i + grad_lse_i lse_i + grad_entropy_i H_i) w.r.t. x,
    weight, bias from the full (tempered) logits, for the options o."""
    v, h = weight.shape
    eps, z_loss = o.label_smoothing, o.z_loss
    valid = target != o.ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    c = torch.where(valid, scale, 0)
    w = _class_weights(o, logits)
    # d row loss / d z = softmax A - eps/V w - (1 - eps) w_t onehot (csrc/linear_ce.h), all
    # weights 1 without class weights
    if w is None:
        coef = c * (1 + 2 * z_loss * lse)
        target_coef = c * (1 - eps)
    else:
        wt = _target_weights(w, target, valid)
        coef = c * ((1 - eps) * wt + eps / v * w.sum() + 2 * z_loss * lse)
        target_coef = c * (1 - eps) * wt
    if grad_lse is not None:
        coef = coef + grad_lse
    dz = torch.softmax(logits, dim=-1) * coef[:, None]
    if eps != 0:
        smooth = (c * (eps / v))[:, None]
        dz = dz - (smooth if w is None else smooth * w[None, :])
    if grad_entropy is not None:  # d H / d z_j = -p_j (log p_j + H)
        plogp, p, logp = _plogp(logits)
        h_row = -plogp.sum(-1, keepdim=True)
        dz = dz - grad_entropy[:, None] * torch.where(p > 0, p * (logp + h_row), 0)
    onehot = F.one_hot(torch.where(valid, target, 0), v).to(dz.dtype)
    dz = dz - target_coef[:, None] * onehot
    if o.softcap is not None:  # the logits are capped, then divided by the temperature
        dz = dz * (1 - (logits * (o.temperature / o.softcap)) ** 2)
    if o.temperature != 1.0:
        dz = dz / o.temperature
    dz_in = dz.to(x.dtype)
    # separate empty tensors: outputs of an op must not alias each other
    grad_x = dz_in.mm(weight).reshape(x.shape) if mask[0] else x.new_empty(0)
    grad_w = dz_in.t().mm(x.reshape(target.numel(), h)) if mask[1] else x.new_empty(0)
    grad_b = dz.sum(0).to(x.dtype) if mask[2] and bias is not None else x.new_empty(0)
    return grad_x, grad_w, grad_b


def _options_and_mask(args) -> tuple[LinearCEOptions, list[bool]]:
    return LinearCEOptions.from_schema_args(args[:-1]), args[-1]


@_without_autocast
def fused_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    *args,
) -> tuple[torch.Tensor, ...]:
    """args: the options (in schema order, LinearCEOptions.schema_args) and grad_mask."""
    o, grad_mask = _options_and_mask(args)
    logits, flat_target = _linear_ce_logits(x, weight, target, bias, o)
    lse, lse_lo = _lse_parts(logits)
    valid = flat_target != o.ignore_index
    per_row = F.cross_entropy(
        logits,
        flat_target,
        weight=_class_weights(o, logits),
        ignore_index=o.ignore_index,
        reduction="none",
        label_smoothing=o.label_smoothing,
    )
    if o.z_loss:
        per_row = per_row + torch.where(valid, o.z_loss * lse * lse, 0)
    if o.reduction == "none":
        loss = per_row.reshape(target.shape)
        scale = None
    else:
        scale = _reduced_scale(o, logits, flat_target, valid)
        loss = per_row.sum() * scale
    if o.return_predicted:
        predicted = torch.where(valid, logits.argmax(-1), o.ignore_index).reshape(target.shape)
    else:
        predicted = target.new_empty(0)
    if linear_ce_grads_in_forward(x.dtype, o.reduction, grad_mask):
        grads = _linear_ce_grads(
            x, weight, bias, logits, flat_target, scale.expand_as(lse), None, o, grad_mask
        )  # fmt: skip
    else:
        grads = (x.new_empty(0), x.new_empty(0), x.new_empty(0))
    return (
        loss,
        lse.reshape(target.shape),
        lse_lo.reshape(target.shape),
        predicted,
        *_row_outputs(logits, o, target.shape),
        *grads,
    )


@_without_autocast
def fused_linear_cross_entropy_backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    lse_lo: torch.Tensor,
    entropy: torch.Tensor | None,
    *args,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """args: the options (in schema order) and grad_mask."""
    o, grad_mask = _options_and_mask(args)
    # lse, lse_lo and the entropy are recomputed from the logits (so that the result is
    # differentiable in x, weight and bias); the kernels use the saved ones
    logits, flat_target = _linear_ce_logits(x, weight, target, bias, o)
    acc = logits.dtype
    if o.reduction == "none":
        scale = grad_loss.reshape(-1).to(acc)
    else:
        valid = flat_target != o.ignore_index
        scale = grad_loss.to(acc) * _reduced_scale(o, logits, flat_target, valid)
        scale = scale.expand(flat_target.shape)
    g = None if grad_lse is None else grad_lse.reshape(-1).to(acc)
    g_entropy = None if grad_entropy is None else grad_entropy.reshape(-1).to(acc)
    return _linear_ce_grads(
        x, weight, bias, logits, flat_target, scale, g, o, grad_mask, g_entropy
    )  # fmt: skip

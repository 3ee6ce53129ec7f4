"""gpufit's operators: thin wrappers over torch.ops.gpufit.*, with their fake kernels (for
torch.compile and meta tensors). The kernels come from the backend that gpufit._backend picked
(compiled, JIT or pure-PyTorch reference); the compiled ones bring their autograd and autocast
rule along (csrc/autograd.cpp, csrc/autocast.cpp), the reference backend gets both here.
"""

from __future__ import annotations

import torch

from gpufit import _backend, _linear_ce_options, reference
from gpufit._linear_ce_options import LinearCEOptions

__all__ = [
    "LinearCEOptions",
    "check_linear_inputs",
    "fused_linear_cross_entropy",
    "fused_linear_relu",
    "run_fused_linear_cross_entropy",
]

BACKEND = _backend.load()
# The compiled backends bring their autograd (csrc/autograd.cpp: far cheaper per call than
# Python's) and check targets in their CPU kernel. The reference backend's ops are registered
# from Python, and so is their autograd below.
_PYTHON_KERNELS = BACKEND.kind == "reference"

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_tensor(op: str, name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; supported are float32, float64, bfloat16, float16"
        )


def _linear_inputs_fit(x: object, weight: object, bias: object) -> bool:
    """The usual case in one cheap pass: True when check_linear_inputs has nothing to say (False
    only sends the inputs through the full checks)."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    x_shape, w_shape, dtype, device = x.shape, weight.shape, x.dtype, x.device
    return (
        dtype in _FLOAT_DTYPES
        and (weight.dtype == dtype or _op_dtype(weight) == _op_dtype(x))
        and len(x_shape) >= 1
        and len(w_shape) == 2
        and x_shape[-1] == w_shape[1]
        and weight.device == device
        and (
            bias is None
            or (
                isinstance(bias, torch.Tensor)
                and (bias.dtype == dtype or _op_dtype(bias) == _op_dtype(x))
                and bias.shape == (w_shape[0],)
                and bias.device == device
            )
        )
    )


_AUTOCAST_ELIGIBLE = (torch.float32, torch.bfloat16, torch.float16)


def _op_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype t has inside the op: the autocast dtype where autocast is on for t's device and
    t is a floating tensor other than float64 (the rule of csrc/autocast.cpp, which is
    F.linear's), else t's own."""
    device = t.device.type
    if (
        t.dtype in _AUTOCAST_ELIGIBLE
        and device in ("cpu", "cuda")
        and torch.is_autocast_enabled(device)
    ):
        return torch.get_autocast_dtype(device)
    return t.dtype


def check_linear_inputs(
    op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Raise a clear error unless x (..., K), weight (N, K), bias (N,) fit together."""
    if not _linear_inputs_fit(x, weight, bias):
        _explain_linear_inputs(op, x, weight, bias)


def _explain_linear_inputs(op, x, weight, bias) -> None:
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
    if _op_dtype(x) != _op_dtype(weight):
        raise TypeError(
            f"{op}: dtype mismatch, x is {x.dtype} but weight is {weight.dtype} (under "
            "torch.autocast, floating inputs are cast to the autocast dtype, as for F.linear)"
        )
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
        if _op_dtype(bias) != _op_dtype(x):
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

    Same result as ``torch.relu(torch.nn.functional.linear(x, weight, bias))``, also under
    ``torch.autocast`` (x, weight and bias are cast to the autocast dtype, as F.linear's are, and
    the output has that dtype). Backward reuses the output as the ReLU mask and fuses dReLU with
    the bias-gradient reduction; with ``create_graph=True`` it is computed with differentiable
    ATen ops instead, so double backward (hessians, gradient penalties) is right.
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
    if torch.is_grad_enabled():  # create_graph=True: the differentiable formula
        grads = reference.fused_linear_relu_backward(grad_out, x, weight, out, needs_x)
    else:
        grads = torch.ops.gpufit.fused_linear_relu_backward.default(
            grad_out, x, weight, out, needs_x
        )
    grad_x, grad_w, grad_b = grads
    return (
        grad_x if needs_x else None,
        grad_w if needs_w else None,
        grad_b if ctx.has_bias and needs_b else None,
    )


if _PYTHON_KERNELS:
    torch.library.register_autograd(
        "gpufit::fused_linear_relu",
        _fused_linear_relu_backward,
        setup_context=_fused_linear_relu_setup_context,
    )


# ---------------------------------------------------------------- fused_linear_cross_entropy

_LINEAR_CE = _linear_ce_options.OP


def _check_linear_ce_inputs(x, weight, target, bias) -> None:
    if not _linear_ce_inputs_fit(x, weight, target, bias):
        _explain_linear_ce_inputs(x, weight, target, bias)


def _linear_ce_inputs_fit(x, weight, target, bias) -> bool:
    """As _linear_inputs_fit, for fused_linear_cross_entropy's tensors."""
    return (
        _linear_inputs_fit(x, weight, bias)
        and isinstance(target, torch.Tensor)
        and target.dtype == torch.int64
        and target.shape == x.shape[:-1]
        and target.device == x.device
        and weight.shape[0] >= 1
    )


def _explain_linear_ce_inputs(x, weight, target, bias) -> None:
    op = _LINEAR_CE
    check_linear_inputs(op, x, weight, bias)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{op}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(
            f"{op}: target must hold int64 (or uint8) class indices, got dtype {target.dtype} "
            "(class-probability targets are not supported)"
        )
    if target.shape != x.shape[:-1]:
        raise ValueError(
            f"{op}: target shape {tuple(target.shape)} must equal the leading dimensions of x "
            f"{tuple(x.shape[:-1])} (one class index per row of x)"
        )
    if target.device != x.device:
        raise ValueError(
            f"{op}: device mismatch, x is on {x.device} but target is on {target.device}"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"{op}: weight must have at least one class (row), got {weight.shape}")


def _check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    if target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad].reshape(-1)[0])
        raise ValueError(
            f"{_LINEAR_CE}: target {value} is out of range for {num_classes} classes "
            f"(valid: 0..{num_classes - 1}, or ignore_index={ignore_index})"
        )


def fused_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
    num_items: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_lse: bool = False,
    return_predicted: bool = False,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_log_sum_sq_probs: bool = False,
    return_mean_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``cross_entropy(x @ weight.T + bias, target)`` without materialising the logits.

    x (..., H), weight (V, H), bias (V,) or None, target (...) int64 (or uint8) class indices.
    The result equals ``torch.nn.functional.cross_entropy(F.linear(x, weight, bias).flatten(0,
    -2), target.flatten(), ignore_index=..., reduction=..., label_smoothing=...)`` (reshaped to
    ``target.shape`` for ``reduction="none"``), plus the z-loss below. The loss (and lse) is
    float64 for float64 inputs and float32 otherwise: bf16/fp16 inputs get an fp32 loss, as
    Liger-Kernel and Cut Cross-Entropy return it and as autocast runs cross_entropy.

    - ``ignore_index``: rows with this target contribute neither loss nor gradient. With
      ``reduction="mean"`` and every row ignored the loss is nan (0/0), as in PyTorch, and the
      gradients are zero.
    - ``z_loss``: adds ``z_loss * lse_i ** 2`` to the loss of every non-ignored row, where
      ``lse_i = logsumexp(logits_i)`` (PaLM's auxiliary loss; same definition as Liger-Kernel).
    - ``chunk_size``: rows per chunk for fp32/fp64 (peak extra memory about chunk_size x V
      logits); for bf16/fp16 the vocabulary is blocked instead and it is the number of classes
      per block (peak about N x chunk_size). None picks the split from N, V, H and the dtype; on
      CPU, fp32/fp64 then never take more scratch than PyTorch's own chunked
      ``F.linear_cross_entropy`` (or 1 MiB of logits, where that is more).
    - ``logit_scale``: the logits are ``logit_scale * (x @ weight.T + bias)`` (Cohere's
      ``logit_scale``, Granite's ``1 / logits_scaling``), before the softcap. It is applied to x
      and bias on the way in, ``(s x) W^T + s b``: exact in real arithmetic, one (N, H)
      multiply; for bf16/fp16 x that adds one rounding of ``s x``. No gradient flows into it.
    - ``softcap``: logits become ``softcap * tanh(z / softcap)`` before the softmax (Gemma 2's
      final_logit_softcapping); lse, z-loss and argmax are those of the capped logits.
    - ``class_weight``: (V,) tensor, as F.cross_entropy's ``weight=`` (label smoothing too); with
      ``reduction="mean"`` the denominator is the sum of the kept targets' weights. No gradient
      flows into it. The z-loss term is not weighted.
    - ``num_items``: only with ``reduction="sum"``: the loss (and its gradient) is the sum /
      num_items (transformers' ``num_items_in_batch``); an int >= 1 or a 0-dim tensor on any
      device, never read on the host.
    - ``temperature``: a positive finite number; the logits (after ``logit_scale`` and
      ``softcap``) are divided by it, inside the op, as TRL's trainers define it. The loss, lse,
      argmax and every per-row output below are those of the tempered logits; with
      ``reduction="none"``, ``-loss`` is each row's log-probability of its target at that
      temperature.
    - ``return_predicted``: also return each row's argmax over the (capped) logits, int64 of
      target's shape, ``ignore_index`` on ignored rows; a tie goes to the first maximum, as in
      ``torch.argmax`` (token accuracy: ``(predicted == target)[target != ignore_index]
      .float().mean()``; TRL's ``is_top1`` is ``predicted == target``).
    - Return: the loss alone, or the tuple ``(loss, lse, predicted, entropy, log_sum_sq_probs,
      mean_logits)`` restricted to the ones asked for, in that order.
    - ``return_lse``: also return the per-row log-sum-exp ``lse_i`` (shape ``target.shape``,
      dtype as the loss's, computed for ignored rows too). It is differentiable
      (d lse_i / d logit_ij = softmax_ij), so a term built from it trains.
    - ``return_entropy``: also return each row's softmax entropy ``H_i = -sum_j p_ij log p_ij``
      (shape and dtype as lse's, ignored rows too). Differentiable: d H_i / d logit_ij =
      -p_ij (log p_ij + H_i), combined with the loss's and lse's gradients in one backward.
    - ``return_log_sum_sq_probs``: also return ``log sum_j p_ij ** 2`` of each row (TRL's
      ``log_sum_sq_probs``); ``return_mean_logits``: also return each row's mean logit over
      the vocabulary. Both as lse's shape and dtype, ignored rows too, and without gradient.
    - Each per-row output costs only when asked: the statistics it needs are gathered in the
      same pass over each chunk of logits as the log-sum-exp.

    Under ``torch.autocast`` x, weight and bias are cast to the autocast dtype as F.linear's are
    (bf16 hidden states with an fp32 head work as in eager PyTorch); the gradients come back in
    each input's own dtype. Backward reuses the gradients forward computed (fp32/fp64 with a
    scalar loss) or recomputes the logits chunk by chunk; with ``create_graph=True`` it uses
    differentiable ATen ops on the full logits instead (so hessians and gradient penalties are
    right, at eager PyTorch's memory cost). bf16/fp16 inputs accumulate in fp32, and their
    logits are never rounded to 8 or 11 bits: each block's product ``x @ weight.T`` is formed
    and kept in fp32 (on CUDA a GEMM with fp32 output; on the CPU a GEMM of the inputs upcast
    to fp32), then the softmax statistics, the loss, grad_weight inside one GEMM per vocabulary
    block and grad_x across blocks, all in fp32.
    """
    options = LinearCEOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        class_weight=class_weight,
        num_items=num_items,
        chunk_size=chunk_size,
        return_lse=return_lse,
        return_predicted=return_predicted,
        logit_scale=logit_scale,
        temperature=temperature,
        return_entropy=return_entropy,
        return_log_sum_sq_probs=return_log_sum_sq_probs,
        return_mean_logits=return_mean_logits,
    )
    return run_fused_linear_cross_entropy(options, x, weight, target, bias)


def run_fused_linear_cross_entropy(
    options: LinearCEOptions,
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """fused_linear_cross_entropy with its options as one LinearCEOptions (validated when it
    was made; a module keeps one)."""
    if isinstance(target, torch.Tensor) and target.dtype == torch.uint8:
        target = target.long()  # F.cross_entropy takes uint8 class indices too
    _check_linear_ce_inputs(x, weight, target, bias)
    if options.class_weight is not None:
        _check_class_weight(options.class_weight, x, weight)
    # A data-dependent check, done on CPU only: on CUDA it would wait for the GPU every step, so
    # there (and under torch.compile) the kernels refuse such a target themselves (CUDA: a
    # device-side assert, as PyTorch's own cross_entropy does). The compiled CPU kernel checks
    # every target before any GEMM (a ValueError), so only the reference needs it here.
    if _PYTHON_KERNELS and target.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_target_range(target, weight.shape[0], options.ignore_index)
    if options.logit_scale != 1.0:  # not an option of the op: folded into its inputs
        x = x * options.logit_scale
        bias = None if bias is None else bias * options.logit_scale
    grad_on = torch.is_grad_enabled()
    grad_mask = [grad_on and t is not None and t.requires_grad for t in (x, weight, bias)]
    outputs = torch.ops.gpufit.fused_linear_cross_entropy.default(
        x, weight, target, bias, *options.schema_args(x.device), grad_mask
    )
    loss, lse, _lo, predicted, entropy, log_sum_sq_probs, mean_logits = outputs[:7]
    asked = (
        (lse, options.return_lse),
        (predicted, options.return_predicted),
        (entropy, options.return_entropy),
        (log_sum_sq_probs, options.return_log_sum_sq_probs),
        (mean_logits, options.return_mean_logits),
    )
    extra = tuple(output for output, wanted in asked if wanted)
    return (loss, *extra) if extra else loss


def _check_class_weight(class_weight: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    if class_weight.shape != (weight.shape[0],):
        raise ValueError(
            f"{_LINEAR_CE}: class_weight must have shape ({weight.shape[0]},), one weight per "
            f"class, got {tuple(class_weight.shape)}"
        )
    if class_weight.device != x.device:
        raise ValueError(
            f"{_LINEAR_CE}: device mismatch, x is on {x.device} but class_weight is on "
            f"{class_weight.device}"
        )


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _options_and_mask(args) -> tuple[LinearCEOptions, list[bool]]:
    """The options and grad_mask from an op's arguments after its tensors."""
    return LinearCEOptions.from_schema_args(args[:-1]), args[-1]


@torch.library.register_fake("gpufit::fused_linear_cross_entropy")
def _fused_linear_cross_entropy_fake(x, weight, target, bias, *args):
    options, grad_mask = _options_and_mask(args)
    torch._check(x.shape[-1] == weight.shape[1], lambda: "x and weight: in_features differ")
    acc = _loss_dtype(x.dtype)
    loss = x.new_empty(target.shape if options.reduction == "none" else (), dtype=acc)
    lse = x.new_empty(target.shape, dtype=acc)
    lse_lo = x.new_empty(target.shape, dtype=acc)
    predicted = target.new_empty(target.shape if options.return_predicted else 0)
    row_outputs = (
        x.new_empty(target.shape if wanted else 0, dtype=acc)
        for wanted in (
            options.return_entropy,
            options.return_log_sum_sq_probs,
            options.return_mean_logits,
        )
    )
    in_forward = reference.linear_ce_grads_in_forward(x.dtype, options.reduction, grad_mask)
    return (
        loss,
        lse,
        lse_lo,
        predicted,
        *row_outputs,
        *_linear_ce_grads_fake(x, weight, bias, grad_mask if in_forward else [False] * 3),
    )


def _linear_ce_grads_fake(x, weight, bias, grad_mask):
    # separate empty tensors: outputs of an op must not alias each other
    return (
        x.new_empty(x.shape) if grad_mask[0] else x.new_empty(0),
        weight.new_empty(weight.shape) if grad_mask[1] else x.new_empty(0),
        weight.new_empty(weight.shape[0]) if grad_mask[2] and bias is not None else x.new_empty(0),
    )


@torch.library.register_fake("gpufit::fused_linear_cross_entropy_backward")
def _fused_linear_cross_entropy_backward_fake(
    grad_loss, grad_lse, grad_entropy, x, weight, target, bias, *args
):
    _lse, _lse_lo, _entropy, *args = args
    _, grad_mask = _options_and_mask(args)
    return _linear_ce_grads_fake(x, weight, bias, grad_mask)


def _fused_linear_cross_entropy_setup_context(ctx, inputs, output):
    x, weight, target, bias, *args = inputs
    options, grad_mask = _options_and_mask(args)
    loss, lse, lse_lo, predicted, entropy, lss, mean_logits, grad_x, grad_w, grad_b = output
    # loss, lse and entropy are differentiable
    ctx.mark_non_differentiable(lse_lo, predicted, lss, mean_logits, grad_x, grad_w, grad_b)
    ctx.set_materialize_grads(False)
    ctx.options = options
    ctx.has_bias = bias is not None
    ctx.precomputed = (
        list(grad_mask)
        if reference.linear_ce_grads_in_forward(x.dtype, options.reduction, grad_mask)
        else [False, False, False]
    )
    ctx.save_for_backward(x, weight, target, bias, lse, lse_lo, entropy, grad_x, grad_w, grad_b)


# weights of 4M+ elements: 16 MiB+ of fp32 gradient to copy (csrc/autograd.cpp: the same rule)
_UNIT_CHECK_MIN_NUMEL = 1 << 22


def _is_plain_eager(t: torch.Tensor) -> bool:
    """True when t holds real data and nothing traces it (no compile, fake or proxy mode): only
    then may a value decide which ops run."""
    return (
        type(t) is torch.Tensor
        and not torch.compiler.is_compiling()
        and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is None
    )


def _fused_linear_cross_entropy_backward(ctx, grad_loss, grad_lse, _lo, _pred, grad_entropy, *_):
    """The reference backend's autograd; csrc/autograd.cpp does the same for the compiled ones."""
    x, weight, target, bias, lse, lse_lo, entropy, grad_x, grad_w, grad_b = ctx.saved_tensors
    needs = [
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        ctx.has_bias and ctx.needs_input_grad[3],
    ]
    no_grads = (None,) * (4 + _linear_ce_options.SCHEMA_ARG_COUNT + 1)
    options = ctx.options
    if not options.return_entropy:  # an empty output (a traced graph may still pass a gradient)
        grad_entropy = None
    if (grad_loss is None and grad_lse is None and grad_entropy is None) or not any(needs):
        return no_grads
    option_args = options.schema_args(x.device)
    result = [None, None, None]
    if torch.is_grad_enabled() or grad_lse is not None or grad_entropy is not None:
        # create_graph=True: the reference's formula is made of differentiable ops. A used lse
        # or entropy: its term goes with the loss's, in one backward op.
        if grad_loss is None:
            grad_loss = torch.zeros_like(lse) if options.reduction == "none" else lse.new_zeros(())
        backward = (
            reference.fused_linear_cross_entropy_backward
            if torch.is_grad_enabled()
            else torch.ops.gpufit.fused_linear_cross_entropy_backward.default
        )
        saved_entropy = entropy if grad_entropy is not None else None
        result = list(
            backward(
                grad_loss, grad_lse, grad_entropy, x, weight, target, bias, lse, lse_lo,
                saved_entropy, *option_args, needs,
            )
        )  # fmt: skip
    else:
        missing = [need and not done for need, done in zip(needs, ctx.precomputed, strict=True)]
        if any(missing):
            result = list(
                torch.ops.gpufit.fused_linear_cross_entropy_backward.default(
                    grad_loss,
                    None,
                    None,
                    x,
                    weight,
                    target,
                    bias,
                    lse,
                    lse_lo,
                    None,
                    *option_args,
                    missing,
                )  # fmt: skip
            )
        # The saved gradients are those of the loss itself; scale them by grad_loss. Not in
        # place: a graph kept with retain_graph=True must give the same gradients again. For the
        # usual loss.backward() (grad_loss == 1, checked outside compile) they are returned as
        # they are, so no second (V, H) buffer is needed. Reading grad_loss on a GPU waits for
        # it, which pays only when the copy it saves is big.
        unit = (
            _is_plain_eager(grad_loss)
            and grad_loss.numel() == 1
            and (grad_loss.device.type == "cpu" or weight.numel() >= _UNIT_CHECK_MIN_NUMEL)
            and bool(grad_loss == 1)
        )
        for i, saved in enumerate((grad_x, grad_w, grad_b)):
            if needs[i] and ctx.precomputed[i]:
                result[i] = saved if unit else saved * grad_loss
    grad_x, grad_w, grad_b = (r if need else None for r, need in zip(result, needs, strict=True))
    return (grad_x, grad_w, None, grad_b, *no_grads[4:])


if _PYTHON_KERNELS:
    torch.library.register_autograd(
        "gpufit::fused_linear_cross_entropy",
        _fused_linear_cross_entropy_backward,
        setup_context=_fused_linear_cross_entropy_setup_context,
    )


# ---------------------------------------------------------------- autocast (reference backend)
# The compiled backends register their autocast rule in C++ (csrc/autocast.cpp); the same rule
# for the reference backend's Python-registered ops.


def _autocast_kernel(op, device_type: str):
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def cast(arg, dtype):
        eligible = (
            isinstance(arg, torch.Tensor)
            and arg.dtype in _AUTOCAST_ELIGIBLE
            and arg.device.type == device_type
        )
        return arg.to(dtype) if eligible else arg

    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(cast(a, dtype) for a in args))

    return kernel, key.name


_AUTOCAST_LIBRARIES: list[torch.library.Library] = []

if _PYTHON_KERNELS:
    _library = torch.library.Library("gpufit", "IMPL")
    for _name in ("fused_linear_relu", "fused_linear_cross_entropy"):
        for _device in ("cpu", "cuda"):
            _kernel, _key = _autocast_kernel(getattr(torch.ops.gpufit, _name).default, _device)
            _library.impl(_name, _kernel, _key)
    _AUTOCAST_LIBRARIES.append(_library)  # a Library deregisters its kernels when collected

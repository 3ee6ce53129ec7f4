"""fused_linear_cross_entropy against torch.nn.functional.cross_entropy on the materialised
logits: loss, log-sum-exp and every gradient, each option, odd shapes, registration
(opcheck, torch.compile), the module, bad input, and peak memory."""

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import gpufit
from benchmarks.memory import peak_cpu_bytes
from gpufit import ops, reference

# (atol, rtol) per dtype, for loss and gradients. fp64 is exact math in another order. fp32:
# the anchors' bar (Liger: atol 1e-5 / rtol 5e-4). Half types are compared with a reference that
# uses the same rounded inputs in fp64: what remains is the rounding of the logits chunk and of
# the results, hence loose.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 5e-4),
    torch.bfloat16: (2e-2, 5e-2),
    torch.float16: (5e-3, 1e-2),
}
REDUCTIONS = ["mean", "sum", "none"]
# (ignore_index, label_smoothing, z_loss): plain CE, and everything at once
OPTIONS = [(-100, 0.0, 0.0), (3, 0.1, 1e-3)]
CUDA_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def make_inputs(lead, h, v, dtype, device="cpu", bias=True, seed=0, ignore=None, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, h, generator=g, dtype=torch.float64) * scale
    w = torch.randn(v, h, generator=g, dtype=torch.float64) / max(h, 1) ** 0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, lead, generator=g)
    if ignore is not None and t.numel():
        t.view(-1)[:: max(2, t.numel() // 3)] = ignore  # some ignored rows, never all
    cast = lambda a: None if a is None else a.to(dtype=dtype, device=device)  # noqa: E731
    return cast(x), cast(w), t.to(device), cast(b)


def loss_dtype(dtype):
    """The documented dtype of the loss and lse: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def torch_loss(x, w, t, b, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
               z_loss=0.0, softcap=None, class_weight=None, num_items=None,
               logit_scale=1.0):  # fmt: skip
    """The specification of fused_linear_cross_entropy (this file and test_linear_ce_llm.py):
    the logits (scaled: logit_scale * (x W^T + b), then capped: softcap * tanh(z / softcap)),
    F.cross_entropy with weight=class_weight, plus z_loss * lse^2 per kept row; mean divides by
    the weights of the kept targets (F.cross_entropy's denominator), sum by num_items where
    given."""
    logits = logit_scale * F.linear(x, w, b).reshape(-1, w.shape[0])
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = t.reshape(-1)
    weight = None if class_weight is None else class_weight.to(logits.dtype)
    per_row = F.cross_entropy(logits, flat, weight=weight, ignore_index=ignore_index,
                              reduction="none", label_smoothing=label_smoothing)  # fmt: skip
    valid = flat != ignore_index
    if z_loss:
        per_row = per_row + z_loss * torch.where(valid, logits.logsumexp(-1) ** 2, 0)
    if reduction == "none":
        return per_row.reshape(t.shape)
    total = per_row.sum()
    if reduction == "sum":
        return total if num_items is None else total / num_items
    if weight is None:
        return total / valid.sum()
    return total / torch.where(valid, weight[torch.where(valid, flat, 0)], 0).sum()


def run(fn, x, w, t, b, grad_seed=1, **kwargs):
    """Loss and gradients (x, weight[, bias]) of fn for a random upstream gradient."""
    leaves = [a.detach().clone().requires_grad_() for a in (x, w) + ((b,) if b is not None else ())]
    loss = fn(leaves[0], leaves[1], t, leaves[2] if b is not None else None, **kwargs)
    g = torch.Generator().manual_seed(grad_seed)
    grad = (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss)
    grads = torch.autograd.grad(loss, leaves, grad)
    return loss.detach(), grads


def assert_matches_torch(x, w, t, b, **kwargs):
    atol, rtol = TOLERANCES[x.dtype]
    loss, grads = run(ops.fused_linear_cross_entropy, x, w, t, b, **kwargs)
    # the reference runs in fp64 on the same (possibly rounded) inputs
    up = [None if a is None else a.double() for a in (x, w, b)]
    kwargs.pop("chunk_size", None)
    ref_loss, ref_grads = run(torch_loss, up[0], up[1], t, up[2], **kwargs)
    assert loss.dtype == loss_dtype(x.dtype) and loss.shape == ref_loss.shape
    assert torch.isfinite(loss).all() or not torch.isfinite(ref_loss).all()
    torch.testing.assert_close(loss.double(), ref_loss, atol=atol, rtol=rtol, equal_nan=True)
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads, strict=False):
        assert got.dtype == x.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=name)


# ---------------------------------------------------------------- values and gradients, CPU


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index,label_smoothing,z_loss", OPTIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_torch_cpu(dtype, reduction, ignore_index, label_smoothing, z_loss, bias):
    # V = 61 and N = 29 are multiples of no chunk: the last chunk/block is a short one
    x, w, t, b = make_inputs((29,), 24, 61, dtype, bias=bias, ignore=ignore_index)
    for chunk_size in (None, 8):
        assert_matches_torch(
            x, w, t, b, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, chunk_size=chunk_size,
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index,label_smoothing,z_loss", OPTIONS)
def test_matches_torch_cpu_vocabulary_blocks(dtype, reduction, ignore_index, label_smoothing,
                                             z_loss):  # fmt: skip
    # With no chunk_size, a vocabulary this much larger than H leaves PyTorch's chunk rule one
    # row, and the logits (390K) are over the one-chunk floor, so the CPU takes vocabulary blocks
    # (V = 3000 ends on a short block) and still computes the gradients in forward.
    x, w, t, b = make_inputs((130,), 4, 3000, dtype, ignore=ignore_index)
    assert_matches_torch(
        x, w, t, b, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss,
    )  # fmt: skip


@pytest.mark.parametrize(
    "lead,h,v",
    [((1,), 5, 7), ((1,), 3, 1), ((2, 5), 6, 9), ((), 4, 5), ((0,), 4, 5), ((3,), 0, 4)],
    ids=["N=1", "V=1", "batch dims", "no batch dim", "N=0", "H=0"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_odd_shapes(lead, h, v, dtype, reduction):
    x, w, t, b = make_inputs(lead, h, v, dtype)
    for chunk_size in (None, 2):  # the default plan, and chunks shorter than N
        assert_matches_torch(x, w, t, b, reduction=reduction, chunk_size=chunk_size)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 40),
    h=st.integers(1, 24),
    v=st.integers(1, 70),
    chunk=st.one_of(st.none(), st.integers(1, 80)),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    reduction=st.sampled_from(REDUCTIONS),
    smoothing=st.sampled_from([0.0, 0.25, 1.0]),
    z_loss=st.sampled_from([0.0, 1e-2]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_torch_random(n, h, v, chunk, dtype, reduction, smoothing, z_loss, bias, seed):
    x, w, t, b = make_inputs((n,), h, v, dtype, bias=bias, seed=seed, ignore=-100)
    assert_matches_torch(
        x, w, t, b, reduction=reduction, label_smoothing=smoothing, z_loss=z_loss,
        chunk_size=chunk,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_logits_do_not_overflow(dtype):
    # logits of magnitude ~1e4 (fp32) / ~1e3 (bf16): exp would overflow without the max shift
    x, w, t, b = make_inputs((17,), 8, 33, dtype, scale=3e4 if dtype == torch.float32 else 3e3)
    loss, grads = run(ops.fused_linear_cross_entropy, x, w, t, b, chunk_size=4)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    up = [a.double() for a in (x, w, b)]
    ref_loss, _ = run(torch_loss, up[0], up[1], t, up[2])
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-2, atol=0)


def test_all_ignored_mean_is_nan_like_pytorch():
    x, w, t, b = make_inputs((6,), 4, 5, torch.float64)
    t = torch.full_like(t, -100)
    for reduction, expected in (("mean", float("nan")), ("sum", 0.0)):
        loss, grads = run(ops.fused_linear_cross_entropy, x, w, t, b, reduction=reduction)
        torch.testing.assert_close(loss, torch.tensor(expected, dtype=x.dtype), equal_nan=True)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
        ref_loss = torch_loss(x, w, t, b, reduction=reduction)
        torch.testing.assert_close(loss, ref_loss, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_return_lse(dtype):
    x, w, t, b = make_inputs((2, 7), 6, 11, dtype)
    loss, lse = ops.fused_linear_cross_entropy(x, w, t, b, return_lse=True, chunk_size=3)
    want = F.linear(x.double(), w.double(), b.double()).logsumexp(-1)
    assert lse.shape == t.shape
    assert lse.dtype == loss_dtype(dtype)
    torch.testing.assert_close(
        lse.double(), want, atol=1e-5 if dtype == torch.float64 else 2e-2, rtol=1e-3
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_only_requested_gradients(reduction, dtype):
    x, w, t, b = make_inputs((9,), 5, 13, dtype)
    xr = x.clone().requires_grad_()  # a frozen head: only x needs a gradient
    loss = ops.fused_linear_cross_entropy(xr, w, t, b, reduction=reduction, chunk_size=4)
    loss.sum().backward()
    xd = x.double().requires_grad_()
    torch_loss(xd, w.double(), t, b.double(), reduction=reduction).sum().backward()
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(xr.grad.double(), xd.grad, atol=atol, rtol=rtol)
    assert w.grad is None and b.grad is None


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_any_subset_of_inputs_gets_its_gradients(reduction, dtype):
    """Gradients only for what requires grad, right whether forward precomputed them (fp64,
    scalar loss) or backward computes them; bias is autograd input 3 only when given."""
    atol, rtol = TOLERANCES[dtype]
    for bias in (True, False):
        x, w, t, b = make_inputs((9,), 5, 13, dtype, bias=bias, ignore=-100)
        inputs = [a for a in (x, w, b) if a is not None]
        for wanted in itertools.product([True, False], repeat=len(inputs)):
            pairs = zip(inputs, wanted, strict=True)
            leaves = [a.detach().clone().requires_grad_(on) for a, on in pairs]
            if len(leaves) == 2:
                leaves.append(None)
            loss = ops.fused_linear_cross_entropy(*leaves[:2], t, leaves[2], reduction=reduction)
            up = [a.detach().double().clone().requires_grad_() for a in inputs]
            want = torch_loss(*up[:2], t, up[2] if bias else None, reduction=reduction)
            if not any(wanted):
                assert not loss.requires_grad
                continue
            loss.sum().backward()
            want.sum().backward()
            for leaf, ref, on in zip(leaves, up, wanted, strict=False):
                if on:
                    torch.testing.assert_close(leaf.grad.double(), ref.grad, atol=atol, rtol=rtol)
                else:
                    assert leaf.grad is None, (bias, wanted)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_upstream_gradient_scales_the_gradients(reduction, dtype):
    """(2 * loss).backward() doubles every gradient, also those forward precomputed for
    grad_loss = 1 (fp32, scalar loss)."""
    x, w, t, b = make_inputs((9,), 5, 13, dtype, ignore=-100)
    grads = {}
    for scale in (1.0, 2.0, 0.0):
        leaves = [a.clone().requires_grad_() for a in (x, w, b)]
        loss = ops.fused_linear_cross_entropy(
            leaves[0], leaves[1], t, leaves[2], reduction=reduction
        )
        (scale * loss).sum().backward()
        grads[scale] = [a.grad for a in leaves]
    for one, two, zero in zip(grads[1.0], grads[2.0], grads[0.0], strict=True):
        torch.testing.assert_close(two, 2 * one, atol=0, rtol=0)
        assert torch.equal(zero, torch.zeros_like(zero))


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_retain_graph_gives_the_same_gradients_twice(dtype, scale):
    """Backward may run twice on a kept graph: the precomputed gradients are never scaled in
    place, and for grad_loss == 1 they are handed out as they are, without a copy."""
    x, w, t, b = make_inputs((9,), 5, 13, dtype)
    x, w, b = (a.requires_grad_() for a in (x, w, b))
    loss = scale * ops.fused_linear_cross_entropy(x, w, t, b)
    first = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
    second = torch.autograd.grad(loss, (x, w, b))
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)
    precomputed = ops.BACKEND.kind != "reference" and dtype == torch.float32
    if precomputed and scale == 1.0:
        assert all(a.data_ptr() == c.data_ptr() for a, c in zip(first, second, strict=True))


@pytest.mark.skipif(ops.BACKEND.kind == "reference", reason="the reference has Python autograd")
def test_autograd_is_the_cpp_function():
    """The compiled backends run backward through csrc/autograd.cpp, not a Python formula."""
    name = "gpufit::fused_linear_cross_entropy"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd")
    x, w, t, b = make_inputs((3,), 4, 5, torch.float32)
    loss = ops.fused_linear_cross_entropy(x.requires_grad_(), w, t, b)
    assert "FusedLinearCrossEntropyFunction" in loss.grad_fn.name()


@pytest.mark.skipif(ops.BACKEND.kind == "reference", reason="the reference checks in Python")
def test_forward_runs_no_tensor_op_but_the_kernel():
    """The wrapper's checks look at metadata only: the CPU kernel refuses bad targets itself."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    seen = []
    x, w, t, b = make_inputs((9,), 5, 13, torch.float32, ignore=-100)
    with Record():
        ops.fused_linear_cross_entropy(x.requires_grad_(), w, t, b)
    # autograd saves the differentiable lse output for backward; under a Python dispatch mode
    # as a detached alias (no data is read)
    assert [op for op in seen if op != "aten.detach.default"] == [
        "gpufit.fused_linear_cross_entropy.default"
    ]


def test_no_grad_forward_matches():
    x, w, t, b = make_inputs((9,), 5, 13, torch.float64)
    x.requires_grad_()
    with torch.no_grad():
        loss = ops.fused_linear_cross_entropy(x, w, t, b)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, torch_loss(x.detach(), w, t, b))


def test_compiled_op_equals_the_fallback_reference():
    """The compiled kernels and gpufit.reference (the fallback) give the same op results."""
    x, w, t, b = make_inputs((10,), 6, 14, torch.float64, ignore=2)
    cw = torch.linspace(0.5, 2.0, 14, dtype=torch.float64)
    for reduction, new in itertools.product(REDUCTIONS, (False, True)):
        # the options after z_loss: softcap, class_weight, num_items, chunk_size,
        # return_predicted, temperature, return_entropy, return_log_sum_sq_probs,
        # return_mean_logits
        items = torch.tensor(3.0) if reduction == "sum" else None
        more = (
            (2.0, cw, items, 4, True, 0.7, True, True, True)
            if new
            else (None, None, None, 4, False, 1.0, False, False, False)
        )
        for mask in ([True, True, True], [False, True, False], [False, False, False]):
            args = (x, w, t, b, 2, reduction, 0.1, 1e-3, *more, mask)
            got = torch.ops.gpufit.fused_linear_cross_entropy.default(*args)
            want = reference.fused_linear_cross_entropy(*args)
            for a, c in zip(got, want, strict=True):
                assert a.shape == c.shape
                torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-10)
            lse, lse_lo, entropy = got[1], got[2], got[4]
            g = torch.rand(t.shape if reduction == "none" else (), dtype=x.dtype)
            g_entropy = torch.rand(t.shape, dtype=x.dtype) if new else None
            for g_lse in (None, torch.rand(t.shape, dtype=x.dtype)):
                saved_entropy = entropy if new else None
                bargs = (g, g_lse, g_entropy, x, w, t, b, lse, lse_lo, saved_entropy, 2,
                         reduction, 0.1, 1e-3, *more, mask)  # fmt: skip
                got_b = torch.ops.gpufit.fused_linear_cross_entropy_backward.default(*bargs)
                want_b = reference.fused_linear_cross_entropy_backward(*bargs)
                for a, c in zip(got_b, want_b, strict=True):
                    assert a.shape == c.shape
                    torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-10)


def test_gradcheck_float64():
    x, w, t, b = make_inputs((5,), 4, 7, torch.float64, ignore=1)
    inputs = [a.requires_grad_() for a in (x, w, b)]
    for reduction in REDUCTIONS:
        fn = lambda x, w, b, reduction=reduction: ops.fused_linear_cross_entropy(  # noqa: E731
            x, w, t, b, ignore_index=1, reduction=reduction, label_smoothing=0.2, z_loss=0.01,
            chunk_size=2,
        )  # fmt: skip
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- cases from the field's suites
# Re-expressed from PyTorch's own linear_cross_entropy / cross_entropy tests, Liger-Kernel's and
# Cut Cross-Entropy's suites, on each CPU path: (name, leading shape, H, V, chunk_size, dtype),
# and on CUDA where a GPU is visible (the same shapes through the CUDA kernels' chunk loops).
PLANS = [
    ("one chunk", (12,), 16, 10, None, torch.float32),
    ("row chunks", (12,), 8, 30, 4, torch.float32),
    ("vocabulary blocks", (40,), 4, 8000, None, torch.float32),
    ("vocabulary blocks, many row tiles", (300,), 4, 3000, None, torch.float32),
    ("vocabulary blocks, two workers", (512,), 64, 4096, None, torch.float32),
    ("bf16 blocks", (12,), 8, 30, 16, torch.bfloat16),
    ("fp64", (12,), 8, 30, None, torch.float64),
]
PLAN_IDS = [p[0] for p in PLANS]
FP_PLANS = [p for p in PLANS if p[5] != torch.bfloat16]
FP_PLAN_IDS = [p[0] for p in FP_PLANS]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,lead,h,v,chunk,dtype", PLANS, ids=PLAN_IDS)
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_masked_vocabulary_minus_inf_logits(name, lead, h, v, chunk, dtype, z_loss, device):
    """A vocabulary masked through the bias (padding classes at -inf, never a target) gives a
    finite loss and gradients, as F.cross_entropy does: no 0 * -inf in the smoothing term."""
    x, w, t, b = make_inputs(lead, h, v, dtype, device=device, ignore=-100)
    b[v - v // 3 :] = -float("inf")
    t = torch.where(t >= v - v // 3, t % (v // 2), t)
    loss, grads = run(ops.fused_linear_cross_entropy, x, w, t, b, chunk_size=chunk, z_loss=z_loss)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads), name
    assert_matches_torch(x, w, t, b, chunk_size=chunk, z_loss=z_loss, reduction="none")
    assert_matches_torch(x, w, t, b, chunk_size=chunk, z_loss=z_loss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,lead,h,v,chunk,dtype", PLANS, ids=PLAN_IDS)
def test_masked_vocabulary_with_label_smoothing_is_inf_like_pytorch(name, lead, h, v, chunk,
                                                                   dtype, device):  # fmt: skip
    # With smoothing every class gets target mass, and a -inf logit makes the loss inf, in
    # PyTorch too.
    x, w, t, b = make_inputs(lead, h, v, dtype, device=device)
    b[-1] = -float("inf")
    t = t % (v - 1)
    loss = ops.fused_linear_cross_entropy(x, w, t, b, chunk_size=chunk, label_smoothing=0.1)
    want = torch_loss(x.double(), w.double(), t, b.double(), label_smoothing=0.1)
    assert torch.isinf(want) and torch.isinf(loss), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("chunk", [None, 2])
def test_large_common_logit_pytorch_case(dtype, chunk, device):
    """PyTorch's own case: every logit equals 4096 * 4096, so the loss is log(8) and grad_x is
    0; a loss formed as (max + log s) - z_target rounds to 2.0 in fp32."""
    x = torch.full((4, 1), 4096.0, dtype=dtype, device=device, requires_grad=True)
    w = torch.full((8, 1), 4096.0, dtype=dtype, device=device, requires_grad=True)
    t = torch.tensor([0, 3, 5, 7], device=device)
    loss = ops.fused_linear_cross_entropy(x, w, t, chunk_size=chunk)
    loss.backward()
    torch.testing.assert_close(loss.double().cpu(), torch.tensor(math.log(8), dtype=torch.float64))
    assert x.grad.abs().max() <= 1e-3, x.grad


def dyadic_inputs(lead, h, v, offset, seed=0):
    """x, weight and bias whose logits are exact in fp32 in any order of summation: multiples
    of 1/64 around `offset` (a power of two up to 2**17, where 1/64 is fp32's spacing)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (*lead, h), generator=g).double() / 8
    w = torch.randint(-4, 5, (v, h), generator=g).double() / 8
    b = offset + torch.randint(-64, 65, (v,), generator=g).double() / 64
    t = torch.randint(0, v, lead, generator=g)
    return x, w, t, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,lead,h,v,chunk,dtype", FP_PLANS, ids=FP_PLAN_IDS)
@pytest.mark.parametrize("offset", [2.0**17, -(2.0**17)])
def test_large_bias_offset(name, lead, h, v, chunk, dtype, offset, device):
    """Logits sharing an offset of 1.3e5 (fp32 spacing there: 1/64), exact in fp32: loss and
    gradients as precise as without the offset, as PyTorch's log_softmax is (forming them from
    a rounded lse errs by up to 1/128)."""
    x, w, t, b = (a.to(device) for a in dyadic_inputs(lead, h, v, offset))
    t.view(-1)[::5] = -100
    cast = [a.to(dtype) for a in (x, w, b)]
    opts = dict(reduction="none", label_smoothing=0.1, z_loss=0.0)
    loss, grads = run(ops.fused_linear_cross_entropy, *cast[:2], t, cast[2], chunk_size=chunk,
                      **opts)  # fmt: skip
    ref_loss, ref_grads = run(torch_loss, x, w, t, b, **opts)
    torch.testing.assert_close(loss.double(), ref_loss, atol=2e-5, rtol=0)
    for got, want, what in zip(grads, ref_grads, ("x", "weight", "bias"), strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4, msg=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,lead,h,v,chunk,dtype", PLANS, ids=PLAN_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_lse_is_differentiable(name, lead, h, v, chunk, dtype, reduction, device):
    """A z-loss built from the returned lse trains, as Cut Cross-Entropy's lse does: its
    gradient is that of torch.logsumexp of the eager logits (also for ignored rows)."""
    x, w, t, b = make_inputs(lead, h, v, dtype, device=device, ignore=-100)

    def fused(x, w, t, b):
        loss, lse = ops.fused_linear_cross_entropy(
            x, w, t, b, chunk_size=chunk, reduction=reduction, return_lse=True
        )
        return loss.sum() + 0.3 * (lse**2).mean()

    def eager(x, w, t, b):
        lse = F.linear(x, w, b).logsumexp(-1)
        return torch_loss(x, w, t, b, reduction=reduction).sum() + 0.3 * (lse**2).mean()

    loss, grads = run(fused, x, w, t, b)
    up = [a.double() for a in (x, w, b)]
    ref_loss, ref_grads = run(eager, up[0], up[1], t, up[2])
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, atol=atol, rtol=rtol)
    for got, want, what in zip(grads, ref_grads, ("x", "weight", "bias"), strict=True):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,lead,h,v,chunk,dtype", PLANS, ids=PLAN_IDS)
def test_lse_alone_gets_its_gradient(name, lead, h, v, chunk, dtype, device):
    x, w, t, b = make_inputs(lead, h, v, dtype, device=device)

    def lse_only(x, w, t, b):
        return ops.fused_linear_cross_entropy(x, w, t, b, chunk_size=chunk, return_lse=True)[1]

    _, grads = run(lse_only, x, w, t, b)
    up = [a.double() for a in (x, w, b)]
    _, want = run(lambda x, w, t, b: F.linear(x, w, b).logsumexp(-1), up[0], up[1], t, up[2])
    atol, rtol = TOLERANCES[dtype]
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_give_fp32_loss_and_lse(dtype, device):
    """Per-token loss and lse of half inputs come back in fp32, not rounded to 8 (bf16) or 11
    (fp16) bits."""
    x, w, t, b = make_inputs((64,), 16, 50, dtype, device=device, scale=3.0)
    loss, lse = ops.fused_linear_cross_entropy(x, w, t, b, reduction="none", return_lse=True)
    assert loss.dtype == lse.dtype == torch.float32
    for values in (loss, lse):
        rounded = values.to(dtype).float()
        assert (values != rounded).float().mean() > 0.5, "values carry only the input's bits"
    logits = F.linear(x, w, b).double()  # the op's logits are rounded to dtype, as eager's
    want = F.cross_entropy(logits, t, reduction="none")
    torch.testing.assert_close(loss.double(), want, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("threads", [1, 2])
def test_long_rows_sum_in_fp32_precision(threads):
    """fp32 exp-sums over V = 2**20 classes, on every path: pairwise / blocked, so the lse of
    each row is as precise as eager PyTorch's (a serial sum lost 1.6e-3)."""
    torch.manual_seed(0)
    n, h, v = 3, 4, 1 << 20
    x = torch.randn(n, h)
    w = torch.randn(v, h) * 2
    t = torch.randint(0, v, (n,))
    want = F.linear(x.double(), w.double()).logsumexp(-1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for chunk in (None, 2):
            _, lse = ops.fused_linear_cross_entropy(x, w, t, chunk_size=chunk, return_lse=True)
            err = ((lse.double() - want).abs() / want.abs()).max()
            assert err < 2e-6, (chunk, float(err))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocabulary_blocks_give_the_same_result_on_any_thread_count(reduction):
    """The parallel phases split the work by tiles, never a sum across threads: 1, 2 and 3
    threads agree to fp32 rounding (and each with PyTorch)."""
    x, w, t, b = make_inputs((512,), 64, 4096, torch.float32, ignore=-100)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run(ops.fused_linear_cross_entropy, x, w, t, b, reduction=reduction))
    finally:
        torch.set_num_threads(before)
    (loss, grads), others = results[0], results[1:]
    for other_loss, other_grads in others:
        torch.testing.assert_close(other_loss, loss, atol=1e-6, rtol=1e-6)
        for got, want in zip(other_grads, grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- autocast


def eager_loss(x, w, t, b, **kwargs):
    return F.cross_entropy(F.linear(x, w, b), t, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,lead,h,v,chunk,dtype", PLANS[:4], ids=PLAN_IDS[:4])
@pytest.mark.parametrize("hidden", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_runs_like_eager(name, lead, h, v, chunk, dtype, hidden, autocast_dtype, device):
    """Under torch.autocast the op casts x, weight and bias as F.linear does (a bf16 hidden
    state with an fp32 head runs, as a Hugging Face model under autocast passes it), returns an
    fp32 loss, and each parameter gets its gradient in its own dtype, close to eager's."""
    x, w, t, b = make_inputs(lead, h, v, torch.float32, device=device, ignore=-100)
    x = x.to(hidden)
    fused = [a.clone().requires_grad_() for a in (x, w, b)]
    eager = [a.clone().requires_grad_() for a in (x, w, b)]
    with torch.autocast(device, dtype=autocast_dtype):
        loss = ops.fused_linear_cross_entropy(*fused[:2], t, fused[2], chunk_size=chunk)
        want = eager_loss(eager[0], eager[1], t, eager[2])
    assert loss.dtype == want.dtype == torch.float32
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss, want, atol=2e-2, rtol=2e-2)
    for got, ref in zip(fused, eager, strict=True):
        assert got.grad is not None and got.grad.dtype == got.dtype
        torch.testing.assert_close(got.grad.float(), ref.grad.float(), atol=2e-2, rtol=5e-2)


def test_autocast_leaves_float64_alone():
    x, w, t, b = make_inputs((9,), 5, 13, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.fused_linear_cross_entropy(x, w, t, b)
        want = eager_loss(x, w, t, b)
    assert loss.dtype == want.dtype == torch.float64
    torch.testing.assert_close(loss, want)


def test_autocast_weight_gradient_does_not_depend_on_the_plan():
    """The MNIST head under autocast: one chunk or many, the same rule casts the inputs and no
    GEMM inside the op is cast again, so the weight gradients agree far below bf16's spacing."""
    x, w, t, b = make_inputs((64,), 256, 10, torch.float32)
    grads = []
    for chunk in (None, 4):
        wr = w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ops.fused_linear_cross_entropy(x, wr, t, b, chunk_size=chunk)
        loss.backward()
        grads.append(wr.grad)
    assert (grads[0] - grads[1]).norm() <= 1e-3 * grads[1].norm()


@pytest.mark.parametrize("name,lead,h,v,chunk,dtype", PLANS[:4], ids=PLAN_IDS[:4])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_inside_autocast_keeps_fp32(name, lead, h, v, chunk, dtype, reduction):
    """A forward outside autocast and a backward inside it (the autograd engine runs backward
    with the thread's autocast state): the gradients keep fp32 precision on every path."""
    x, w, t, b = make_inputs(lead, h, v, torch.float32, ignore=-100)
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    loss = ops.fused_linear_cross_entropy(*leaves[:2], t, leaves[2], chunk_size=chunk,
                                          reduction=reduction)  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss.sum().backward()
    up = [a.double().requires_grad_() for a in (x, w, b)]
    torch_loss(up[0], up[1], t, up[2], reduction=reduction).sum().backward()
    for got, ref in zip(leaves, up, strict=True):
        assert (got.grad.double() - ref.grad).norm() <= 1e-5 * ref.grad.norm()


# ---------------------------------------------------------------- double backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk", [None, 2])
def test_hessian_matches_the_unfused_op(reduction, chunk, device):
    """torch.autograd.functional.hessian through the op (create_graph=True) equals the
    unfused one's, in float64: double backward is computed, never a silent zero."""
    x, w, t, b = make_inputs((5,), 3, 4, torch.float64, device=device, ignore=1)
    opts = dict(ignore_index=1, reduction=reduction, label_smoothing=0.2, z_loss=0.01)

    def fused(x, w, b):
        loss, lse = ops.fused_linear_cross_entropy(x, w, t, b, chunk_size=chunk,
                                                   return_lse=True, **opts)  # fmt: skip
        return loss.sum() + 0.1 * (lse**2).sum()

    def eager(x, w, b):
        lse = F.linear(x, w, b).logsumexp(-1)
        return torch_loss(x, w, t, b, **opts).sum() + 0.1 * (lse**2).sum()

    got = torch.autograd.functional.hessian(fused, (x, w, b))
    want = torch.autograd.functional.hessian(eager, (x, w, b))
    for row_got, row_want in zip(got, want, strict=True):
        for a, c in zip(row_got, row_want, strict=True):
            assert c.abs().max() > 0
            torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gradient_penalty_trains(dtype):
    """A gradient penalty on d loss / d x (WGAN-GP style) reaches the head's parameters."""
    x, w, t, b = make_inputs((6,), 4, 7, dtype)
    grads = {}
    for name, fn in (("fused", ops.fused_linear_cross_entropy), ("eager", torch_loss)):
        leaves = [a.clone().requires_grad_() for a in (x, w, b)]
        loss = fn(leaves[0], leaves[1], t, leaves[2])
        (gx,) = torch.autograd.grad(loss, leaves[0], create_graph=True)
        assert gx.requires_grad
        (gx**2).sum().backward()
        grads[name] = [a.grad for a in leaves[1:]]
    for got, want in zip(grads["fused"], grads["eager"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- registration


# the schema's last options at their defaults: temperature, return_entropy,
# return_log_sum_sq_probs, return_mean_logits (tests/test_linear_ce_per_token.py sets them)
DEFAULTS = (1.0, False, False, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(dtype, reduction):
    x, w, t, b = make_inputs((6,), 5, 9, dtype, ignore=-100)
    for requires_grad in (True, False):
        for a in (x, w, b):
            a.requires_grad_(requires_grad)
        mask = [requires_grad] * 3
        args = (x, w, t, b, -100, reduction, 0.1, 1e-3, None, None, None, 4, False, *DEFAULTS, mask)
        torch.library.opcheck(torch.ops.gpufit.fused_linear_cross_entropy.default, args)
    with torch.no_grad():
        _, lse, lse_lo, *_ = torch.ops.gpufit.fused_linear_cross_entropy.default(*args)
    g = torch.rand(t.shape if reduction == "none" else (), dtype=loss_dtype(dtype))
    for g_lse in (None, torch.rand(t.shape, dtype=loss_dtype(dtype))):
        for mask in ([True, True, True], [True, False, False]):
            bargs = (g, g_lse, None, x.detach(), w.detach(), t, b.detach(), lse, lse_lo, None,
                     -100, reduction, 0.1, 1e-3, None, None, None, 4, False, *DEFAULTS,
                     mask)  # fmt: skip
            torch.library.opcheck(
                torch.ops.gpufit.fused_linear_cross_entropy_backward.default, bargs
            )


class Head(torch.nn.Module):
    def __init__(self, h=12, v=37):
        super().__init__()
        self.body = torch.nn.Linear(8, h)
        self.head = torch.nn.Linear(h, v)
        self.loss = gpufit.FusedLinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=5)

    def forward(self, x, target):
        return self.loss(torch.tanh(self.body(x)), self.head.weight, target, self.head.bias)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Head()
    x, target = torch.randn(2, 9, 8), torch.randint(0, 37, (2, 9))
    target[0, 0] = -100
    eager = model(x, target)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, target)
    out.backward()
    torch.testing.assert_close(out, eager)
    for got, want in zip([p.grad for p in model.parameters()], eager_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph_under_autocast():
    """A fused MLP and head under autocast, compiled: the same loss and gradients as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    body = gpufit.fuse(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()))
    head = torch.nn.Linear(16, 37)
    params = [*body.parameters(), *head.parameters()]

    def step(x, target):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.fused_linear_cross_entropy(body(x), head.weight, target, head.bias)

    x, target = torch.randn(9, 8), torch.randint(0, 37, (9,))
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        loss = fn(x, target)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in params]))
        for p in params:
            p.grad = None
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert compiled.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_module_matches_cross_entropy_of_the_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11)
    loss_fn = gpufit.FusedLinearCrossEntropyLoss(reduction="sum")
    assert "reduction='sum'" in repr(loss_fn)
    x, target = torch.randn(4, 6), torch.randint(0, 11, (4,))
    torch.testing.assert_close(
        loss_fn(x, head.weight, target, head.bias),
        F.cross_entropy(head(x), target, reduction="sum"),
    )


# ---------------------------------------------------------------- bad input


def _good():
    x, w, t, b = make_inputs((4,), 3, 5, torch.float32)
    return x, w, t, b


@pytest.mark.parametrize(
    "change,error,pattern",
    [
        (
            lambda x, w, t, b: (x, w, torch.tensor([0, 1, 5, 2]), b),
            ValueError,
            "target 5 is out of range",
        ),
        (
            lambda x, w, t, b: (x, w, torch.tensor([0, -1, 2, 2]), b),
            ValueError,
            "target -1 is out of range",
        ),
        (lambda x, w, t, b: (x, w, t.int(), b), TypeError, r"int64 \(or uint8\) class indices"),
        (lambda x, w, t, b: (x, w, t.float(), b), TypeError, r"int64 \(or uint8\) class indices"),
        (lambda x, w, t, b: (x, w, t[:3], b), ValueError, "target shape"),
        (lambda x, w, t, b: (x, w, t[:, None], b), ValueError, "target shape"),
        (lambda x, w, t, b: (x, w, [0, 1, 2, 3], b), TypeError, "must be a torch.Tensor"),
        (lambda x, w, t, b: (x, w.double(), t, b), TypeError, "dtype mismatch"),
        (lambda x, w, t, b: (x, w, t, b.double()), TypeError, "dtype mismatch"),
        (lambda x, w, t, b: (x, w[:, :2], t, b), ValueError, "shape mismatch"),
        (lambda x, w, t, b: (x, w, t, b[:4]), ValueError, r"bias must have shape \(5,\)"),
        (lambda x, w, t, b: (x, w.to("meta"), t, b), ValueError, "device mismatch"),
        (lambda x, w, t, b: (x, w, t.to("meta"), b), ValueError, "device mismatch"),
        (
            lambda x, w, t, b: (x, w[:0], t[:0] * 0, b[:0]),
            ValueError,
            "target shape|at least one class",
        ),
    ],
)
def test_bad_input_is_refused_clearly(change, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.fused_linear_cross_entropy(*change(*_good()))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"z_loss": -1.0}, "z_loss"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"ignore_index": 1.0}, "ignore_index"),
    ],
)
def test_bad_options_are_refused_clearly(kwargs, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        ops.fused_linear_cross_entropy(*_good(), **kwargs)


# Argument edges: what F.cross_entropy does with the same values, or a clear error naming the
# argument (chunk_size is gpufit's own: any positive integer, a numpy one too).
@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"ignore_index": 2**63}, ValueError, "ignore_index=9223372036854775808 does not fit"),
        ({"ignore_index": -(2**63) - 1}, ValueError, "ignore_index=.* does not fit in int64"),
        ({"ignore_index": True}, TypeError, "ignore_index must be an int"),
        ({"ignore_index": "1"}, TypeError, "ignore_index must be an int"),
        ({"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a float, got '0.1'"),
        ({"label_smoothing": None}, TypeError, "label_smoothing must be a float"),
        ({"label_smoothing": float("nan")}, ValueError, "label_smoothing must be a number"),
        ({"z_loss": "1e-4"}, TypeError, "z_loss must be a float"),
        ({"chunk_size": 1.5}, TypeError, "chunk_size must be a positive int or None"),
        ({"chunk_size": True}, TypeError, "chunk_size must be a positive int or None"),
        ({"chunk_size": -(2**63)}, ValueError, "chunk_size must be a positive int or None"),
    ],
)
def test_argument_edges_are_refused_clearly(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.fused_linear_cross_entropy(*_good(), **kwargs)


def test_argument_edges_pytorch_accepts_are_accepted():
    x, w, t, b = _good()
    want = F.cross_entropy(F.linear(x, w, b), t, ignore_index=2, label_smoothing=0.1)
    same = [
        {"ignore_index": np.int64(2), "label_smoothing": np.float32(0.1)},
        {"ignore_index": torch.tensor(2), "label_smoothing": torch.tensor(0.1)},
        {"ignore_index": 2, "label_smoothing": 0.1, "chunk_size": 2**63},
        {"ignore_index": 2, "label_smoothing": 0.1, "chunk_size": np.int64(2)},
        {"ignore_index": 2, "label_smoothing": 0.1, "chunk_size": 2**100},
    ]
    for kwargs in same:
        got = ops.fused_linear_cross_entropy(x, w, t, b, **kwargs)
        torch.testing.assert_close(got, want, msg=str(kwargs))
    # an int smoothing, and uint8 class indices (which F.cross_entropy takes too)
    torch.testing.assert_close(
        ops.fused_linear_cross_entropy(x, w, t.to(torch.uint8), b, label_smoothing=1),
        F.cross_entropy(F.linear(x, w, b), t.to(torch.uint8), label_smoothing=1),
    )
    u8 = t.to(torch.uint8)
    u8[0] = 255
    torch.testing.assert_close(
        ops.fused_linear_cross_entropy(x, w, u8, b, ignore_index=255),
        F.cross_entropy(F.linear(x, w, b), u8, ignore_index=255),
    )


def test_ignore_index_target_is_not_out_of_range():
    x, w, t, b = _good()
    t[1] = 7  # out of range for 5 classes, but it is the ignore_index
    loss = ops.fused_linear_cross_entropy(x, w, t, b, ignore_index=7)
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(x, w, b), t, ignore_index=7))


@pytest.mark.compiled
@pytest.mark.parametrize(
    "change,error,pattern",
    [
        (lambda a: {**a, "target": torch.tensor([0, 1, 9, 2])}, ValueError, "out of range"),
        (lambda a: {**a, "target": a["target"].int()}, RuntimeError, "int64"),
        (lambda a: {**a, "reduction": "avg"}, RuntimeError, "reduction must be"),
        (lambda a: {**a, "weight": a["weight"].double()}, RuntimeError, "dtype mismatch"),
        (lambda a: {**a, "softcap": -1.0}, RuntimeError, "softcap must be a positive"),
        (lambda a: {**a, "class_weight": torch.ones(4)}, RuntimeError, r"class_weight must have"),
        (lambda a: {**a, "num_items": torch.tensor(2.0)}, RuntimeError, "reduction='sum' only"),
        (lambda a: {**a, "reduction": "sum", "num_items": torch.ones(2)}, RuntimeError, "0-dim"),
        (lambda a: {**a, "temperature": 0.0}, RuntimeError, "temperature must be a positive"),
    ],
)
def test_direct_op_call_is_guarded_in_cpp(change, error, pattern):
    x, w, t, b = _good()
    args = dict(x=x, weight=w, target=t, bias=b, ignore_index=-100, reduction="mean",
                label_smoothing=0.0, z_loss=0.0, softcap=None, class_weight=None, num_items=None,
                chunk_size=0, return_predicted=False, temperature=1.0, return_entropy=False,
                return_log_sum_sq_probs=False, return_mean_logits=False,
                grad_mask=[False] * 3)  # fmt: skip
    with pytest.raises(error, match=pattern):
        torch.ops.gpufit.fused_linear_cross_entropy.default(**change(args))


# ---------------------------------------------------------------- memory


def fused_step(x, w, t, b, chunk_size=None):
    ops.fused_linear_cross_entropy(x, w, t, b, chunk_size=chunk_size).backward()


def eager_step(x, w, t, b, chunk_size=None):
    F.cross_entropy(F.linear(x, w, b), t).backward()


@pytest.mark.compiled  # the reference materialises the logits by design
def test_peak_memory_does_not_grow_with_n_times_v():
    h, v, chunk = 32, 4096, 32
    peaks = {}
    for n in (256, 1024):
        x, w, t, b = make_inputs((n,), h, v, torch.float32)
        x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
        peaks[n] = tuple(peak_cpu_bytes(f, x, w, t, b, chunk) for f in (fused_step, eager_step))
    # what the fused op may hold: a few chunks of logits, the gradients (x, weight, bias) and
    # per-row vectors; nothing of size N x V
    for n, (fused, eager) in peaks.items():
        allowed = 4 * (3 * chunk * v + n * h + v * h + v + 8 * n) + (1 << 16)
        assert fused <= allowed, (n, fused, allowed)
        assert eager >= 4 * 2 * n * v  # the reference holds (N, V) logits at least twice
    grew_fused = peaks[1024][0] - peaks[256][0]
    grew_eager = peaks[1024][1] - peaks[256][1]
    assert grew_fused < 0.05 * grew_eager, peaks


@pytest.mark.compiled
@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13")
@pytest.mark.parametrize(
    "n,h,v",
    [(256, 16, 20000), (512, 64, 3000)],
    ids=["vocabulary blocks", "row chunks"],
)
def test_peak_memory_not_above_torch_chunked(n, h, v):
    # gpufit's default split on CPU never takes more scratch than PyTorch's own chunked
    # linear_cross_entropy; both produce the same gradients, so the peaks compare directly.
    def torch_chunked_step(x, w, t, b, chunk_size=None):
        options = torch.nn.LinearCrossEntropyOptions()
        F.linear_cross_entropy(x, w, t, linear_bias=b, options=options).backward()

    x, w, t, b = make_inputs((n,), h, v, torch.float32)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    ours = peak_cpu_bytes(fused_step, x, w, t, b)
    theirs = peak_cpu_bytes(torch_chunked_step, x, w, t, b)
    assert ours <= theirs, (ours, theirs)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index,label_smoothing,z_loss", OPTIONS)
def test_matches_torch_cuda(dtype, reduction, ignore_index, label_smoothing, z_loss):
    x, w, t, b = make_inputs((29,), 24, 61, dtype, device="cuda", ignore=ignore_index)
    for chunk_size in (None, 8):
        assert_matches_torch(
            x, w, t, b, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, chunk_size=chunk_size,
        )  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "lead,h,v", [((1,), 5, 7), ((2, 5), 6, 9), ((0,), 4, 5), ((300,), 64, 5000)]
)
def test_cuda_shapes(dtype, lead, h, v):
    x, w, t, b = make_inputs(lead, h, v, dtype, device="cuda", ignore=-100)
    assert_matches_torch(x, w, t, b, z_loss=1e-4)
    assert_matches_torch(x, w, t, b, reduction="none")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_cpu_op_and_huge_logits(dtype):
    x, w, t, b = make_inputs((40,), 16, 300, dtype, scale=1e3)
    cpu_loss, cpu_grads = run(ops.fused_linear_cross_entropy, x, w, t, b, chunk_size=16)
    dev = [a.cuda() for a in (x, w, t, b)]
    loss, grads = run(ops.fused_linear_cross_entropy, *dev, chunk_size=16)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.cpu(), cpu_loss, atol=atol * 10, rtol=rtol)
    for got, want in zip(grads, cpu_grads, strict=True):
        torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=rtol)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    x, w, t, b = make_inputs((6,), 5, 9, torch.bfloat16, device="cuda")
    for reduction in REDUCTIONS:
        args = (x.requires_grad_(), w.requires_grad_(), t, b.requires_grad_(), -100, reduction,
                0.1, 1e-3, None, None, None, 4, False, [True] * 3)  # fmt: skip
        torch.library.opcheck(torch.ops.gpufit.fused_linear_cross_entropy.default, args)
    torch._dynamo.reset()
    model = Head().cuda()
    xin, target = torch.randn(3, 8, device="cuda"), torch.randint(0, 37, (3,), device="cuda")
    eager = model(xin, target)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(xin, target), eager)


@pytest.mark.cuda
def test_cuda_device_mismatch_and_bad_target():
    x, w, t, b = make_inputs((4,), 3, 5, torch.float32)
    with pytest.raises(ValueError, match="device mismatch"):
        ops.fused_linear_cross_entropy(x.cuda(), w.cuda(), t, b.cuda())
    # On CUDA the kernel refuses a bad target with a device-side assert (no per-step host sync),
    # which poisons the CUDA context: check it in a child process.
    code = (
        "import torch, gpufit\n"
        "x, w = torch.randn(4, 3, device='cuda'), torch.randn(5, 3, device='cuda')\n"
        "t = torch.tensor([0, 1, 9, 2], device='cuda')\n"
        "gpufit.ops.fused_linear_cross_entropy(x, w, t)\n"
        "torch.cuda.synchronize()\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert child.returncode != 0
    assert "assert" in child.stderr.lower()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_peak_memory_does_not_grow_with_n_times_v(dtype):
    h, v = 256, 32000
    elem = torch.empty(0, dtype=dtype).element_size()
    peaks = {}
    for n in (1024, 4096):
        x, w, t, b = make_inputs((n,), h, v, dtype, device="cuda")
        x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
        for name, step in (("fused", fused_step), ("eager", eager_step)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(x, w, t, b, 256)
            torch.cuda.synchronize()
            peaks[name, n] = torch.cuda.max_memory_allocated() - base
            x.grad = w.grad = b.grad = None
    grew_fused = peaks["fused", 4096] - peaks["fused", 1024]
    grew_eager = peaks["eager", 4096] - peaks["eager", 1024]
    assert grew_eager >= 2 * 3072 * v * elem
    # growth allowed: grad_x (+ its fp32 accumulator for half) and per-row vectors
    assert grew_fused <= 3072 * (h * (elem + 4) + 64) + (8 << 20), peaks

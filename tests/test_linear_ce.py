"""fused_linear_cross_entropy against torch.nn.functional.cross_entropy on the materialised
logits: loss, log-sum-exp and every gradient, each option, odd shapes, registration
(opcheck, torch.compile), the module, bad input, and peak memory."""

import itertools
import subprocess
import sys

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


def torch_loss(x, w, t, b, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    """The specification: F.cross_entropy on the full logits, plus z_loss * lse^2 per kept row."""
    logits = F.linear(x, w, b).reshape(-1, w.shape[0])
    flat = t.reshape(-1)
    loss = F.cross_entropy(
        logits,
        flat,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if z_loss:
        valid = flat != ignore_index
        extra = z_loss * torch.where(valid, logits.logsumexp(-1) ** 2, 0)
        if reduction == "none":
            loss = loss + extra
        elif reduction == "sum":
            loss = loss + extra.sum()
        else:
            loss = loss + extra.sum() / valid.sum()
    return loss.reshape(t.shape) if reduction == "none" else loss


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
    assert loss.dtype == x.dtype and loss.shape == ref_loss.shape
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
    # With no chunk_size, a vocabulary this much larger than H leaves PyTorch's chunk rule less
    # than 64 rows, so the CPU takes vocabulary blocks (64 classes here; V = 1000 ends on a short
    # block) and still computes the gradients in forward.
    x, w, t, b = make_inputs((130,), 4, 1000, dtype, ignore=ignore_index)
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
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
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
    assert seen == ["gpufit.fused_linear_cross_entropy.default"]


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
    for reduction in REDUCTIONS:
        for mask in ([True, True, True], [False, True, False], [False, False, False]):
            args = (x, w, t, b, 2, reduction, 0.1, 1e-3, 4, mask)
            got = torch.ops.gpufit.fused_linear_cross_entropy.default(*args)
            want = reference.fused_linear_cross_entropy(*args)
            for a, c in zip(got, want, strict=True):
                assert a.shape == c.shape
                torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-10)
            lse = got[1]
            g = torch.rand(t.shape if reduction == "none" else (), dtype=x.dtype)
            bargs = (g, x, w, t, b, lse, 2, reduction, 0.1, 1e-3, 4, mask)
            got = torch.ops.gpufit.fused_linear_cross_entropy_backward.default(*bargs)
            want = reference.fused_linear_cross_entropy_backward(*bargs)
            for a, c in zip(got, want, strict=True):
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


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(dtype, reduction):
    x, w, t, b = make_inputs((6,), 5, 9, dtype, ignore=-100)
    for requires_grad in (True, False):
        for a in (x, w, b):
            a.requires_grad_(requires_grad)
        mask = [requires_grad] * 3
        args = (x, w, t, b, -100, reduction, 0.1, 1e-3, 4, mask)
        torch.library.opcheck(torch.ops.gpufit.fused_linear_cross_entropy.default, args)
    with torch.no_grad():
        lse = ops.fused_linear_cross_entropy(x, w, t, b, return_lse=True)[1]
    g = torch.rand(t.shape if reduction == "none" else (), dtype=dtype)
    for mask in ([True, True, True], [True, False, False]):
        bargs = (g, x.detach(), w.detach(), t, b.detach(), lse, -100, reduction, 0.1, 1e-3, 4, mask)
        torch.library.opcheck(torch.ops.gpufit.fused_linear_cross_entropy_backward.default, bargs)


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
        (lambda x, w, t, b: (x, w, t.int(), b), TypeError, "int64 class indices"),
        (lambda x, w, t, b: (x, w, t.float(), b), TypeError, "int64 class indices"),
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
    ],
)
def test_direct_op_call_is_guarded_in_cpp(change, error, pattern):
    x, w, t, b = _good()
    args = dict(x=x, weight=w, target=t, bias=b, ignore_index=-100, reduction="mean",
                label_smoothing=0.0, z_loss=0.0, chunk_size=0, grad_mask=[False] * 3)  # fmt: skip
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
                0.1, 1e-3, 4, [True] * 3)  # fmt: skip
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

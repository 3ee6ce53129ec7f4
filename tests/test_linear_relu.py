"""fused_linear_relu against the pure-PyTorch reference: values, gradients, registration,
torch.compile, modules, and every kind of bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gpufit
from gpufit import ops, reference

# (atol, rtol) per dtype. fp32: the GEMM is the same ATen call, only the epilogue differs.
# Half types: the fused path rounds the GEMM output before adding the bias, PyTorch after.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}
CPU_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# (leading shape of x, in_features, out_features)
SHAPES = [
    ((8,), 16, 4),
    ((64,), 784, 256),  # the MNIST hidden layer
    ((3, 5), 7, 9),  # leading batch dims
    ((), 6, 3),  # 1-D x
    ((1,), 1, 1),
    ((0,), 5, 3),  # empty batch
    ((2, 0, 4), 5, 3),
    ((4,), 0, 3),  # no input features: out = relu(bias)
    ((33,), 17, 65),  # sizes that fit no block evenly
]


def make_inputs(lead, k, n, dtype, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / max(k, 1) ** 0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(x), cast(w), cast(b)


def forward_backward(fn, x, w, b, grad_seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    out = fn(*leaves[:2], leaves[2] if b is not None else None)
    g = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def assert_matches_reference(x, w, b):
    atol, rtol = TOLERANCES[x.dtype]
    out, grads = forward_backward(ops.fused_linear_relu, x, w, b)
    ref_out, ref_grads = forward_backward(reference.fused_linear_relu, x, w, b)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    names = ("x", "weight", "bias")[: len(grads)]
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        assert got is not None, f"no gradient for {name}"
        # dReLU at exactly-zero pre-activations can legitimately differ in half types only
        torch.testing.assert_close(got, want, atol=atol * 4, rtol=rtol * 4, msg=name)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference_cpu(lead, k, n, dtype, bias):
    assert_matches_reference(*make_inputs(lead, k, n, dtype, bias=bias))


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 6), min_size=0, max_size=3),
    k=st.integers(1, 40),
    n=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_random_shapes(lead, k, n, dtype, bias, seed):
    assert_matches_reference(*make_inputs(tuple(lead), k, n, dtype, bias=bias, seed=seed))


def test_non_contiguous_inputs():
    base_x = torch.randn(10, 24, dtype=torch.float64)
    x = base_x[::2, ::2]  # strided, (5, 12)
    w = torch.randn(12, 7, dtype=torch.float64).t()  # transposed, (7, 12)
    b = torch.randn(14, dtype=torch.float64)[::2]
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    assert_matches_reference(x, w, b)
    grad_out = torch.randn(7, 5, dtype=torch.float64).t()  # non-contiguous upstream gradient
    xr = x.clone().requires_grad_()
    out = ops.fused_linear_relu(xr, w, b)
    out.backward(grad_out)
    xr2 = x.clone().requires_grad_()
    reference.fused_linear_relu(xr2, w, b).backward(grad_out)
    torch.testing.assert_close(xr.grad, xr2.grad, atol=1e-12, rtol=1e-12)


def test_only_requested_gradients_are_computed():
    x, w, b = make_inputs((6,), 5, 4, torch.float64)
    w.requires_grad_()
    out = ops.fused_linear_relu(x, w, b)  # x and b need no gradient
    out.sum().backward()
    assert x.grad is None and b.grad is None
    ref = reference.fused_linear_relu(x, w.detach().clone().requires_grad_(), b)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_any_subset_of_inputs_gets_its_gradients(bias):
    """Only the inputs that require grad get one, each right; bias is autograd input 2 only
    when it is given."""
    x, w, b = make_inputs((7,), 5, 6, torch.float64, bias=bias)
    grad_out = torch.randn(7, 6, dtype=torch.float64)
    inputs = [t for t in (x, w, b) if t is not None]
    for wanted in itertools.product([True, False], repeat=len(inputs)):
        if not any(wanted):
            continue
        pairs = zip(inputs, wanted, strict=True)
        leaves = [t.detach().clone().requires_grad_(on) for t, on in pairs]
        ops.fused_linear_relu(*leaves, *([None] if b is None else [])).backward(grad_out)
        ref = [t.detach().clone().requires_grad_() for t in inputs]
        reference.fused_linear_relu(*ref, *([None] if b is None else [])).backward(grad_out)
        for t, r, want in zip(leaves, ref, wanted, strict=True):
            if want:
                torch.testing.assert_close(t.grad, r.grad, atol=1e-12, rtol=1e-12)
            else:
                assert t.grad is None, wanted


def test_retain_graph_gives_the_same_gradients_twice():
    x, w, b = (t.requires_grad_() for t in make_inputs((6,), 5, 4, torch.float64))
    out = ops.fused_linear_relu(x, w, b)
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, (x, w, b), grad_out, retain_graph=True)
    second = torch.autograd.grad(out, (x, w, b), grad_out)
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)


@pytest.mark.skipif(ops.BACKEND.kind == "reference", reason="the reference has Python autograd")
def test_autograd_is_the_cpp_function():
    """The compiled backends run backward through csrc/autograd.cpp, not a Python formula."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gpufit::fused_linear_relu", "Autograd")
    x, w, b = make_inputs((3,), 4, 2, torch.float32)
    out = ops.fused_linear_relu(x.requires_grad_(), w, b)
    assert "FusedLinearReluFunction" in out.grad_fn.name()


def test_nan_propagates_like_torch_relu():
    x = torch.tensor([[float("nan"), 1.0], [1.0, -2.0]])
    w = torch.eye(2)
    torch.testing.assert_close(
        ops.fused_linear_relu(x, w), reference.fused_linear_relu(x, w, None), equal_nan=True
    )


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def eager_linear_relu(x, w, b):
    return torch.relu(F.linear(x, w, b))


def grads_of(fn, x, w, b, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    out = fn(*leaves[:2], leaves[2] if b is not None else None)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_nan_pre_activation_backward_matches_torch(bias, device):
    """relu(nan) is nan, and torch's relu backward (threshold_backward on the output) passes
    the gradient of a nan on: the fused backward does the same."""
    x = torch.tensor([[float("nan"), 1.0], [2.0, -1.0]], device=device)
    w = torch.tensor([[1.0, -1.0], [0.5, 0.5]], device=device)
    b = torch.tensor([0.0, -4.0], device=device) if bias else None
    grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device)
    out, grads = grads_of(ops.fused_linear_relu, x, w, b, grad)
    ref, ref_grads = grads_of(eager_linear_relu, x, w, b, grad)
    torch.testing.assert_close(out, ref, equal_nan=True)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_autocast_like_torch_relu_linear(dtype, bias, device):
    """Under torch.autocast the op casts x, weight and bias to the autocast dtype as F.linear
    does: output in that dtype, backward outside the region works, fp32 gradients for the fp32
    parameters."""
    x, w, b = make_inputs((16,), 32, 24, torch.float32, device=device, bias=bias)
    grad = torch.randn(16, 24, device=device)
    with torch.autocast(device, dtype=dtype):
        out, grads = grads_of(ops.fused_linear_relu, x, w, b, grad)
        ref, ref_grads = grads_of(eager_linear_relu, x, w, b, grad)
    assert out.dtype == ref.dtype == dtype
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_fused_model_runs_under_autocast_where_the_plain_one_does():
    torch.manual_seed(0)
    plain = tutorial_mlp()
    fused = gpufit.fuse(tutorial_mlp())
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(8, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fused(x), plain(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        assert p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, q.grad, atol=0.1, rtol=0.1, msg=name)


def test_backward_inside_autocast_keeps_fp32():
    """Forward outside autocast, backward inside it: the autograd engine runs backward with the
    thread's autocast state, and the op's GEMMs must not be cast to bf16 there."""
    x, w, b = make_inputs((64,), 128, 96, torch.float32)
    grad = torch.randn(64, 96)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = ops.fused_linear_relu(*leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.backward(grad)
    up = [t.double().requires_grad_() for t in (x, w, b)]
    eager_linear_relu(*up).backward(grad.double())
    for got, want in zip(leaves, up, strict=True):
        assert (got.grad.double() - want.grad).norm() <= 1e-5 * want.grad.norm()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_hessian_matches_torch(bias, device):
    """Double backward (create_graph=True) is computed, never a silent zero."""
    x, w, b = make_inputs((4,), 3, 5, torch.float64, device=device, bias=bias, seed=2)
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def loss(fn):
        return lambda *a: (fn(a[0], a[1], a[2] if bias else None) ** 2).sum()

    got = torch.autograd.functional.hessian(loss(ops.fused_linear_relu), inputs)
    want = torch.autograd.functional.hessian(loss(eager_linear_relu), inputs)
    for row_got, row_want in zip(got, want, strict=True):
        for a, c in zip(row_got, row_want, strict=True):
            torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-10)
    assert any(c.abs().max() > 0 for row in want for c in row)


def test_gradient_penalty_reaches_the_weights():
    x, w, b = make_inputs((6,), 5, 4, torch.float64, seed=4)
    result = {}
    for name, fn in (("fused", ops.fused_linear_relu), ("eager", eager_linear_relu)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = fn(*leaves).square().sum()
        (gx,) = torch.autograd.grad(out, leaves[0], create_graph=True)
        (gx**2).sum().backward()
        result[name] = [t.grad for t in leaves[1:]]
    for got, want in zip(result["fused"], result["eager"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_gradcheck_float64(lead, bias):
    x, w, b = make_inputs(lead, 6, 4, torch.float64, bias=bias, seed=3)
    inputs = [t.requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    assert torch.autograd.gradcheck(ops.fused_linear_relu, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_forward(requires_grad):
    for lead, bias in itertools.product([(5,), (2, 3)], [True, False]):
        x, w, b = make_inputs(lead, 6, 4, torch.float32, bias=bias)
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_(requires_grad)
        torch.library.opcheck(torch.ops.gpufit.fused_linear_relu.default, (x, w, b))


@pytest.mark.parametrize("needs_input_grad", [True, False])
def test_opcheck_backward(needs_input_grad):
    x, w, b = make_inputs((5,), 6, 4, torch.float32)
    out = ops.fused_linear_relu(x, w, b)
    grad = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.gpufit.fused_linear_relu_backward.default, (grad, x, w, out, needs_input_grad)
    )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = nn.Sequential(gpufit.FusedLinearReLU(12, 8), nn.Linear(8, 3))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 12)
    eager_out = model(x)
    eager_out.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager_out)
    for got, want in zip([p.grad for p in model.parameters()], eager_grads, strict=True):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- modules


def tutorial_mlp():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        nn.ReLU(),
        nn.Sequential(nn.Linear(256, 64), nn.ReLU(inplace=True)),
        nn.Linear(64, 10),
        nn.ReLU(),  # a trailing pair is fused too
    )


def test_fuse_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    plain = tutorial_mlp()
    fused = gpufit.fuse(tutorial_mlp().requires_grad_(True))
    fused.load_state_dict(plain.state_dict())
    assert [type(m).__name__ for m in fused.modules()].count("FusedLinearReLU") == 3
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(16, 1, 28, 28)
    out, ref = fused(x), plain(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_fuse_keeps_parameters_and_leaves_other_pairs_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU())
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gpufit.fuse(model)
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Tanh
    assert isinstance(model[2], gpufit.FusedLinearReLU) and isinstance(model[3], nn.Identity)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    model(torch.randn(2, 4)).sum().backward()
    before = model[2].weight.detach().clone()
    optimizer.step()  # the optimizer built before fuse() still updates the fused layer
    assert not torch.equal(before, model[2].weight)


def test_fused_module_is_a_drop_in_for_linear_relu():
    torch.manual_seed(1)
    linear = nn.Linear(10, 5)
    torch.manual_seed(1)
    fused = gpufit.FusedLinearReLU(10, 5)
    torch.testing.assert_close(fused.weight, linear.weight)  # same initialisation
    fused2 = gpufit.FusedLinearReLU(10, 5, bias=True)
    fused2.load_state_dict(linear.state_dict())  # a plain Linear's state_dict loads as is
    x = torch.randn(3, 10)
    torch.testing.assert_close(fused2(x), torch.relu(linear(x)))
    no_bias = gpufit.FusedLinearReLU(10, 5, bias=False)
    torch.testing.assert_close(no_bias(x), torch.relu(F.linear(x, no_bias.weight)))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,error,pattern",
    [
        (lambda: (torch.randn(3, 5), torch.randn(4, 6), None), ValueError, "shape mismatch"),
        (lambda: (torch.randn(3, 5), torch.randn(20), None), ValueError, "weight must be 2-D"),
        (lambda: (torch.tensor(1.0), torch.randn(4, 1), None), ValueError, "scalar"),
        (
            lambda: (torch.randn(3, 5), torch.randn(4, 5), torch.randn(5)),
            ValueError,
            r"bias must have shape \(4,\)",
        ),
        (
            lambda: (torch.randn(3, 5), torch.randn(4, 5, dtype=torch.float64), None),
            TypeError,
            "dtype mismatch",
        ),
        (
            lambda: (torch.randn(3, 5), torch.randn(4, 5), torch.randn(4, dtype=torch.float64)),
            TypeError,
            "dtype mismatch",
        ),
        (
            lambda: (
                torch.ones(3, 5, dtype=torch.int64),
                torch.ones(4, 5, dtype=torch.int64),
                None,
            ),
            TypeError,
            "supported are float32",
        ),
        (
            lambda: (torch.randn(3, 5), torch.randn(4, 5, device="meta"), None),
            ValueError,
            "device mismatch",
        ),
        (
            lambda: (torch.randn(3, 5), torch.randn(4, 5), torch.randn(4, device="meta")),
            ValueError,
            "device mismatch",
        ),
        (lambda: ([[1.0]], torch.randn(1, 1), None), TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_input_is_refused_clearly(make, error, pattern):
    x, w, b = make()
    with pytest.raises(error, match=pattern):
        ops.fused_linear_relu(x, w, b)


@pytest.mark.compiled
@pytest.mark.parametrize(
    "args,pattern",
    [
        ((torch.randn(3, 5), torch.randn(4, 6), None), "features"),
        ((torch.randn(3, 5), torch.randn(4, 5, dtype=torch.float64), None), "dtype mismatch"),
        ((torch.randn(3, 5), torch.randn(4, 5), torch.randn(3)), "bias must have shape"),
    ],
)
def test_direct_op_call_is_guarded_in_cpp(args, pattern):
    """The kernels validate too: calling torch.ops directly gets an error, not a crash."""
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.gpufit.fused_linear_relu.default(*args)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,k,n", SHAPES + [((5000,), 64, 96)])  # many row splits
def test_matches_reference_cuda(lead, k, n, dtype):
    assert_matches_reference(*make_inputs(lead, k, n, dtype, device="cuda"))


@pytest.mark.cuda
def test_cuda_bias_gradient_is_deterministic():
    x, w, b = make_inputs((20000,), 32, 48, torch.float32, device="cuda")
    _, grads1 = forward_backward(ops.fused_linear_relu, x, w, b)
    _, grads2 = forward_backward(ops.fused_linear_relu, x, w, b)
    assert torch.equal(grads1[2], grads2[2])


@pytest.mark.cuda
def test_cuda_gradcheck_and_opcheck():
    x, w, b = make_inputs((5,), 6, 4, torch.float64, device="cuda")
    inputs = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(ops.fused_linear_relu, inputs, eps=1e-6, atol=1e-7)
    torch.library.opcheck(torch.ops.gpufit.fused_linear_relu.default, tuple(inputs))


@pytest.mark.cuda
def test_cuda_device_mismatch_is_refused():
    x, w, b = make_inputs((3,), 5, 4, torch.float32)
    with pytest.raises(ValueError, match="device mismatch"):
        ops.fused_linear_relu(x.cuda(), w, b)

"""The per-token outputs of fused_linear_cross_entropy that RL and SFT trainers read (entropy,
log_sum_sq_probs, mean_logits, the target's log-probability, is_top1) and its temperature,
against PyTorch on the materialised logits; and the bf16/fp16 logits kept in fp32 (Cut
Cross-Entropy's lse criterion, and a short bf16 training run whose entropy tracks fp32's)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpufit import ops

ALL_OUTPUTS = {
    "return_lse": True,
    "return_predicted": True,
    "return_entropy": True,
    "return_log_sum_sq_probs": True,
    "return_mean_logits": True,
}
# (N, H, V, chunk_size): the CPU's plans (one chunk, row chunks with a short last one, the
# default plans of a larger vocabulary: three GEMMs in chunks of 64 rows, vocabulary blocks)
SHAPES = [
    pytest.param(29, 24, 61, None, id="one chunk"),
    pytest.param(37, 8, 1100, 8, id="row chunks"),
    pytest.param(1024, 64, 1024, None, id="three-GEMM shape"),
    pytest.param(300, 4, 3000, None, id="vocabulary-block shape"),
]
TRANSFORMS = [
    pytest.param({}, id="plain"),
    pytest.param({"temperature": 0.7}, id="temperature"),
    pytest.param({"temperature": 1.6, "softcap": 4.0, "logit_scale": 1.3}, id="all transforms"),
]


def make_inputs(n, h, v, dtype=torch.float64, bias=True, seed=0, ignore=-100):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5 * 2
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = ignore
    cast = lambda a: None if a is None else a.to(dtype)  # noqa: E731
    return cast(x), cast(w), t, cast(b)


def torch_logits(x, w, b, *, logit_scale=1.0, softcap=None, temperature=1.0):
    """TRL's definition: (scale * (x W^T + b)), capped, then divided by the temperature."""
    z = logit_scale * F.linear(x, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def torch_outputs(x, w, t, b, **transform):
    """Per-row loss (reduction none), lse, argmax, entropy, log sum p^2, mean logit, from the
    full logits with PyTorch's own ops (autograd gives the reference gradients)."""
    z = torch_logits(x, w, b, **transform)
    logp = torch.log_softmax(z, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return (
        F.cross_entropy(z, t, reduction="none"),
        torch.logsumexp(z, -1),
        z.argmax(-1),
        entropy,
        torch.logsumexp(2 * logp, -1),
        z.mean(-1),
    )


def leaves(*tensors):
    return [None if a is None else a.detach().clone().requires_grad_() for a in tensors]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("n,h,v,chunk", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_outputs_and_gradients_match_torch(n, h, v, chunk, transform, dtype):
    atol, rtol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 5e-4)
    x, w, t, b = make_inputs(n, h, v, dtype)
    mine = leaves(x, w, b)
    loss, lse, predicted, entropy, lss, mean = ops.fused_linear_cross_entropy(
        *mine[:2], t, mine[2], reduction="none", chunk_size=chunk, **ALL_OUTPUTS, **transform
    )
    theirs = leaves(*(a.double() for a in (x, w, b)))
    ref = torch_outputs(theirs[0], theirs[1], t, theirs[2], **transform)
    keep = t != -100
    names = ("lse", "entropy", "log_sum_sq_probs", "mean_logits")
    wanted = (ref[1], ref[3], ref[4], ref[5])
    for name, got, want in zip(names, (lse, entropy, lss, mean), wanted, strict=True):
        assert got.dtype == dtype and got.shape == t.shape, name
        torch.testing.assert_close(got.double(), want.detach(), atol=atol, rtol=rtol, msg=name)
    torch.testing.assert_close(loss.double()[keep], ref[0].detach()[keep], atol=atol, rtol=rtol)
    assert torch.equal(predicted[keep], ref[2][keep])
    assert lss.requires_grad is False and mean.requires_grad is False
    # one backward for the loss, the lse and the entropy together
    g = torch.Generator().manual_seed(1)
    weights = [torch.rand(n, generator=g, dtype=torch.float64) for _ in range(3)]

    def total(outs):
        return sum((o * wt.to(o.dtype)).sum() for o, wt in zip(outs, weights, strict=True))

    grads = torch.autograd.grad(total((loss, lse, entropy)), mine)
    ref_grads = torch.autograd.grad(total((torch.where(keep, ref[0], 0), ref[1], ref[3])), theirs)
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("n,h,v,chunk", SHAPES)
def test_entropy_alone_gets_its_gradient_after_a_scalar_loss_forward(n, h, v, chunk):
    # a mean loss computes its gradients in forward (the three-GEMM plan among others): a
    # differentiated entropy must still take its own term in backward
    x, w, t, b = make_inputs(n, h, v)
    mine = leaves(x, w, b)
    loss, entropy = ops.fused_linear_cross_entropy(
        *mine[:2], t, mine[2], chunk_size=chunk, return_entropy=True
    )
    (loss - 0.1 * entropy.mean()).backward()
    theirs = leaves(x, w, b)
    z = F.linear(*theirs)
    logp = torch.log_softmax(z, -1)
    (F.cross_entropy(z, t) + 0.1 * (logp.exp() * logp).sum(-1).mean()).backward()
    for a, r in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64_entropy_loss_lse(bias, reduction):
    x, w, t, b = make_inputs(6, 5, 11, bias=bias, ignore=3)
    kw = dict(reduction=reduction, temperature=0.8, softcap=3.0, logit_scale=1.2,
              return_lse=True, return_entropy=True, chunk_size=4)  # fmt: skip

    def fn(*tensors):
        loss, lse, entropy = ops.fused_linear_cross_entropy(
            tensors[0], tensors[1], t, tensors[2] if bias else None, **kw
        )
        return loss, lse, entropy

    inputs = tuple(leaves(x, w, *((b,) if bias else ())))
    if not bias:
        inputs = (*inputs, None)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_return_order_and_defaults():
    x, w, t, b = make_inputs(9, 4, 13)
    assert isinstance(ops.fused_linear_cross_entropy(x, w, t, b), torch.Tensor)
    full = ops.fused_linear_cross_entropy(x, w, t, b, **ALL_OUTPUTS)
    assert len(full) == 6
    only = ops.fused_linear_cross_entropy(x, w, t, b, return_entropy=True, return_mean_logits=True)
    assert len(only) == 3
    torch.testing.assert_close(only[1], full[3], rtol=0, atol=0)
    torch.testing.assert_close(only[2], full[5], rtol=0, atol=0)
    # a temperature of 1 is the plain op
    plain = ops.fused_linear_cross_entropy(x, w, t, b)
    same = ops.fused_linear_cross_entropy(x, w, t, b, temperature=1.0)
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    torch.testing.assert_close(full[0], plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 2])
def test_log_prob_and_is_top1_follow_torch(chunk):
    # -loss with reduction="none" is the target's log-probability at the temperature; is_top1
    # is predicted == target, a tie going to the first maximum as in torch.argmax
    x, w, t, b = make_inputs(12, 6, 9, ignore=-1)
    w[4] = w[2]  # classes 2 and 4 tie on every row
    b[4] = b[2]
    t[:6] = 4
    t[6:] = 2
    loss, predicted = ops.fused_linear_cross_entropy(
        x, w, t, b, reduction="none", temperature=0.5, return_predicted=True, chunk_size=chunk
    )
    z = torch_logits(x, w, b, temperature=0.5)
    logp = torch.log_softmax(z, -1).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(-loss, logp, rtol=1e-12, atol=1e-12)
    assert torch.equal(predicted, z.argmax(-1))
    assert torch.equal(predicted == t, z.argmax(-1) == t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,h,v,chunk", SHAPES[:2] + SHAPES[3:])
def test_half_inputs_loose(dtype, n, h, v, chunk):
    x, w, t, b = make_inputs(n, h, v, dtype)
    mine = leaves(x, w, b)
    outs = ops.fused_linear_cross_entropy(
        *mine[:2], t, mine[2], reduction="none", chunk_size=chunk, temperature=0.9,
        **ALL_OUTPUTS,
    )  # fmt: skip
    for o in outs[:2] + outs[3:]:
        assert o.dtype == torch.float32
    theirs = leaves(*(a.double() for a in (x, w, b)))
    ref = torch_outputs(theirs[0], theirs[1], t, theirs[2], temperature=0.9)
    keep = t != -100
    torch.testing.assert_close(outs[0].double()[keep], ref[0].detach()[keep], atol=2e-3, rtol=2e-3)
    for got, want in zip(outs[3:], ref[3:], strict=True):
        torch.testing.assert_close(got.double(), want.detach(), atol=2e-3, rtol=2e-3)
    (outs[0].sum() + outs[3].sum()).backward()
    (torch.where(keep, ref[0], 0).sum() + ref[3].sum()).backward()
    for a, r in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.grad.double(), r.grad, atol=3e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "value,error",
    [
        (0.0, ValueError),
        (-1.0, ValueError),
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        ("1", TypeError),
    ],  # fmt: skip
)
def test_bad_temperature_is_refused(value, error):
    x, w, t, b = make_inputs(3, 2, 5)
    with pytest.raises(error, match="temperature"):
        ops.fused_linear_cross_entropy(x, w, t, b, temperature=value)


@pytest.mark.parametrize(
    "flag", ["return_entropy", "return_log_sum_sq_probs", "return_mean_logits"]
)
def test_bad_flag_is_refused(flag):
    x, w, t, b = make_inputs(3, 2, 5)
    with pytest.raises(TypeError, match=flag):
        ops.fused_linear_cross_entropy(x, w, t, b, **{flag: 1})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(dtype, reduction):
    x, w, t, b = make_inputs(7, 5, 19, dtype)
    options = ops.LinearCEOptions(
        reduction=reduction, temperature=0.7, softcap=3.0, return_entropy=True,
        return_log_sum_sq_probs=True, return_mean_logits=True, return_predicted=True,
    )  # fmt: skip
    args = (x, w, t, b, *options.schema_args(), [True, True, True])
    torch.library.opcheck(torch.ops.gpufit.fused_linear_cross_entropy.default, args)
    out = torch.ops.gpufit.fused_linear_cross_entropy.default(*args)
    lse, lse_lo, entropy = out[1], out[2], out[4]
    grad_loss = torch.ones_like(out[0])
    bargs = (grad_loss, torch.rand_like(lse), torch.rand_like(lse), x, w, t, b, lse, lse_lo,
             entropy, *options.schema_args(), [True, True, True])  # fmt: skip
    torch.library.opcheck(torch.ops.gpufit.fused_linear_cross_entropy_backward.default, bargs)


def test_torch_compile_fullgraph():
    x, w, t, b = make_inputs(16, 8, 40, torch.float32)

    def step(x, w, b):
        loss, entropy, lss, mean = ops.fused_linear_cross_entropy(
            x, w, t, b, temperature=0.8, return_entropy=True, return_log_sum_sq_probs=True,
            return_mean_logits=True,
        )  # fmt: skip
        return loss - 0.01 * entropy.mean(), lss, mean

    eager = leaves(x, w, b)
    compiled_in = leaves(x, w, b)
    want = step(*eager)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_in)
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r)
    want[0].backward()
    got[0].backward()
    for a, r in zip(compiled_in, eager, strict=True):
        torch.testing.assert_close(a.grad, r.grad)


# ---------------------------------------------------------------- bf16/fp16 logits in fp32

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("chunk", [None, 256])
def test_half_lse_meets_cut_cross_entropy_criterion(dtype, bias, chunk, device):
    # Cut Cross-Entropy's test: per row, the lse is at least as close to the lse of the fp32
    # logits as the lse of the rounded half logits is (plus 1e-5)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible)")
    g = torch.Generator().manual_seed(0)
    n, h, v = 256, 128, 2048
    x = (torch.randn(n, h, generator=g) * 2).to(dtype=dtype, device=device)
    w = (torch.randn(v, h, generator=g) / h**0.25).to(dtype=dtype, device=device)
    b = (torch.randn(v, generator=g)).to(dtype=dtype, device=device) if bias else None
    t = torch.randint(0, v, (n,), generator=g).to(device)
    _, lse = ops.fused_linear_cross_entropy(x, w, t, b, chunk_size=chunk, return_lse=True)
    up = lambda a: None if a is None else a.float()  # noqa: E731
    lse_fp32 = torch.logsumexp(F.linear(up(x), up(w), up(b)), -1)
    lse_half = torch.logsumexp(F.linear(x, w, b).float(), -1)
    bound = (lse_half - lse_fp32).abs() + 1e-5
    assert ((lse - lse_fp32).abs() <= bound).all()
    # and the criterion can fail: the rounded logits' own lse misses it on some rows
    assert ((lse_half + 2e-5 - lse_fp32).abs() > bound).any() or bool((bound > 1e-4).any())


def _train_entropies(dtype, steps=30):
    """A linear head (fp32 master weights, computed in `dtype`) trained with Adam on a fixed
    teacher; returns the mean entropy of each step's softmax."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 512, 64, 1024
    x = torch.randn(n, h, generator=g)
    teacher = torch.randn(v, h, generator=g) / h**0.5 * 3
    t = torch.multinomial(torch.softmax(x @ teacher.T, -1), 1, generator=g).squeeze(1)
    w = torch.nn.Parameter(torch.randn(v, h, generator=g) / h**0.5 * 0.1)
    opt = torch.optim.Adam([w], lr=1e-2)
    entropies = []
    for _ in range(steps):
        loss, entropy = ops.fused_linear_cross_entropy(
            x.to(dtype), w.to(dtype), t, return_entropy=True
        )
        entropies.append(entropy.mean().item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.tensor(entropies)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_training_entropy_tracks_fp32(dtype):
    reference = _train_entropies(torch.float32)
    half = _train_entropies(dtype)
    assert reference[-1] < reference[0] - 5.0  # the run trains: the entropy falls 6.9 -> 0.9
    # measured: at most 4e-4 (bf16) apart at any step, the rounded inputs' share
    drift = (half - reference).abs()
    assert drift.max() < 2e-3, drift


@pytest.mark.parametrize("transform", TRANSFORMS[:2])
@pytest.mark.parametrize("n,h,v,chunk", SHAPES)
def test_scalar_loss_forward_gradients_with_outputs(n, h, v, chunk, transform):
    # a scalar loss computes its gradients in forward (the three GEMMs, the vocabulary blocks'
    # phase A): with the per-row outputs and the temperature, in the same pass
    x, w, t, b = make_inputs(n, h, v)
    mine = leaves(x, w, b)
    loss, lse, predicted, entropy, lss, mean = ops.fused_linear_cross_entropy(
        *mine[:2], t, mine[2], chunk_size=chunk, **ALL_OUTPUTS, **transform
    )
    loss.backward()
    theirs = leaves(x, w, b)
    ref = torch_outputs(theirs[0], theirs[1], t, theirs[2], **transform)
    keep = t != -100
    ref_loss = ref[0][keep].mean()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
    for got, want in zip((lse, entropy, lss, mean), (ref[1], ref[3], ref[4], ref[5]), strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    assert torch.equal(predicted[keep], ref[2][keep])
    for a, r in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk", [None, 64])
def test_cuda_matches_torch(dtype, chunk):
    # the CUDA kernels' per-row outputs, temperature and entropy gradient
    transform = {"temperature": 0.7, "softcap": 4.0, "logit_scale": 1.3}
    atol, rtol = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 5e-4)}.get(
        dtype, (2e-3, 2e-3)
    )
    x, w, t, b = (a.cuda() for a in make_inputs(37, 16, 300, dtype))
    mine = leaves(x, w, b)
    outs = ops.fused_linear_cross_entropy(
        *mine[:2], t, mine[2], reduction="none", chunk_size=chunk, **ALL_OUTPUTS, **transform
    )
    theirs = leaves(*(a.double() for a in (x, w, b)))
    ref = torch_outputs(theirs[0], theirs[1], t, theirs[2], **transform)
    keep = t != -100
    torch.testing.assert_close(outs[0].double()[keep], ref[0].detach()[keep], atol=atol, rtol=rtol)
    for got, want in zip(outs[3:], ref[3:], strict=True):
        torch.testing.assert_close(got.double(), want.detach(), atol=atol, rtol=rtol)
    (outs[0].sum() + outs[3].sum()).backward()
    (torch.where(keep, ref[0], 0).sum() + ref[3].sum()).backward()
    grad_tol = (atol, rtol) if dtype != torch.bfloat16 else (3e-2, 5e-2)
    for a, r in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.grad.double(), r.grad, atol=grad_tol[0], rtol=grad_tol[1])

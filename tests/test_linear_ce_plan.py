"""The plans of fused_linear_cross_entropy's CPU kernel against eager PyTorch: the three-GEMM
forward (gradients formed while each chunk's logits are at hand, backward only scales them;
with a softcap, class weights and a temperature too, which the test of the GEMMs counted shows
it takes), the four-GEMM plan it leaves to (a differentiated lse, create_graph, no gradients),
and the argmax of return_predicted, which follows torch.argmax's rule for nan (a nan logit is
the max)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpufit import ops

pytestmark = pytest.mark.compiled  # the compiled CPU kernel's plans

# (N, H, V, chunk_size): several chunks with a short last one, several class blocks with a
# short last one (blocks hold 512 classes), and the default plans of a large vocabulary:
# PyTorch's chunk rule leaves 64 rows (three GEMMs) or one row (the four-GEMM blocks).
SHAPES = [
    pytest.param(37, 8, 1100, 8, id="chunks of 8, 3 class blocks"),
    pytest.param(5, 6, 700, 2, id="chunks of 2"),
    pytest.param(1024, 64, 1024, None, id="default plan, three GEMMs in chunks of 64"),
    pytest.param(300, 4, 3000, None, id="default plan, vocabulary blocks"),
]


def make_inputs(n, h, v, dtype=torch.float64, seed=0, ignore=-100):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=dtype)
    w = torch.randn(v, h, generator=g, dtype=dtype) / h**0.5
    b = torch.randn(v, generator=g, dtype=dtype) * 0.1
    t = torch.randint(0, v, (n,), generator=g)
    t[::7] = ignore
    return x, w, t, b


def leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def class_weights(v, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(v, generator=g, dtype=dtype) * 2 + 0.1


def eager_logits(x, w, b, *, softcap=None, temperature=1.0):
    logits = F.linear(x, w, b)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def eager_loss(x, w, t, b, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
               reduction="mean", softcap=None, class_weight=None, temperature=1.0):  # fmt: skip
    logits = eager_logits(x, w, b, softcap=softcap, temperature=temperature)
    loss = F.cross_entropy(
        logits, t, weight=class_weight, ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction="none",
    )  # fmt: skip
    keep = t != ignore_index
    loss = loss + z_loss * torch.logsumexp(logits, 1) ** 2 * keep
    if reduction == "sum":
        return loss.sum()
    if class_weight is None:
        return loss.sum() / keep.sum()
    return loss.sum() / class_weight[t[keep]].sum()  # F.cross_entropy's weighted mean


def eager_entropy(x, w, b, *, softcap=None, temperature=1.0):
    log_p = eager_logits(x, w, b, softcap=softcap, temperature=temperature).log_softmax(1)
    return -(log_p.exp() * log_p).sum(1)


# The options of the three-GEMM plan's cases; class_weight=True stands for class_weights(V).
THREE_GEMM_OPTIONS = {
    "plain": {},
    "smoothing+z_loss": {"label_smoothing": 0.1, "z_loss": 1e-3},
    "sum, ignore 3": {"reduction": "sum", "ignore_index": 3},
    "softcap": {"softcap": 2.0},
    "class_weight": {"class_weight": True},
    "class_weight+smoothing+z_loss": {"class_weight": True, "label_smoothing": 0.1, "z_loss": 1e-3},
    "softcap+temperature+entropy": {"softcap": 1.5, "temperature": 0.7, "return_entropy": True},
}


def resolve(name, v, dtype):
    options = dict(THREE_GEMM_OPTIONS[name])
    if options.get("class_weight") is True:
        options["class_weight"] = class_weights(v, dtype)
    return options


def entropy_term(entropy):
    """What a case with return_entropy adds to the loss it differentiates: its entropy's
    gradient joins the stored one in backward."""
    return 0.5 * entropy.mean()


def our_case(x, w, t, b, chunk, options, threads):
    """The op's loss, entropy (with return_entropy, else None) and leaves holding the
    gradients, at the given number of threads."""
    ours = leaves(x, w, b)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ops.fused_linear_cross_entropy(ours[0], ours[1], t, ours[2], chunk_size=chunk,
                                             **options)  # fmt: skip
        loss, entropy = out if options.get("return_entropy") else (out, None)
        (loss if entropy is None else loss + entropy_term(entropy)).backward()
    finally:
        torch.set_num_threads(before)
    return loss.detach(), entropy if entropy is None else entropy.detach(), ours


def eager_case(x, w, t, b, options):
    """eager PyTorch's loss, entropy and leaves holding the gradients, as our_case's."""
    options = dict(options)
    with_entropy = options.pop("return_entropy", False)
    ref = leaves(x, w, b)
    loss = eager_loss(ref[0], ref[1], t, ref[2], **options)
    entropy = None
    if with_entropy:
        keys = [k for k in ("softcap", "temperature") if k in options]
        entropy = eager_entropy(ref[0], ref[1], ref[2], **{k: options[k] for k in keys})
    (loss if entropy is None else loss + entropy_term(entropy)).backward()
    return loss.detach(), entropy if entropy is None else entropy.detach(), ref


# (dtype, loss and entropy tolerance, gradient tolerance), each (rtol, atol); a gradient's atol
# grows with its largest entry where that is above 1 (a sum's gradients are not divided by N)
DTYPES = [
    pytest.param(torch.float64, (1e-10, 1e-12), (1e-9, 1e-12), id="fp64"),
    pytest.param(torch.float32, (1e-6, 1e-7), (1e-5, 1e-6), id="fp32"),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,h,v,chunk", SHAPES)
@pytest.mark.parametrize("case", list(THREE_GEMM_OPTIONS))
@pytest.mark.parametrize("dtype,value_tol,grad_tol", DTYPES)
def test_three_gemm_plan_matches_eager(n, h, v, chunk, case, threads, dtype, value_tol,
                                       grad_tol):  # fmt: skip
    options = resolve(case, v, dtype)
    x, w, t, b = make_inputs(n, h, v, dtype=dtype, ignore=options.get("ignore_index", -100))
    loss, entropy, ours = our_case(x, w, t, b, chunk, options, threads)
    # the reference in fp64 (fp32 inputs are exact in it), rounded once at the end
    wide = {k: v.double() if torch.is_tensor(v) else v for k, v in options.items()}
    ref_loss, ref_entropy, ref = eager_case(x.double(), w.double(), t, b.double(), wide)
    rtol, atol = value_tol
    torch.testing.assert_close(loss, ref_loss.to(dtype), rtol=rtol, atol=atol)
    if entropy is not None:
        torch.testing.assert_close(entropy, ref_entropy.to(dtype), rtol=rtol, atol=atol)
    rtol, atol = grad_tol
    for mine, theirs in zip(ours, ref, strict=True):
        size = max(1.0, theirs.grad.abs().max().item())
        torch.testing.assert_close(mine.grad, theirs.grad.to(dtype), rtol=rtol, atol=atol * size)


@pytest.mark.parametrize("n,h,v,chunk", SHAPES)
def test_stored_gradients_are_scaled_and_kept_for_retain_graph(n, h, v, chunk):
    # backward scales what forward stored, never in place: a retained graph gives the same
    # gradients again, and a grad_output of 3 gives three times them
    x, w, t, b = make_inputs(n, h, v)
    ours = leaves(x, w, b)
    loss = ops.fused_linear_cross_entropy(ours[0], ours[1], t, ours[2], chunk_size=chunk)
    first = torch.autograd.grad(loss, ours, retain_graph=True)
    again = torch.autograd.grad(loss, ours, retain_graph=True)
    tripled = torch.autograd.grad(loss * 3, ours)
    ref = leaves(x, w, b)
    expected = torch.autograd.grad(eager_loss(ref[0], ref[1], t, ref[2]), ref)
    for a, b_, c, e in zip(first, again, tripled, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b_, e, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(c, 3 * e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n,h,v,chunk", SHAPES)
def test_differentiated_lse_takes_its_own_gradient(n, h, v, chunk):
    # forward cannot know that lse will be differentiated: backward adds its softmax term
    x, w, t, b = make_inputs(n, h, v)
    ours = leaves(x, w, b)
    loss, lse = ops.fused_linear_cross_entropy(ours[0], ours[1], t, ours[2], chunk_size=chunk,
                                               return_lse=True)  # fmt: skip
    (loss + 0.5 * lse.square().mean()).backward()
    ref = leaves(x, w, b)
    logits = F.linear(ref[0], ref[1], ref[2])
    (eager_loss(ref[0], ref[1], t, ref[2]) + 0.5 * torch.logsumexp(logits, 1).square().mean()
     ).backward()  # fmt: skip
    for mine, theirs in zip(ours, ref, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n,h,v,chunk", SHAPES)
def test_double_backward_through_the_three_gemm_plan(n, h, v, chunk):
    x, w, t, b = make_inputs(n, h, v)
    ours = leaves(x, w, b)
    loss = ops.fused_linear_cross_entropy(ours[0], ours[1], t, ours[2], chunk_size=chunk)
    (gx,) = torch.autograd.grad(loss, ours[0], create_graph=True)
    gx.square().sum().backward()
    ref = leaves(x, w, b)
    (rgx,) = torch.autograd.grad(eager_loss(ref[0], ref[1], t, ref[2]), ref[0], create_graph=True)
    rgx.square().sum().backward()
    for mine, theirs in zip(ours, ref, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-8, atol=1e-11)


# ---------------------------------------------------------------- return_predicted and nan


def nan_inputs(n, h, v, dtype):
    x, w, t, b = make_inputs(n, h, v, dtype=dtype)
    w[3] = float("nan")  # every row's logit of class 3 is nan
    x[1, :] = float("nan")  # row 1: every logit nan
    return x, w, t, b


PREDICTED_CASES = [
    pytest.param(12, 8, 30, None, torch.float32, id="one chunk"),
    pytest.param(12, 8, 30, 4, torch.float32, id="row chunks"),
    pytest.param(37, 8, 1100, 8, torch.float64, id="chunks and class blocks"),
    pytest.param(300, 4, 3000, None, torch.float32, id="default plan, large vocabulary"),
    pytest.param(12, 8, 30, 16, torch.bfloat16, id="bf16 blocks"),
    pytest.param(12, 8, 1030, 500, torch.bfloat16, id="bf16, nan in the first block"),
]


@pytest.mark.parametrize("grad", [True, False], ids=["with grad", "no grad"])
@pytest.mark.parametrize("n,h,v,chunk,dtype", PREDICTED_CASES)
def test_predicted_follows_torch_argmax_on_nan(n, h, v, chunk, dtype, grad):
    x, w, t, b = nan_inputs(n, h, v, dtype)
    if grad:
        w.requires_grad_()
    loss, predicted = ops.fused_linear_cross_entropy(
        x, w, t, b, chunk_size=chunk, reduction="none" if not grad else "mean",
        return_predicted=True,
    )  # fmt: skip
    expected = torch.argmax(F.linear(x.float(), w.detach().float(), b.float()), 1)
    expected = torch.where(t == -100, -100, expected)
    assert torch.equal(predicted, expected), (predicted, expected)
    assert (predicted[t != -100] == 3).any()  # the nan class won somewhere: the case is real
    assert torch.isnan(loss).any()


@pytest.mark.parametrize("n,h,v,chunk,dtype", PREDICTED_CASES)
def test_predicted_matches_torch_argmax_without_nan(n, h, v, chunk, dtype):
    x, w, t, b = make_inputs(n, h, v, dtype=dtype)
    w.requires_grad_()
    _, predicted = ops.fused_linear_cross_entropy(x, w, t, b, chunk_size=chunk,
                                                  return_predicted=True)  # fmt: skip
    logits = F.linear(x, w.detach(), b).float()
    expected = torch.where(t == -100, -100, torch.argmax(logits, 1))
    assert torch.equal(predicted, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("n,h,v,chunk,dtype", PREDICTED_CASES)
def test_predicted_follows_torch_argmax_on_nan_cuda(n, h, v, chunk, dtype):
    x, w, t, b = (a.cuda() for a in nan_inputs(n, h, v, dtype))
    _, predicted = ops.fused_linear_cross_entropy(x, w, t, b, chunk_size=chunk,
                                                  return_predicted=True)  # fmt: skip
    expected = torch.argmax(F.linear(x.float(), w.float(), b.float()), 1)
    expected = torch.where(t == -100, -100, expected)
    assert torch.equal(predicted, expected), (predicted, expected)


# ---------------------------------------------------------------- which plan runs

GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_"}


def gemm_calls(fn):
    """The GEMMs (mm and addmm, in any of their forms) that ATen runs while fn runs, on any
    thread."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in GEMMS)


def step_gemm_calls(ours, t, options):
    """The GEMMs of one call's forward, those of its backward, and its loss, on leaves ours."""
    out = []

    def forward():
        out.append(ops.fused_linear_cross_entropy(ours[0], ours[1], t, ours[2], **options))

    forward_calls = gemm_calls(forward)
    loss = out[0][0] if options.get("return_entropy") else out[0]
    return forward_calls, gemm_calls(loss.backward), loss.detach()


@pytest.mark.parametrize("case", [c for c in THREE_GEMM_OPTIONS if c != "plain"])
def test_every_option_takes_the_three_gemm_plan(case):
    # The three-GEMM plan runs its three GEMMs once per 512-class block of each row chunk, all in
    # forward; the row kernels run them once per chunk, over the whole vocabulary. 37 rows in
    # chunks of 8 (5 chunks) and 1100 classes (3 blocks): 45 GEMMs against 15.
    n, h, v, chunk = 37, 8, 1100, 8
    options = resolve(case, v, torch.float64)
    x, w, t, b = make_inputs(n, h, v, ignore=options.get("ignore_index", -100))
    forward, backward, _ = step_gemm_calls(leaves(x, w, b), t, {**options, "chunk_size": chunk})
    chunks, blocks = -(-n // chunk), -(-v // 512)
    assert forward == 3 * chunks * blocks
    assert backward == 0  # backward only scales what forward stored


@pytest.mark.parametrize("case", ["softcap", "class_weight+smoothing+z_loss"])
def test_softcap_and_class_weights_take_the_three_gemm_plan_in_few_rows(case):
    # With no chunk_size, PyTorch's rule leaves 4 rows per chunk here (300 rows, 1100 classes,
    # 8 features), below the plain options' minimum for the three GEMMs (those take the
    # vocabulary blocks, which know neither option); a softcap or class weights take the three
    # GEMMs anyway, in those 4-row chunks, and still match eager PyTorch.
    n, h, v, rows = 300, 8, 1100, 4
    options = resolve(case, v, torch.float64)
    x, w, t, b = make_inputs(n, h, v)
    ours = leaves(x, w, b)
    forward, backward, loss = step_gemm_calls(ours, t, options)
    chunks, blocks = -(-n // rows), -(-v // 512)
    assert forward == 3 * chunks * blocks
    assert backward == 0
    ref_loss, _, ref = eager_case(x, w, t, b, options)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for mine, theirs in zip(ours, ref, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)

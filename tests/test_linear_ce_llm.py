"""fused_linear_cross_entropy's options for language-model trainers: softcap (Gemma 2's final
logit softcapping), num_items (transformers' num_items_in_batch), class_weight (F.cross_entropy's
weight=) and return_predicted (the argmax, for token accuracy), each against the unfused formula
F.linear + the formula + F.cross_entropy, on every CPU plan (and CUDA where a GPU is visible):
values, gradients, gradcheck, opcheck, torch.compile, autocast, double backward, bad input."""

import pytest
import torch
import torch.nn.functional as F

import gpufit
from gpufit import ops
from tests.test_linear_ce import DEVICES, PLAN_IDS, PLANS, TOLERANCES, make_inputs, run
from tests.test_linear_ce import torch_loss as unfused  # the one specification of the op


def class_weights(v, device="cpu", seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(v, generator=g, dtype=torch.float64) * 2 + 0.1).to(device)


def check_against_unfused(x, w, t, b, chunk=None, **options):
    atol, rtol = TOLERANCES[x.dtype]
    loss, grads = run(ops.fused_linear_cross_entropy, x, w, t, b, chunk_size=chunk, **options)
    up = [None if a is None else a.double() for a in (x, w, b)]
    ref_loss, ref_grads = run(unfused, up[0], up[1], t, up[2], **options)
    assert loss.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double(), ref_loss, atol=atol, rtol=rtol)
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads, strict=False):
        assert got.dtype == x.dtype, name
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=name)


# each new option alone, with the old ones, and all at once
CASES = {
    "softcap": dict(softcap=2.0),
    "softcap, smoothing, z_loss, none": dict(
        softcap=1.5, label_smoothing=0.1, z_loss=1e-3, reduction="none"
    ),  # fmt: skip
    "class_weight": dict(class_weight=True),
    "class_weight, smoothing": dict(class_weight=True, label_smoothing=0.2),
    "class_weight, smoothing, none": dict(
        class_weight=True, label_smoothing=0.2, reduction="none"
    ),  # fmt: skip
    "num_items": dict(reduction="sum", num_items=7),
    "logit_scale": dict(logit_scale=0.37),
    "logit_scale, softcap, none": dict(logit_scale=2.5, softcap=2.0, reduction="none"),
    "num_items tensor": dict(reduction="sum", num_items="tensor"),
    "all": dict(
        softcap=3.0,
        class_weight=True,
        label_smoothing=0.1,
        z_loss=1e-3,
        reduction="sum",
        num_items="tensor",
    ),  # fmt: skip
}


def resolve(case, v, device):
    options = dict(CASES[case])
    if options.get("class_weight") is True:
        options["class_weight"] = class_weights(v, device)
    if options.get("num_items") == "tensor":
        options["num_items"] = torch.tensor(5, device=device)  # an int tensor, as transformers'
    return options


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,lead,h,v,chunk,dtype", PLANS, ids=PLAN_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_unfused_formula(name, lead, h, v, chunk, dtype, case, device):
    # logits of a few units (into tanh's bend for the softcaps here); bf16 at unit scale, where
    # its rounding of the logits chunk stays within the half tolerance
    scale = 1.0 if dtype == torch.bfloat16 else 3.0
    x, w, t, b = make_inputs(lead, h, v, dtype, device=device, ignore=-100, scale=scale)
    check_against_unfused(x, w, t, b, chunk=chunk, **resolve(case, v, device))


def test_class_weight_is_exactly_f_cross_entropy():
    """With class weights (and label smoothing, and ignored rows) the loss is F.cross_entropy's
    own, mean's denominator included."""
    x, w, t, b = make_inputs((20,), 6, 9, torch.float64, ignore=4)
    cw = class_weights(9)
    for reduction in ("mean", "sum", "none"):
        for smoothing in (0.0, 0.3):
            got = ops.fused_linear_cross_entropy(
                x,
                w,
                t,
                b,
                class_weight=cw,
                ignore_index=4,
                reduction=reduction,
                label_smoothing=smoothing,
            )
            want = F.cross_entropy(
                F.linear(x, w, b),
                t,
                weight=cw,
                ignore_index=4,
                reduction=reduction,
                label_smoothing=smoothing,
            )
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_num_items_divides_the_sum_and_its_gradient():
    x, w, t, b = make_inputs((10,), 4, 7, torch.float64, ignore=-100)
    leaves = [a.clone().requires_grad_() for a in (x, w)]
    total = ops.fused_linear_cross_entropy(leaves[0], leaves[1], t, b, reduction="sum")
    total.backward()
    want = [a.grad / 8 for a in leaves]
    for n in (8, torch.tensor(8), torch.tensor(8.0)):
        got_leaves = [a.detach().clone().requires_grad_() for a in (x, w)]
        loss = ops.fused_linear_cross_entropy(*got_leaves, t, b, reduction="sum", num_items=n)
        torch.testing.assert_close(loss, total.detach() / 8)
        loss.backward()
        for got, ref in zip(got_leaves, want, strict=True):
            torch.testing.assert_close(got.grad, ref)


def test_softcap_bounds_the_logits():
    """Huge logits capped at 5: the loss is that of logits in [-5, 5]."""
    x, w, t, b = make_inputs((8,), 4, 6, torch.float32, scale=1e3)
    loss, lse = ops.fused_linear_cross_entropy(x, w, t, b, softcap=5.0, reduction="none",
                                               return_lse=True)  # fmt: skip
    assert (lse <= 5.0 + torch.log(torch.tensor(6.0)) + 1e-5).all()
    torch.testing.assert_close(
        loss.double(), unfused(x.double(), w.double(), t, b.double(), softcap=5.0, reduction="none")
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,lead,h,v,chunk,dtype", PLANS, ids=PLAN_IDS)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_return_predicted_is_the_argmax(name, lead, h, v, chunk, dtype, softcap, device):
    x, w, t, b = make_inputs(lead, h, v, dtype, device=device, ignore=-100, scale=3.0)
    loss, lse, predicted = ops.fused_linear_cross_entropy(
        x, w, t, b, chunk_size=chunk, softcap=softcap, return_lse=True, return_predicted=True
    )
    logits = F.linear(x, w, b).float().reshape(-1, v)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    want = torch.where(t.reshape(-1) == -100, -100, logits.argmax(-1)).reshape(t.shape)
    assert predicted.dtype == torch.int64 and predicted.shape == t.shape
    kept = (t != -100).reshape(-1)
    flat = predicted.reshape(-1)
    assert (flat[~kept] == -100).all()
    # the predicted class holds the largest logit; where two are within rounding of each
    # other (saturated by the softcap, say) the kernel may pick either
    top = logits.max(-1).values
    tol = (1e-5 if dtype != torch.bfloat16 else 2e-2) * top.abs().clamp(min=1)
    got = logits.gather(1, flat.clamp(min=0)[:, None])[:, 0]
    assert (got[kept] >= (top - tol)[kept]).all()
    top2 = logits.topk(min(2, v), -1).values
    clear = kept & ((top2[:, 0] - top2[:, -1]) > tol)
    assert (flat[clear] == want.reshape(-1)[clear]).all()
    # the loss and lse are the same as without the flag
    plain_loss, plain_lse = ops.fused_linear_cross_entropy(
        x, w, t, b, chunk_size=chunk, softcap=softcap, return_lse=True
    )
    torch.testing.assert_close(loss, plain_loss)
    torch.testing.assert_close(lse, plain_lse)


def test_return_predicted_gives_token_accuracy():
    x, w, t, b = make_inputs((50,), 8, 5, torch.float32, ignore=-100, scale=3.0)
    loss, predicted = ops.fused_linear_cross_entropy(x, w, t, b, return_predicted=True)
    kept = t != -100
    accuracy = (predicted[kept] == t[kept]).float().mean()
    want = (F.linear(x, w, b).argmax(-1)[kept] == t[kept]).float().mean()
    torch.testing.assert_close(accuracy, want)


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_float64(case):
    x, w, t, b = make_inputs((5,), 4, 7, torch.float64, ignore=1, scale=2.0)
    options = resolve(case, 7, "cpu")
    inputs = [a.requires_grad_() for a in (x, w, b)]
    reductions = [options.pop("reduction")] if "reduction" in options else ["mean", "sum", "none"]
    for reduction in reductions:
        for chunk in (None, 2):

            def fn(x, w, b, reduction=reduction, chunk=chunk):
                return ops.fused_linear_cross_entropy(x, w, t, b, ignore_index=1,
                                                      reduction=reduction, chunk_size=chunk,
                                                      **options)  # fmt: skip

            assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)
    # double backward (create_graph=True runs the composite formula), once per case
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6)


# the schema's last options at their defaults: temperature, return_entropy,
# return_log_sum_sq_probs, return_mean_logits
DEFAULTS = (1.0, False, False, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    x, w, t, b = make_inputs((6,), 5, 9, dtype, ignore=-100)
    cw = class_weights(9).float()
    for a in (x, w, b):
        a.requires_grad_()
    op = torch.ops.gpufit.fused_linear_cross_entropy.default
    for reduction, num_items in (("mean", None), ("sum", torch.tensor(4.0)), ("none", None)):
        args = (x, w, t, b, -100, reduction, 0.1, 1e-3, 2.0, cw, num_items, 4, True, *DEFAULTS,
                [True] * 3)  # fmt: skip
        torch.library.opcheck(op, args)
        with torch.no_grad():
            _, lse, lse_lo, *_ = op(*args)
        g = torch.rand(t.shape if reduction == "none" else (), dtype=lse.dtype)
        bargs = (g, None, None, x.detach(), w.detach(), t, b.detach(), lse, lse_lo, None, -100,
                 reduction, 0.1, 1e-3, 2.0, cw, num_items, 4, False, *DEFAULTS,
                 [True, True, True])  # fmt: skip
        torch.library.opcheck(torch.ops.gpufit.fused_linear_cross_entropy_backward.default, bargs)


def test_torch_compile_fullgraph_with_the_new_options():
    """Compiled with fullgraph=True (a host sync such as .item() on num_items would break the
    graph): the same loss, predictions and gradients as eager."""
    torch._dynamo.reset()
    x, w, t, b = make_inputs((2, 9), 12, 37, torch.float32, ignore=-100)
    cw = class_weights(37).float()

    def step(x, w, b, num_items):
        loss, predicted = ops.fused_linear_cross_entropy(
            torch.tanh(x), w, t, b, softcap=4.0, class_weight=cw, reduction="sum",
            num_items=num_items, label_smoothing=0.1, chunk_size=5, return_predicted=True,
        )  # fmt: skip
        return loss, predicted

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [a.clone().requires_grad_() for a in (x, w, b)]
        loss, predicted = fn(*leaves, (t != -100).sum())
        loss.backward()
        results.append((loss.detach(), predicted, [a.grad for a in leaves]))
    (loss, pred, grads), (c_loss, c_pred, c_grads) = results
    torch.testing.assert_close(c_loss, loss)
    assert torch.equal(c_pred, pred)
    for got, want in zip(c_grads, grads, strict=True):
        torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph_with_logit_scale():
    """logit_scale, folded into the op's inputs, compiles into one graph (the fake kernels see
    the scaled inputs) and gives eager's loss and gradients."""
    torch._dynamo.reset()
    x, w, t, b = make_inputs((2, 7), 10, 23, torch.float32, ignore=-100)

    def step(x, w, b):
        return ops.fused_linear_cross_entropy(x, w, t, b, logit_scale=0.3, softcap=3.0)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [a.clone().requires_grad_() for a in (x, w, b)]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), [a.grad for a in leaves]))
    (loss, grads), (c_loss, c_grads) = results
    torch.testing.assert_close(c_loss, loss)
    want = unfused(x.double(), w.double(), t, b.double(), logit_scale=0.3, softcap=3.0)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    for got, expected in zip(c_grads, grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_logit_scale_is_the_scaled_logits_cross_entropy():
    """The loss of logit_scale * (x W^T + b) exactly as F.cross_entropy gives it, float64,
    bias included (a scale folded into x alone would miss the bias)."""
    x, w, t, b = make_inputs((12,), 5, 9, torch.float64, ignore=-100)
    for scale in (0.0625, 1 / 8, -1.5):
        got = ops.fused_linear_cross_entropy(x, w, t, b, logit_scale=scale)
        want = F.cross_entropy(scale * F.linear(x, w, b), t)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    unscaled = ops.fused_linear_cross_entropy(x, w, t, b)
    assert not torch.allclose(got, unscaled)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,lead,h,v,chunk,dtype", PLANS[:4], ids=PLAN_IDS[:4])
def test_autocast_with_the_new_options(name, lead, h, v, chunk, dtype, device):
    """Under autocast: fp32 loss, gradients in each input's dtype, close to the unfused formula
    run on the bf16-rounded inputs."""
    x, w, t, b = make_inputs(lead, h, v, torch.float32, device=device, ignore=-100)
    options = dict(softcap=3.0, class_weight=class_weights(v, device).float(), reduction="sum",
                   num_items=torch.tensor(9, device=device), chunk_size=chunk)  # fmt: skip
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = ops.fused_linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], **options)
    assert loss.dtype == torch.float32
    loss.backward()
    options.pop("chunk_size")
    up = [a.to(torch.bfloat16).double().requires_grad_() for a in (x, w, b)]
    ref_loss = unfused(up[0], up[1], t, up[2], **options)
    ref_grads = torch.autograd.grad(ref_loss, up)
    torch.testing.assert_close(loss.double(), ref_loss, atol=2e-2, rtol=2e-2)
    for got, want in zip(leaves, ref_grads, strict=True):
        assert got.grad.dtype == torch.float32
        torch.testing.assert_close(got.grad.double(), want, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_keep_an_fp32_loss_with_the_new_options(dtype):
    x, w, t, b = make_inputs((32,), 16, 50, dtype, scale=3.0)
    loss, lse = ops.fused_linear_cross_entropy(
        x, w, t, b, softcap=4.0, class_weight=class_weights(50), reduction="none",
        return_lse=True,
    )  # fmt: skip
    assert loss.dtype == lse.dtype == torch.float32
    assert (loss != loss.to(dtype).float()).float().mean() > 0.5


@pytest.mark.parametrize("name,lead,h,v,chunk,dtype", PLANS, ids=PLAN_IDS)
def test_lse_with_softcap_is_differentiable(name, lead, h, v, chunk, dtype):
    x, w, t, b = make_inputs(lead, h, v, dtype, ignore=-100)

    def fused(x, w, t, b):
        loss, lse = ops.fused_linear_cross_entropy(x, w, t, b, chunk_size=chunk, softcap=2.0,
                                                   return_lse=True)  # fmt: skip
        return loss + 0.3 * (lse**2).mean()

    def eager(x, w, t, b):
        capped = 2.0 * torch.tanh(F.linear(x, w, b) / 2.0)
        return unfused(x, w, t, b, softcap=2.0) + 0.3 * (capped.logsumexp(-1) ** 2).mean()

    loss, grads = run(fused, x, w, t, b)
    up = [a.double() for a in (x, w, b)]
    ref_loss, ref_grads = run(eager, up[0], up[1], t, up[2])
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, atol=atol, rtol=rtol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


def test_module_takes_the_new_options():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11)
    cw = class_weights(11).float()
    loss_fn = gpufit.FusedLinearCrossEntropyLoss(reduction="sum", softcap=2.0, class_weight=cw,
                                                 return_predicted=True)  # fmt: skip
    assert "softcap=2.0" in repr(loss_fn) and torch.equal(loss_fn.state_dict()["class_weight"], cw)
    x, target = torch.randn(4, 6), torch.randint(0, 11, (4,))
    loss, predicted = loss_fn(x, head.weight, target, head.bias, num_items=torch.tensor(3))
    want = unfused(x, head.weight, target, head.bias, reduction="sum", softcap=2.0,
                   class_weight=cw, num_items=3)  # fmt: skip
    torch.testing.assert_close(loss, want)
    assert torch.equal(predicted, (2.0 * torch.tanh(head(x) / 2.0)).argmax(-1))


def _good():
    return make_inputs((4,), 3, 5, torch.float32)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"num_items": 4}, ValueError, "num_items goes with reduction='sum'"),
        ({"num_items": 0, "reduction": "sum"}, ValueError, "num_items must be >= 1"),
        ({"num_items": 2.5, "reduction": "sum"}, TypeError, "num_items must be an int or"),
        ({"num_items": torch.ones(2), "reduction": "sum"}, ValueError, "0-dim"),
        ({"softcap": 0.0}, ValueError, "softcap must be a positive"),
        ({"softcap": float("inf")}, ValueError, "softcap must be a positive"),
        ({"softcap": "30"}, TypeError, "softcap must be a float"),
        ({"class_weight": torch.ones(4)}, ValueError, r"class_weight must have shape \(5,\)"),
        ({"class_weight": torch.ones(5, dtype=torch.long)}, TypeError, "class_weight .*float"),
        ({"class_weight": [1.0] * 5}, TypeError, "class_weight must be a torch.Tensor"),
        ({"class_weight": torch.ones(5, requires_grad=True)}, ValueError, "requires grad"),
        ({"return_predicted": 1}, TypeError, "return_predicted must be a bool"),
        ({"logit_scale": float("inf")}, ValueError, "logit_scale must be finite"),
        ({"logit_scale": "2"}, TypeError, "logit_scale must be a float"),
        ({"logit_scale": torch.tensor(2.0, requires_grad=True)}, ValueError, "requires grad"),
    ],
)
def test_bad_new_options_are_refused_clearly(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.fused_linear_cross_entropy(*_good(), **kwargs)


@pytest.mark.cuda
def test_cuda_num_items_on_the_gpu_is_not_read_on_the_host():
    """A CUDA num_items: the loss is computed without a host sync (torch.cuda's sync debug mode
    turns one into an error)."""
    x, w, t, b = make_inputs((64,), 16, 100, torch.float32, device="cuda")
    n = torch.tensor(40, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = ops.fused_linear_cross_entropy(x, w, t, b, reduction="sum", num_items=n)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(loss.cpu().double(), unfused(
        x.double(), w.double(), t, b.double(), reduction="sum", num_items=n.double()).cpu(),
        atol=1e-4, rtol=1e-4)  # fmt: skip

"""What gpufit's nn modules do not support is one clear line naming the limit, not PyTorch's
internal errors: `fuse` of something that is not a model, differentiating torch.func
transforms, forward-mode AD, sparse tensors and torch.jit.script. What does work still works:
vmap, torch.jit.trace, plain and double backward."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import gpufit
from gpufit.nn import FusedLinearCrossEntropyLoss, FusedLinearReLU


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert text.strip() and "\n" not in text, repr(text)
    return text


@pytest.mark.parametrize("value", ["hello", None, 3, [nn.Linear(2, 2)], torch.zeros(2)])
def test_fuse_of_a_non_module_is_a_type_error(value):
    with pytest.raises(TypeError) as caught:
        gpufit.fuse(value)
    text = _one_line(caught.value)
    assert "torch.nn.Module" in text and type(value).__name__ in text


def _relu_module():
    torch.manual_seed(0)
    return FusedLinearReLU(5, 3)


def _relu_sum(module):
    return lambda x: module(x).sum()


_HEAD = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))


def _loss_sum(x):
    return FusedLinearCrossEntropyLoss()(x, _HEAD, torch.tensor([1, 2, 3]))


TRANSFORMS = {
    "grad": lambda f, x: grad(f)(x),
    "jacrev": lambda f, x: jacrev(f)(x),
    "vjp": lambda f, x: vjp(f, x)[1](torch.ones(())),
    "jvp": lambda f, x: jvp(f, (x,), (torch.ones_like(x),)),
    "jacfwd": lambda f, x: jacfwd(f)(x),
    "hessian": lambda f, x: hessian(f)(x),
}


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("module", ["FusedLinearReLU", "FusedLinearCrossEntropyLoss"])
def test_differentiating_torch_func_transforms_are_refused_in_one_line(transform, module):
    f = _relu_sum(_relu_module()) if module == "FusedLinearReLU" else _loss_sum
    with pytest.raises(NotImplementedError) as caught:
        TRANSFORMS[transform](f, torch.randn(3, 5))
    text = _one_line(caught.value)
    assert module in text and "torch.func" in text


def test_grad_over_the_parameters_with_functional_call_is_refused():
    module = _relu_module()
    params = dict(module.named_parameters())
    x = torch.randn(3, 5)

    def f(p):
        return torch.func.functional_call(module, p, (x,)).sum()

    with pytest.raises(NotImplementedError, match="FusedLinearReLU"):
        grad(f)(params)


@pytest.mark.parametrize("module", ["FusedLinearReLU", "FusedLinearCrossEntropyLoss"])
def test_forward_mode_ad_is_refused_in_one_line(module):
    x = torch.randn(3, 5)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError) as caught:
            (_relu_sum(_relu_module()) if module == "FusedLinearReLU" else _loss_sum)(dual)
    assert "forward-mode AD" in _one_line(caught.value)


def test_vmap_and_double_backward_still_work():
    module = _relu_module()
    x = torch.randn(4, 3, 5)
    reference = torch.relu(x @ module.weight.T + module.bias)
    torch.testing.assert_close(vmap(module)(x), reference)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    module = module.double()
    (g,) = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
    g.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("where", ["input", "weight"])
def test_sparse_tensors_are_refused_in_one_line(where):
    module = _relu_module()
    x = torch.randn(3, 5)
    if where == "weight":
        module.weight = nn.Parameter(module.weight.detach().to_sparse())
    else:
        x = x.to_sparse()
    with pytest.raises(TypeError) as caught:
        module(x)
    text = _one_line(caught.value)
    assert "dense" in text and "sparse" in text


def test_sparse_head_weight_in_the_loss_is_refused_in_one_line():
    x, weight = torch.randn(3, 5), torch.randn(7, 5).to_sparse()
    with pytest.raises(TypeError) as caught:
        FusedLinearCrossEntropyLoss()(x, weight, torch.tensor([1, 2, 3]))
    assert "sparse" in _one_line(caught.value)


@pytest.mark.parametrize(
    "make",
    [
        _relu_module,
        lambda: nn.Sequential(_relu_module(), nn.Linear(3, 2)),
        lambda: gpufit.fuse(nn.Sequential(nn.Linear(5, 3), nn.ReLU())),
        FusedLinearCrossEntropyLoss,
    ],
)
def test_torch_jit_script_is_refused_in_one_line(make):
    with pytest.raises(TypeError) as caught:
        torch.jit.script(make())
    text = _one_line(caught.value)
    assert "torch.jit.script" in text and "torch.jit.trace" in text


def test_torch_jit_trace_records_the_fused_op():
    module = _relu_module()
    x = torch.randn(3, 5)
    traced = torch.jit.trace(module, x)
    torch.testing.assert_close(traced(x), module(x))


def test_torch_compile_of_the_module_is_not_affected_by_the_checks():
    module = _relu_module()
    x = torch.randn(3, 5)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), module(x))

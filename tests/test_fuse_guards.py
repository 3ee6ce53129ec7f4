"""`gpufit.fuse` on an nn.Sequential leaves alone a Linear/ReLU pair that does more than its
class's forward (hooks, parametrizations, non-Parameter or sparse weights, ...): the model must
compute, train and save exactly as before fuse. Plain pairs beside them are still fused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
from torch import nn

import gpufit
from gpufit.nn import FusedLinearReLU


def _double_input(module, args):
    return (args[0] * 2,)


def _add_one(module, args, output):
    return output + 1


def _scale_grad(module, grad_output):
    return (grad_output[0] * 3,)


def _scale_grad_in(module, grad_input, grad_output):
    return tuple(None if g is None else g * 3 for g in grad_input)


def _rename_keys(module, state_dict, prefix, local_metadata):
    state_dict[prefix + "renamed"] = state_dict.pop(prefix + "weight")


class _Halve(nn.Module):
    def forward(self, weight):
        return weight / 2


def _non_parameter_weight(lin: nn.Linear) -> None:
    weight = lin.weight.detach().clone()
    del lin.weight
    lin.weight = weight  # a plain tensor attribute: no longer a parameter


def _extra_buffer(lin: nn.Linear) -> None:
    lin.register_buffer("scale", torch.ones(()))


def _instance_forward(lin: nn.Linear) -> None:
    lin.forward = lambda x: nn.functional.linear(x, lin.weight, lin.bias) - 1


# name -> (what to do to the Linear, what to do to the ReLU)
VARIANTS = {
    "linear forward hook": (lambda m: m.register_forward_hook(_add_one), None),
    "linear forward pre-hook": (lambda m: m.register_forward_pre_hook(_double_input), None),
    "linear forward hook with kwargs": (
        lambda m: m.register_forward_hook(lambda mod, a, k, out: out * 2, with_kwargs=True),
        None,
    ),
    "linear full backward hook": (lambda m: m.register_full_backward_hook(_scale_grad_in), None),
    "linear backward pre-hook": (lambda m: m.register_full_backward_pre_hook(_scale_grad), None),
    "linear state_dict hook": (lambda m: m._register_state_dict_hook(_rename_keys), None),
    "relu forward hook": (None, lambda m: m.register_forward_hook(_add_one)),
    "relu forward pre-hook": (None, lambda m: m.register_forward_pre_hook(_double_input)),
    "relu backward pre-hook": (None, lambda m: m.register_full_backward_pre_hook(_scale_grad)),
    "old spectral_norm": (lambda m: nn.utils.spectral_norm(m), None),
    "old weight_norm": (lambda m: nn.utils.weight_norm(m), None),
    "prune random": (lambda m: prune.random_unstructured(m, "weight", 0.5), None),
    "prune l1 on bias": (lambda m: prune.l1_unstructured(m, "bias", 0.5), None),
    "parametrize": (lambda m: parametrize.register_parametrization(m, "weight", _Halve()), None),
    "parametrizations.spectral_norm": (
        lambda m: nn.utils.parametrizations.spectral_norm(m),
        None,
    ),
    "parametrizations.weight_norm": (lambda m: nn.utils.parametrizations.weight_norm(m), None),
    "non-Parameter weight": (_non_parameter_weight, None),
    "extra buffer": (_extra_buffer, None),
    "instance-level forward": (_instance_forward, None),
}


def _model(variant: str) -> nn.Sequential:
    on_linear, on_relu = VARIANTS[variant]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    if on_linear is not None:
        on_linear(model[0])
    if on_relu is not None:
        on_relu(model[1])
    return model


def _train(model: nn.Sequential, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    outputs = []
    for _ in range(steps):
        x = torch.randn(8, 12)
        out = model(x)
        outputs.append(out.detach())
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return outputs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fuse_leaves_a_linear_or_relu_with_extra_behaviour_alone(variant):
    reference = _model(variant)
    model = _model(variant)
    keys = list(reference.state_dict())
    names = [n for n, _ in reference.named_parameters()]

    assert gpufit.fuse(model) is model

    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == names
    assert type(model[0]).__name__ == type(reference[0]).__name__ and type(model[1]) is nn.ReLU
    # the plain pair after it is still fused
    assert isinstance(model[2], FusedLinearReLU) and isinstance(model[3], nn.Identity)
    # same outputs over several training steps (the second backward included)
    for got, want in zip(_train(model), _train(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, got), want in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_fuse_leaves_a_sparse_weight_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
    model[0].weight = nn.Parameter(model[0].weight.detach().to_sparse())
    keys = list(model.state_dict())
    gpufit.fuse(model)
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.ReLU
    assert list(model.state_dict()) == keys and model[0].weight.layout is torch.sparse_coo


def test_fuse_still_fuses_plain_pairs_with_and_without_bias():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    keys = list(model.state_dict())
    gpufit.fuse(model)
    assert [type(m) for m in model] == [FusedLinearReLU, nn.Identity] * 2
    assert list(model.state_dict()) == keys


def test_a_hook_on_the_sequential_itself_does_not_stop_fusion():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    calls = []
    model.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    reference = copy.deepcopy(model)
    gpufit.fuse(model)
    assert isinstance(model[0], FusedLinearReLU)
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), reference(x))
    assert len(calls) == 2

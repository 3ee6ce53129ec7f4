"""nn.Module faces of gpufit's ops, and `fuse` to put them into an existing model."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.autograd import forward_ad

from gpufit import ops

_DIFFERENTIATING_TRANSFORMS = "torch.func.grad, vjp, jvp, jacrev, jacfwd, hessian"


def _refuse_unsupported(owner: str, *tensors: torch.Tensor | None) -> None:
    """One-line errors for what gpufit's ops do not support, instead of PyTorch's internal
    ones: differentiating torch.func transforms (vmap works), forward-mode AD (dual tensors)
    and sparse tensors. Skipped under torch.compile, which traces the op itself."""
    if torch.compiler.is_compiling():
        return
    present = [t for t in tensors if t is not None]
    if any(torch._C._functorch.is_gradtrackingtensor(t) for t in present):
        raise NotImplementedError(
            f"{owner} does not support {_DIFFERENTIATING_TRANSFORMS} (its autograd is a C++ "
            "function those transforms cannot enter; torch.func.vmap works): differentiate "
            "with loss.backward() / torch.autograd.grad, or use nn.Linear and F.cross_entropy"
        )
    if forward_ad._current_level >= 0 and any(
        forward_ad.unpack_dual(t).tangent is not None for t in present
    ):
        raise NotImplementedError(
            f"{owner} does not support forward-mode AD (torch.autograd.forward_ad dual "
            "tensors): use reverse mode (backward) or the unfused modules"
        )
    sparse = [t.layout for t in present if t.layout is not torch.strided]
    if sparse:
        raise TypeError(f"{owner} takes dense (strided) tensors, got a {sparse[0]} one")


def _refuse_scripting(owner: str) -> None:
    raise TypeError(
        f"{owner} cannot be compiled by torch.jit.script (TorchScript cannot read the Python "
        "wrapper of its op): use torch.compile, or torch.jit.trace, which records the op"
    )


class FusedLinearReLU(nn.Linear):
    """``nn.Sequential(nn.Linear(i, o), nn.ReLU())`` as one module and one fused op.

    It is an ``nn.Linear`` (same constructor, parameter names ``weight``/``bias`` and
    initialisation), so a plain Linear's state_dict loads into it unchanged, and under
    ``torch.autocast`` it casts as ``nn.Linear`` does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_unsupported("gpufit.FusedLinearReLU", x, self.weight, self.bias)
        return ops.fused_linear_relu(x, self.weight, self.bias)

    def __prepare_scriptable__(self):  # torch.jit.script calls it before compiling
        _refuse_scripting("gpufit.FusedLinearReLU")

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FusedLinearReLU:
        """A FusedLinearReLU that shares ``linear``'s parameters (no copy, no re-init), so an
        optimizer built on the original parameters keeps working."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features = linear.in_features
        fused.out_features = linear.out_features
        fused.weight = linear.weight
        fused.bias = linear.bias
        fused.train(linear.training)
        return fused


# The per-module hook tables of nn.Module: a module with any entry in one of them does more
# than its forward (a pre-hook that edits the input, weight_norm/spectral_norm/prune recomputing
# the weight, a state_dict hook renaming keys), which a fused replacement would silently drop.
_HOOK_TABLES = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _plain(module: nn.Module, parameters: tuple[str, ...]) -> bool:
    """Whether ``module`` is exactly what its class builds: no hooks, no instance-level
    forward, no buffers or children, and (for a Linear) ``weight``/``bias`` that are dense
    nn.Parameters, not tensors recomputed from other parameters (old-style weight_norm,
    spectral_norm and prune store ``weight`` as a plain attribute)."""
    if any(getattr(module, table, None) for table in _HOOK_TABLES):
        return False
    if "forward" in module.__dict__ or module._buffers or module._modules:
        return False
    if set(module._parameters) != set(parameters):
        return False
    return all(
        (p is None and name == "bias")
        or (isinstance(p, nn.Parameter) and p.layout is torch.strided)
        for name, p in module._parameters.items()
    )


def _fusable(first: nn.Module, second: nn.Module) -> bool:
    # Exactly nn.Linear and nn.ReLU: subclasses (LazyLinear, quantized or already-fused ones,
    # and the classes torch.nn.utils.parametrize makes) may compute something else in forward.
    return (
        type(first) is nn.Linear
        and type(second) is nn.ReLU
        and _plain(first, ("weight", "bias"))
        and _plain(second, ())
    )


def fuse(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` directly followed by ``nn.ReLU`` inside an ``nn.Sequential``
    (at any depth) with a FusedLinearReLU, in place, and return the model.

    The Linear's slot takes the fused module, which shares the Linear's parameters, and the
    ReLU's slot takes an ``nn.Identity``: state_dict keys and optimizer state stay valid.
    Only Sequential containers are rewritten, because only there is the order of calls known;
    a ReLU applied with ``F.relu`` inside a custom ``forward`` is left alone. So is a pair whose
    Linear or ReLU does more than its class's forward: one with hooks (forward, pre-forward,
    backward, state_dict), a parametrization (``torch.nn.utils.parametrize``, old-style
    ``weight_norm``/``spectral_norm``, ``prune``), a weight or bias that is not a dense
    ``nn.Parameter``, extra buffers or an instance-level ``forward``.

    A transformers causal LM (``LlamaForCausalLM``, ... or a PEFT model around one) is handed
    to ``gpufit.hf.fuse`` instead: its training loss then runs through
    ``fused_linear_cross_entropy`` (see gpufit/hf/); other transformers models are refused.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"gpufit.fuse takes a torch.nn.Module (a model), got {type(model).__name__}"
        )
    from gpufit import hf

    if hf.is_transformers_model(model):
        return hf.fuse(model)
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first_name, second_name in zip(names, names[1:], strict=False):
            first, second = module._modules[first_name], module._modules[second_name]
            if _fusable(first, second):
                module._modules[first_name] = FusedLinearReLU.from_linear(first)
                module._modules[second_name] = nn.Identity()
    return model


class FusedLinearCrossEntropyLoss(nn.Module):
    """The loss of a classification / language-model head, ``cross_entropy(head(x), target)``,
    computed by ``gpufit.ops.fused_linear_cross_entropy`` without the (N, V) logits.

    It owns no parameters: pass the head's ``weight`` (and ``bias``) in forward, e.g.
    ``loss_fn(hidden, model.lm_head.weight, labels, model.lm_head.bias)``. The loss is fp32 for
    bf16/fp16 inputs (and under autocast), float64 for float64 ones. The options are those of
    the op, kept as one ``gpufit.ops.LinearCEOptions`` (``self.options``); ``class_weight`` is
    also a buffer (so ``.to(device)`` moves it), and ``num_items`` (transformers'
    ``num_items_in_batch``, with ``reduction="sum"``) is given per call, in forward.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        class_weight: torch.Tensor | None = None,
        chunk_size: int | None = None,
        return_lse: bool = False,
        return_predicted: bool = False,
    ) -> None:
        super().__init__()
        self.options = ops.LinearCEOptions(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            class_weight=class_weight,
            chunk_size=chunk_size,
            return_lse=return_lse,
            return_predicted=return_predicted,
        )
        self.register_buffer("class_weight", class_weight)

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        num_items: int | torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        _refuse_unsupported("gpufit.FusedLinearCrossEntropyLoss", x, weight, bias)
        options = self.options
        if num_items is not None or self.class_weight is not options.class_weight:
            options = dataclasses.replace(
                options, class_weight=self.class_weight, num_items=num_items
            )
        return ops.run_fused_linear_cross_entropy(options, x, weight, target, bias)

    def __prepare_scriptable__(self):  # torch.jit.script calls it before compiling
        _refuse_scripting("gpufit.FusedLinearCrossEntropyLoss")

    def extra_repr(self) -> str:
        return ", ".join(
            f"{field.name}={getattr(self.options, field.name)!r}"
            for field in dataclasses.fields(self.options)
            if field.name not in ("class_weight", "num_items")
        )

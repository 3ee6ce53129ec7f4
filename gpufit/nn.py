"""nn.Module faces of gpufit's ops, and `fuse` to put them into an existing model."""

from __future__ import annotations

import torch
from torch import nn

from gpufit import ops


class FusedLinearReLU(nn.Linear):
    """``nn.Sequential(nn.Linear(i, o), nn.ReLU())`` as one module and one fused op.

    It is an ``nn.Linear`` (same constructor, parameter names ``weight``/``bias`` and
    initialisation), so a plain Linear's state_dict loads into it unchanged, and under
    ``torch.autocast`` it casts as ``nn.Linear`` does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.fused_linear_relu(x, self.weight, self.bias)

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


def _fusable(first: nn.Module, second: nn.Module) -> bool:
    # Exactly nn.Linear: subclasses (LazyLinear, quantized or already-fused ones) may compute
    # something else in forward.
    return type(first) is nn.Linear and type(second) is nn.ReLU


def fuse(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` directly followed by ``nn.ReLU`` inside an ``nn.Sequential``
    (at any depth) with a FusedLinearReLU, in place, and return the model.

    The Linear's slot takes the fused module, which shares the Linear's parameters, and the
    ReLU's slot takes an ``nn.Identity``: state_dict keys and optimizer state stay valid.
    Only Sequential containers are rewritten, because only there is the order of calls known;
    a ReLU applied with ``F.relu`` inside a custom ``forward`` is left alone.

    A transformers causal LM (``LlamaForCausalLM``, ... or a PEFT model around one) is handed
    to ``gpufit.hf.fuse`` instead: its training loss then runs through
    ``fused_linear_cross_entropy`` (see gpufit/hf.py); other transformers models are refused.
    """
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
    bf16/fp16 inputs (and under autocast), float64 for float64 ones.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.chunk_size = chunk_size

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return ops.fused_linear_cross_entropy(
            x,
            weight,
            target,
            bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"chunk_size={self.chunk_size}"
        )

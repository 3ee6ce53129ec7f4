"""The options of fused_linear_cross_entropy as one value, validated once where they come in.

gpufit.ops builds a LinearCEOptions from the keyword arguments of a call (or takes the one a
module stores), and passes it down: to the op as its schema's option arguments
(``schema_args``, in the order of ``_schema.LINEAR_CE_OPTIONS``), and back from those arguments in
the fake kernels, the reference kernels and the Python autograd (``from_schema_args``). The C++
side reads the same arguments once into its own struct (csrc/linear_ce_options.h). Adding an
option: a field here (its check in ``__post_init__``, its place in the two schema methods), the
schema string in gpufit/_schema.py and csrc/linear_ce_options.h, and its use.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import torch

OP = "fused_linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
_INT64_MAX = 2**63 - 1


def _index_arg(name: str, value: object) -> int:
    """An integer argument as F.cross_entropy takes one: an int, numpy integer or integer 0-dim
    tensor within int64 (not a bool or a float)."""
    if type(value) is int and -_INT64_MAX - 1 <= value <= _INT64_MAX:
        return value
    if not isinstance(value, bool):
        try:
            index = operator.index(value)
        except TypeError:
            pass
        else:
            if -_INT64_MAX - 1 <= index <= _INT64_MAX:
                return index
            raise ValueError(f"{OP}: {name}={index} does not fit in int64")
    raise TypeError(f"{OP}: {name} must be an int, got {value!r}")


def _float_arg(name: str, value: object) -> float:
    """A float argument as F.cross_entropy takes one: a real number (a bool, int, float, numpy
    scalar or 0-dim tensor), not a string; nan is refused."""
    if type(value) is not float:
        number = isinstance(value, numbers.Real) or (
            isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex()
        )
        if not number:
            raise TypeError(f"{OP}: {name} must be a float, got {value!r}")
        value = float(value)
    if value != value:
        raise ValueError(f"{OP}: {name} must be a number, got nan")
    return value


def _chunk_arg(value: object) -> int | None:
    """chunk_size: None (the op's own plan) or a positive integer (any count of rows or classes
    above the input's means one chunk)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{OP}: chunk_size must be a positive int or None, got {value!r}")
    try:
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"{OP}: chunk_size must be a positive int or None, got {value!r}") from None
    if size < 1:
        raise ValueError(f"{OP}: chunk_size must be a positive int or None, got {size}")
    return min(size, _INT64_MAX)


def _softcap_arg(value: object) -> float | None:
    if value is None:
        return None
    cap = _float_arg("softcap", value)
    if not 0.0 < cap < float("inf"):
        raise ValueError(f"{OP}: softcap must be a positive finite number or None, got {cap}")
    return cap


def _class_weight_arg(value: object) -> torch.Tensor | None:
    """class_weight as F.cross_entropy's weight=: None or a 1-D floating tensor (its length and
    device are checked against the inputs). Like F.cross_entropy, no gradient flows into it."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{OP}: class_weight must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{OP}: class_weight must be a floating-point tensor, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{OP}: class_weight must be 1-D (one weight per class), got shape "
                         f"{tuple(value.shape)}")  # fmt: skip
    if value.requires_grad:
        raise ValueError(f"{OP}: class_weight requires grad, but no gradient is computed for it "
                         "(as in F.cross_entropy); pass class_weight.detach()")  # fmt: skip
    return value


def _num_items_arg(value: object) -> int | torch.Tensor | None:
    """num_items: None, an int >= 1 or a 0-dim tensor (any device; its value is never read on
    the host)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{OP}: num_items must be an int or a 0-dim real tensor, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)}")  # fmt: skip
        return value
    message = f"{OP}: num_items must be an int or a 0-dim tensor, got {value!r}"
    if isinstance(value, bool):
        raise TypeError(message)
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(message) from None
    if count < 1:
        raise ValueError(f"{OP}: num_items must be >= 1, got {count}")
    return count


def _flag_arg(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{OP}: {name} must be a bool, got {value!r}")
    return value


@dataclass(frozen=True, slots=True, eq=False)
class LinearCEOptions:
    """Everything about a fused_linear_cross_entropy call but its tensors x, weight, target and
    bias (see gpufit.ops.fused_linear_cross_entropy for what each option means)."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    class_weight: torch.Tensor | None = None
    num_items: int | torch.Tensor | None = None
    chunk_size: int | None = None
    return_lse: bool = False
    return_predicted: bool = False

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "ignore_index", _index_arg("ignore_index", self.ignore_index))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        label_smoothing = _float_arg("label_smoothing", self.label_smoothing)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"{OP}: label_smoothing must be in [0, 1], got {label_smoothing}")
        put(self, "label_smoothing", label_smoothing)
        z_loss = _float_arg("z_loss", self.z_loss)
        if not z_loss >= 0.0:
            raise ValueError(f"{OP}: z_loss must be >= 0, got {z_loss}")
        put(self, "z_loss", z_loss)
        put(self, "softcap", _softcap_arg(self.softcap))
        put(self, "class_weight", _class_weight_arg(self.class_weight))
        put(self, "num_items", _num_items_arg(self.num_items))
        if self.num_items is not None and self.reduction != "sum":
            raise ValueError(f"{OP}: num_items goes with reduction='sum' only (the loss is the "
                             f"sum / num_items), got reduction={self.reduction!r}")  # fmt: skip
        put(self, "chunk_size", _chunk_arg(self.chunk_size))
        put(self, "return_lse", _flag_arg("return_lse", self.return_lse))
        put(self, "return_predicted", _flag_arg("return_predicted", self.return_predicted))

    def schema_args(self, device: torch.device | str = "cpu") -> tuple:
        """The op's option arguments, in schema order, for inputs on ``device``: chunk_size None
        is 0 (the op's plan); an int num_items becomes a 0-dim tensor made on that device (a fill,
        no copy from the host)."""
        num_items = self.num_items
        if num_items is not None and not isinstance(num_items, torch.Tensor):
            num_items = torch.full((), num_items, dtype=torch.float64, device=device)
        return (
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            self.z_loss,
            self.softcap,
            self.class_weight,
            num_items,
            self.chunk_size or 0,
            self.return_predicted,
        )

    @classmethod
    def from_schema_args(cls, args) -> LinearCEOptions:
        """The options that ``schema_args`` turned into ``args`` (return_lse aside)."""
        (ignore_index, reduction, label_smoothing, z_loss, softcap, class_weight, num_items,
         chunk_size, return_predicted) = args  # fmt: skip
        return cls(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            class_weight=class_weight,
            num_items=num_items,
            chunk_size=chunk_size or None,
            return_predicted=return_predicted,
        )


SCHEMA_ARG_COUNT = len(LinearCEOptions().schema_args())

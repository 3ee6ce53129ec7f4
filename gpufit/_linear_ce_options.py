"""The options of fused_linear_cross_entropy as one value, validated once where they come in.

Each option is declared once, as a field of LinearCEOptions below: its default, its type in the
op's schema (or None for an option gpufit.ops applies before the op), and the function that
checks a value. From those fields come the schema's option arguments (``SCHEMA``, which
gpufit/_schema.py uses), a call's arguments (``schema_args``) and the options back from them
(``from_schema_args``, in the fake kernels, the reference kernels and the Python autograd). The
C++ side declares the same arguments once, in csrc/linear_ce_options.h, and a test checks that
both languages give the same schema. Adding an option: a field here, an entry there, its use.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass, field, fields

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


def _reduction_arg(value: object) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def _label_smoothing_arg(value: object) -> float:
    label_smoothing = _float_arg("label_smoothing", value)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{OP}: label_smoothing must be in [0, 1], got {label_smoothing}")
    return label_smoothing


def _z_loss_arg(value: object) -> float:
    z_loss = _float_arg("z_loss", value)
    if not z_loss >= 0.0:
        raise ValueError(f"{OP}: z_loss must be >= 0, got {z_loss}")
    return z_loss


def _logit_scale_arg(value: object) -> float:
    """logit_scale: a finite real number (a 0-dim tensor that requires grad is refused: the
    scale is folded into the inputs as a constant)."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise ValueError(f"{OP}: logit_scale requires grad, but it is applied as a constant; "
                         "pass a number (or logit_scale.detach())")  # fmt: skip
    scale = _float_arg("logit_scale", value)
    if not math.isfinite(scale):
        raise ValueError(f"{OP}: logit_scale must be finite, got {scale}")
    return scale


def _temperature_arg(value: object) -> float:
    """temperature: a positive finite real number (the logits are divided by it)."""
    temperature = _float_arg("temperature", value)
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"{OP}: temperature must be a positive finite number, got {temperature}")
    return temperature


def _num_items_to_schema(value, device):
    """An int num_items becomes a 0-dim tensor made on the inputs' device (a fill, no copy
    from the host)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.full((), value, dtype=torch.float64, device=device)


def option(
    default: object,
    schema: str | None,
    check: Callable[[object], object],
    to_schema: Callable[[object, object], object] | None = None,
    from_schema: Callable[[object], object] | None = None,
):
    """The declaration of one option: its default, its type in the op's schema (None: not a
    schema argument; gpufit.ops applies it around the op), the check of a value (which returns
    the value to keep), and the conversions of a kept value to and from the schema argument
    (None: the value itself)."""
    metadata = {"schema": schema, "check": check, "to_schema": to_schema,
                "from_schema": from_schema}  # fmt: skip
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True, eq=False)
class LinearCEOptions:
    """Everything about a fused_linear_cross_entropy call but its tensors x, weight, target and
    bias (see gpufit.ops.fused_linear_cross_entropy for what each option means). The schema's
    option arguments are the fields with a schema type, in this order."""

    ignore_index: int = option(-100, "int", functools.partial(_index_arg, "ignore_index"))
    reduction: str = option("mean", "str", _reduction_arg)
    label_smoothing: float = option(0.0, "float", _label_smoothing_arg)
    z_loss: float = option(0.0, "float", _z_loss_arg)
    softcap: float | None = option(None, "float?", _softcap_arg)
    class_weight: torch.Tensor | None = option(None, "Tensor?", _class_weight_arg)
    num_items: int | torch.Tensor | None = option(
        None, "Tensor?", _num_items_arg, to_schema=_num_items_to_schema
    )
    # None (the op's own plan) is 0 in the schema
    chunk_size: int | None = option(
        None, "int", _chunk_arg, lambda value, device: value or 0, lambda value: value or None
    )
    return_lse: bool = option(False, None, functools.partial(_flag_arg, "return_lse"))
    return_predicted: bool = option(False, "bool", functools.partial(_flag_arg, "return_predicted"))
    # applied by gpufit.ops to x and bias before the op: (s x) W^T + s b = s (x W^T + b)
    logit_scale: float = option(1.0, None, _logit_scale_arg)
    # the logits divided by it after logit_scale and softcap, inside the op (TRL's temperature)
    temperature: float = option(1.0, "float", _temperature_arg)
    # per-row outputs of the softmax, each computed only when asked
    return_entropy: bool = option(False, "bool", functools.partial(_flag_arg, "return_entropy"))
    return_log_sum_sq_probs: bool = option(
        False, "bool", functools.partial(_flag_arg, "return_log_sum_sq_probs")
    )
    return_mean_logits: bool = option(
        False, "bool", functools.partial(_flag_arg, "return_mean_logits")
    )

    def __post_init__(self) -> None:
        for name, default, check in _CHECKS:
            value = getattr(self, name)
            if value is not default and not (type(value) is type(default) and value == default):
                object.__setattr__(self, name, check(value))
        if self.num_items is not None and self.reduction != "sum":
            raise ValueError(f"{OP}: num_items goes with reduction='sum' only (the loss is the "
                             f"sum / num_items), got reduction={self.reduction!r}")  # fmt: skip

    def schema_args(self, device: torch.device | str = "cpu") -> tuple:
        """The op's option arguments, in schema order, for inputs on ``device``."""
        values = [getattr(self, name) for name in _SCHEMA_NAMES]
        for i, to_schema in _TO_SCHEMA:
            values[i] = to_schema(values[i], device)
        return tuple(values)

    @classmethod
    def from_schema_args(cls, args) -> LinearCEOptions:
        """The options that ``schema_args`` turned into ``args`` (the others at their
        defaults)."""
        if len(args) != len(_SCHEMA_FIELDS):
            raise TypeError(f"{OP}: expected {len(_SCHEMA_FIELDS)} option arguments, got "
                            f"{len(args)}")  # fmt: skip
        return cls(**{
            f.name: value if f.metadata["from_schema"] is None else f.metadata["from_schema"](value)
            for f, value in zip(_SCHEMA_FIELDS, args, strict=True)
        })  # fmt: skip


# (name, default, check): a value equal to its default (and of its type) needs no check
_CHECKS = tuple((f.name, f.default, f.metadata["check"]) for f in fields(LinearCEOptions))
_SCHEMA_FIELDS = tuple(f for f in fields(LinearCEOptions) if f.metadata["schema"] is not None)
_SCHEMA_NAMES = tuple(f.name for f in _SCHEMA_FIELDS)
# (position, conversion) of the schema arguments that are not the kept value itself
_TO_SCHEMA = tuple(
    (i, f.metadata["to_schema"])
    for i, f in enumerate(_SCHEMA_FIELDS)
    if f.metadata["to_schema"] is not None
)
SCHEMA_ARG_COUNT = len(_SCHEMA_FIELDS)
# The option arguments of both fused_linear_cross_entropy schemas (csrc/linear_ce_options.h
# declares the same, for the compiled library).
SCHEMA = ", ".join(f"{f.metadata['schema']} {f.name}" for f in _SCHEMA_FIELDS)

"""What a model is, and whether its head and loss are ones the fused loss can stand in for.

Recognises models by their classes' modules and names, so that it runs without transformers
installed; transformers itself is imported only once a model is known to be one of its own.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from gpufit.hf._source import HeadSpec, Refusal, read_forward


class UnsupportedModelError(ValueError):
    """A model or head that the fused loss cannot (yet) stand in for; the message says why
    (``reason``: the why alone)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason if reason is not None else message.split(": ", 1)[-1]


def refusal(model_or_name, reason: str) -> UnsupportedModelError:
    """The error that refuses a model (or class name) for ``reason``."""
    name = model_or_name if isinstance(model_or_name, str) else type(model_or_name).__name__
    return UnsupportedModelError(f"gpufit.fuse: {name} is not fused: {reason}", reason)


# transformers' causal-LM loss as gpufit reproduces it (transformers 5.24.0): the arguments it
# reads; a later version that reads another (label_smoothing, say) is refused, not ignored.
PINNED_LOSS_SIGNATURE = (
    "(logits, labels, vocab_size: int, num_items_in_batch: torch.Tensor | None = None, "
    "ignore_index: int = -100, shift_labels: torch.Tensor | None = None, **kwargs) "
    "-> torch.Tensor"
)
PINNED_CROSS_ENTROPY_SIGNATURE = (
    "(source: torch.Tensor, target: torch.Tensor, num_items_in_batch: torch.Tensor | None = "
    "None, ignore_index: int = -100, **kwargs) -> torch.Tensor"
)

# hooks these packages put on a head gather or release its weight around its call (FSDP,
# DeepSpeed ZeRO-3); any other hook could rewrite what the head returns, which is the loss
_ENGINE_HOOK_MODULES = ("torch.distributed", "deepspeed")


# ================================================================ what a model is


def _classes(obj: object) -> Iterator[type]:
    return iter(type(obj).__mro__)


def _from(cls: type, *packages: str) -> bool:
    return cls.__module__.split(".")[0] in packages


def _is_peft_class(obj: object, name: str) -> bool:
    return any(c.__module__.startswith("peft.") and c.__name__ == name for c in _classes(obj))


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers (or PEFT) model inside wrappers that hold it as ``.module`` (DDP,
    FSDP1, DeepSpeed's engine), ``_checkpoint_wrapped_module`` or ``_orig_mod``
    (torch.compile)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if any(_from(c, "transformers", "peft") for c in _classes(model)):
            return model
        for attr in ("module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model
    return model


def is_transformers_model(model: object) -> bool:
    """Whether ``model`` is a transformers (or PEFT) model, or a wrapper of one, judged by its
    classes' modules."""
    if isinstance(model, nn.Module):
        model = unwrap(model)
    return any(_from(c, "transformers", "peft") for c in _classes(model))


def transformers_class(model: nn.Module) -> type | None:
    """The transformers class ``model`` is an instance of (through subclasses that engines
    make, such as FSDP2's ``FSDP<Name>``), or None."""
    return next((c for c in _classes(model) if _from(c, "transformers")), None)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (itself, a PEFT model's base, or the module
    of a wrapper), or an UnsupportedModelError."""
    model = unwrap(model)
    if _is_peft_class(model, "PeftModel"):
        model = model.get_base_model()
    cls = transformers_class(model)
    if cls is None or not hasattr(model, "get_output_embeddings"):
        raise UnsupportedModelError(
            f"gpufit.fuse: {type(model).__name__} is not a transformers model (give a "
            "transformers causal LM, a PEFT model around one, or a wrapper that holds one as "
            ".module)"
        )
    return model


def class_name(model: nn.Module) -> str:
    return type(model).__name__


# ================================================================ the head


def head_linear(head: nn.Module, *, meta_ok: bool = False, unit: bool = False) -> nn.Linear:
    """The plain ``nn.Linear`` whose weight (and bias) ``head`` computes its logits with, or an
    UnsupportedModelError naming what stands in the way. A PEFT ``modules_to_save`` wrapper
    resolves to the copy its forward would call, as PEFT itself chooses it; an FSDP1 unit to the
    module it wraps; an FSDP2 ``FSDPLinear`` is the Linear itself. The weight of a sharded
    head (``unit``: inside an FSDP1 unit) is checked inside the head's call, where it is
    gathered."""
    if _is_peft_class(head, "ModulesToSaveWrapper"):
        active = head.active_adapters
        if head.disable_adapters or not active or active[0] not in head.modules_to_save:
            return head_linear(head.original_module, meta_ok=meta_ok)
        return head_linear(head.modules_to_save[active[0]], meta_ok=meta_ok)
    if _is_peft_class(head, "LoraLayer") or hasattr(head, "lora_A"):
        raise UnsupportedModelError(
            "gpufit: lm_head carries a LoRA adapter; the fused loss needs the head's plain "
            "weight. Leave lm_head out of target_modules (train it fully with "
            "modules_to_save=['lm_head'], which gpufit supports), or do not fuse this model"
        )
    name = type(head).__name__
    if name == "FullyShardedDataParallel" and _from(type(head), "torch"):
        return head_linear(head._fsdp_wrapped_module, meta_ok=meta_ok, unit=True)
    if is_checkpoint_wrapper(head):  # a fused call bypasses it (_fused._unwrapped_forward)
        return head_linear(head._checkpoint_wrapped_module, meta_ok=meta_ok, unit=unit)
    if not (type(head) is nn.Linear or is_fsdp2_linear(head)):
        raise UnsupportedModelError(
            f"gpufit: lm_head is a {type(head).__module__}.{type(head).__name__}, not a plain "
            "torch.nn.Linear (a quantized or otherwise replaced head is not supported); the "
            "fused loss needs its weight as one tensor"
        )
    weight = head.weight
    if meta_ok and weight.device.type == "meta":  # the structure only (a meta-device shell)
        return head
    if hasattr(head, "_hf_hook") or weight.device.type == "meta":
        raise UnsupportedModelError(
            "gpufit: lm_head is offloaded (its weight lives elsewhere until its forward runs); "
            "load the head onto the device to use the fused loss"
        )
    if not (unit or is_fsdp2_linear(head) or _is_sharded(weight)):
        check_weight(head)
    return head


def _is_sharded(weight: torch.Tensor) -> bool:
    """A weight an engine may gather around its module's call only: a DeepSpeed ZeRO-3
    parameter (it has a ``ds_id``), or a DTensor (FSDP2 unshards one it manages into a plain
    tensor for the call of the group that holds it; one it does not manage stays a DTensor
    there, which the call refuses)."""
    return hasattr(weight, "ds_id") or (
        type(weight).__name__ == "DTensor" and _from(type(weight), "torch")
    )


def is_checkpoint_wrapper(module: nn.Module) -> bool:
    """torch's activation-checkpoint wrapper (``checkpoint_wrapper``, as FSDP and accelerate
    apply it)."""
    return type(module).__name__ == "CheckpointWrapper" and _from(type(module), "torch")


def is_fsdp2_linear(module: nn.Module) -> bool:
    """FSDP2's fully_shard makes a module's class ``FSDP<Name>(FSDPModule, <Name>)``."""
    bases = type(module).__bases__
    return (
        len(bases) == 2
        and bases[0].__name__ == "FSDPModule"
        and _from(bases[0], "torch")
        and bases[1] is nn.Linear
    )


def check_weight(linear: nn.Linear) -> None:
    """The head's weight is one plain floating tensor (inside the head's call, after any engine
    gathered it): not an empty ZeRO-3 placeholder, not quantized. (A DTensor weight, of a
    tensor-parallel head, is _tensor_parallel.sharded_head's to check.)"""
    weight = linear.weight
    if type(weight) is not nn.Parameter and type(weight) is not torch.Tensor:
        raise UnsupportedModelError(
            f"gpufit: lm_head's weight is a {type(weight).__name__} (quantized or otherwise "
            "wrapped) within its own call, not a plain tensor"
        )
    if not weight.is_floating_point():
        raise UnsupportedModelError(
            f"gpufit: lm_head's weight has dtype {weight.dtype}; a quantized head is not supported"
        )
    if weight.dim() != 2 or weight.numel() == 0:
        raise UnsupportedModelError(
            f"gpufit: lm_head's weight has shape {tuple(weight.shape)} within its own call; it "
            "is not gathered there (a sharding engine that gathers it elsewhere is not supported)"
        )


def hook_owner(hook) -> str:
    """The module a hook's function was defined in (through functools.partial)."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    return getattr(hook, "__module__", None) or ""


def is_engine_code(obj) -> bool:
    """Whether a hook function (or an autograd Function class) is an engine's own, one that
    gathers or releases parameters around a call (FSDP, DeepSpeed ZeRO-3)."""
    return hook_owner(obj).startswith(_ENGINE_HOOK_MODULES)


def check_hooks(chain: list[nn.Module]) -> None:
    """No hook on the head (or a wrapper of it) but an engine's, and no forward set on the
    instance but gpufit's own: either could rewrite the head's output or input, and would act
    on the fused loss, not on logits."""
    from torch.nn.modules import module as module_globals

    tables = [
        (m, name, getattr(m, name))
        for m in chain
        for name in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        )  # fmt: skip
    ]
    tables += [
        (None, name, getattr(module_globals, name, {}))
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )  # fmt: skip
    ]
    for module in chain:
        forward = vars(module).get("forward")
        if forward is not None and not getattr(forward, "_gpufit_dispatcher", False):
            raise UnsupportedModelError(
                f"gpufit: lm_head ({type(module).__name__}) has its own instance-level forward "
                f"({forward!r}, set by another library), which the fused loss would bypass"
            )
    for owner, table, hooks in tables:
        for hook in hooks.values():
            if not (is_engine_code(hook) or getattr(hook, "_gpufit_dispatcher", False)):
                where = "a module (globally)" if owner is None else "lm_head"
                raise UnsupportedModelError(
                    f"gpufit: {where} has a hook ({table.strip('_')}: {hook!r}), which would act "
                    "on the fused loss instead of logits; remove it to fuse this model"
                )


def head_chain(head: nn.Module, linear: nn.Linear) -> list[nn.Module]:
    """The modules a call of ``head`` passes through down to ``linear``."""
    return [m for m in head.modules() if m is head or m is linear or linear in set(m.modules())]


# ================================================================ the loss


def check_loss(model: nn.Module, ours) -> None:
    """``model.loss_function`` is transformers' ForCausalLMLoss, as gpufit reproduces it."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss, fixed_cross_entropy
    from transformers.modeling_utils import PreTrainedModel

    name = class_name(model)
    if (
        inspect.getattr_static(type(model), "loss_function", None)
        is not (PreTrainedModel.__dict__["loss_function"])
    ):
        raise refusal(name, "its class defines its own loss_function")
    own = vars(model).get("_loss_function")
    if own is not None and getattr(own, "__func__", None) is not ours:
        raise refusal(name, f"its loss_function was set to {own!r}; gpufit reproduces "
                      "transformers' ForCausalLMLoss only")  # fmt: skip
    loss_type = getattr(model, "loss_type", None)
    resolved = LOSS_MAPPING.get(loss_type) if loss_type in LOSS_MAPPING else ForCausalLMLoss
    if resolved is not ForCausalLMLoss:
        raise refusal(
            name,
            f"its loss_type {loss_type!r} resolves to "
            f"{getattr(resolved, '__name__', resolved)}, not the causal-LM loss",
        )
    signatures = (
        str(inspect.signature(ForCausalLMLoss)),
        str(inspect.signature(fixed_cross_entropy)),
    )
    if signatures != (PINNED_LOSS_SIGNATURE, PINNED_CROSS_ENTROPY_SIGNATURE):
        raise refusal(
            name,
            f"transformers' ForCausalLMLoss{signatures[0]} is not the one "
            "gpufit reproduces (transformers 5.24's)",
        )


# ================================================================ all at once


def admit(
    model: nn.Module, ours, *, meta_ok: bool = False
) -> tuple[HeadSpec, nn.Module, nn.Linear]:
    """(what the forward does from head to loss, the head it calls, the Linear that computes
    its logits) for a model gpufit fuses, or an UnsupportedModelError naming the class and the
    reason. ``ours``: the fused loss_function (a set one is accepted); ``meta_ok``: a head on
    the meta device is judged by its structure only."""
    name = class_name(model)
    try:
        spec = read_forward(type(model).forward)
    except Refusal as why:
        raise refusal(name, str(why)) from None
    head = model.get_output_embeddings()
    called = getattr(model, spec.head, None)
    if head is None:
        raise refusal(name, "it has no output embeddings (get_output_embeddings() is None)")
    if called is not head:
        where = next((n for n, m in model.named_modules() if m is head), "?")
        raise refusal(name, f"its forward computes logits with self.{spec.head} "
                      f"({type(called).__name__}), but its output embeddings are {where} (a "
                      "composite head)")  # fmt: skip
    try:
        linear = head_linear(head, meta_ok=meta_ok)
        check_hooks(head_chain(head, linear))
    except UnsupportedModelError as error:
        raise refusal(name, error.reason) from None
    check_loss(model, ours)
    return spec, head, linear

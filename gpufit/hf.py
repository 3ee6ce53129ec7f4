"""Hugging Face transformers causal LMs on gpufit's fused head + loss.

``fuse(model)`` takes an instance of a supported ``*ForCausalLM`` (or a PEFT model around one)
and wraps that instance's own ``forward``: in a training forward with ``labels``, for the
duration of the call the LM head passes the final hidden states through unchanged and the
model's ``loss_function`` is ``causal_lm_loss`` on those hidden states and the head's weight,
so the (tokens x vocabulary) logits are never formed. Everything else the model's forward does
(its label handling, ``logits_to_keep``, a MoE router's auxiliary loss, gradient checkpointing)
runs as it is written. Without labels, or in eval mode (``generate``), the stock forward runs
untouched. Nothing is patched globally: other instances and the classes are left alone.

``causal_lm_loss(hidden_states, lm_head, labels, ...)`` is the same loss for custom training
loops (e.g. TRL's ``compute_loss_func`` or a ``Trainer.compute_loss`` override).

This module imports transformers nowhere: it recognises a model by its class's module and
name, so ``gpufit.fuse`` can tell a transformers model apart without the extra installed.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterator

import torch
from torch import nn

from gpufit import ops

# transformers class name -> the config attribute of its final-logit softcap (None: no softcap).
# Each of these forwards computes `logits = self.lm_head(hidden)`, optionally softcaps them with
# that attribute, and then calls `self.loss_function(logits, labels, vocab_size, **kwargs)`;
# tests/test_hf.py checks each against its stock loss and gradients.
SUPPORTED = {
    "LlamaForCausalLM": None,
    "MistralForCausalLM": None,
    "MixtralForCausalLM": None,
    "Qwen2ForCausalLM": None,
    "Qwen3ForCausalLM": None,
    "Qwen3MoeForCausalLM": None,
    "GemmaForCausalLM": None,
    "Gemma2ForCausalLM": "final_logit_softcapping",
    "Phi3ForCausalLM": None,
    "GPT2LMHeadModel": None,
}

# set on a fused instance: (an instance-level forward it had before, or None; chunk_size)
_FUSED = "_gpufit_fused"


class UnsupportedModelError(ValueError):
    """A model or head that the fused loss cannot (yet) stand in for; the message says why."""


# ================================================================ what a model is


def _classes(obj: object) -> Iterator[type]:
    return iter(type(obj).__mro__)


def is_transformers_model(model: object) -> bool:
    """Whether ``model`` is a transformers (or PEFT) model, judged by its classes' modules."""
    return any(c.__module__.split(".")[0] in ("transformers", "peft") for c in _classes(model))


def _is_peft_class(obj: object, name: str) -> bool:
    return any(c.__module__.startswith("peft.") and c.__name__ == name for c in _classes(obj))


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside ``model`` (itself, or a PEFT model's base)."""
    if _is_peft_class(model, "PeftModel"):
        model = model.get_base_model()
    cls = type(model)
    if not cls.__module__.startswith("transformers.") or cls.__name__ not in SUPPORTED:
        raise UnsupportedModelError(
            f"gpufit.fuse: {cls.__name__} is not a supported transformers causal LM; supported "
            f"are {', '.join(SUPPORTED)} (an instance, or a PEFT model around one)"
        )
    return model


# ================================================================ the head


def head_linear(head: nn.Module) -> nn.Linear:
    """The plain ``nn.Linear`` whose weight (and bias) ``head`` computes its logits with, or an
    UnsupportedModelError naming what stands in the way. A PEFT ``modules_to_save`` wrapper
    resolves to the copy its forward would call, as PEFT itself chooses it."""
    if _is_peft_class(head, "ModulesToSaveWrapper"):
        active = head.active_adapters
        if head.disable_adapters or not active or active[0] not in head.modules_to_save:
            return head_linear(head.original_module)
        return head_linear(head.modules_to_save[active[0]])
    if _is_peft_class(head, "LoraLayer") or hasattr(head, "lora_A"):
        raise UnsupportedModelError(
            "gpufit: lm_head carries a LoRA adapter; the fused loss needs the head's plain "
            "weight. Leave lm_head out of target_modules (train it fully with "
            "modules_to_save=['lm_head'], which gpufit supports), or do not fuse this model"
        )
    if type(head) is not nn.Linear:
        raise UnsupportedModelError(
            f"gpufit: lm_head is a {type(head).__module__}.{type(head).__name__}, not a plain "
            "torch.nn.Linear (a quantized, FSDP-wrapped or otherwise replaced head is not "
            "supported); the fused loss needs its weight as one tensor"
        )
    weight = head.weight
    if hasattr(head, "_hf_hook") or weight.device.type == "meta":
        raise UnsupportedModelError(
            "gpufit: lm_head is offloaded (its weight lives elsewhere until its forward runs); "
            "load the head onto the device to use the fused loss"
        )
    if type(weight) is not nn.Parameter and type(weight) is not torch.Tensor:
        raise UnsupportedModelError(
            f"gpufit: lm_head's weight is a {type(weight).__name__} (sharded or quantized), "
            "not a plain tensor; the fused loss does not support a sharded head yet"
        )
    if not weight.is_floating_point():
        raise UnsupportedModelError(
            f"gpufit: lm_head's weight has dtype {weight.dtype}; a quantized head is not supported"
        )
    return head


# ================================================================ the loss


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor | None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The causal-LM loss of transformers' ``ForCausalLMLoss`` on ``lm_head(hidden_states)``,
    computed by ``gpufit.ops.fused_linear_cross_entropy`` without the logits.

    hidden_states (batch, seq, hidden) are the final hidden states (before the head); lm_head
    the model's head (``model.lm_head``: a plain ``nn.Linear``, or PEFT's modules_to_save
    wrapper of one). Token t predicts ``labels[:, t + 1]`` (the last position predicts nothing)
    unless ``shift_labels`` (batch, seq), already shifted, is given. The loss is the mean over
    tokens whose label is not ``ignore_index``, or with ``num_items_in_batch`` (an int or a
    0-dim tensor: the token count over all micro-batches of a gradient-accumulation step) their
    sum divided by it, as transformers' Trainer computes it. ``softcap``: logits become
    ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2's final softcap).
    """
    weight_of = head_linear(lm_head)
    if shift_labels is None:
        if labels is None:
            raise ValueError("gpufit.hf.causal_lm_loss: give labels or shift_labels")
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    target = shift_labels.reshape(-1).to(hidden_states.device)
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(x.device)
    return ops.fused_linear_cross_entropy(
        x, weight_of.weight, target, weight_of.bias, ignore_index=ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum", softcap=softcap,
        num_items=num_items_in_batch, chunk_size=chunk_size,
    )  # fmt: skip


# ================================================================ the patched forward


def _hidden_states_through(self, hidden_states, *args, **kwargs):
    return hidden_states


def _fused_loss_function(model: nn.Module, head: nn.Module, softcap, chunk_size):
    """The model's loss_function while fused: transformers' causal-LM loss signature, computed
    by causal_lm_loss from what the pass-through head gave (the hidden states)."""

    def loss_function(
        logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
        shift_labels=None, **kwargs,
    ):  # fmt: skip
        return causal_lm_loss(
            logits, head, labels, shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, softcap=softcap,
            chunk_size=chunk_size,
        )  # fmt: skip

    return loss_function


# Entering and leaving the fused state change attributes of the model, its head and its config;
# under torch.compile they run eagerly (a graph break each side), so that what the compiled
# stock forward sees is exactly that state, and leaving always undoes what entering did.
@torch.compiler.disable
def _enter_fused(model: nn.Module, chunk_size: int | None) -> tuple:
    """For one call: the head returns its input, the model's loss_function is the fused loss on
    it, and a final softcap (applied by the fused loss instead) is off. Returns what
    _leave_fused needs to undo it; refuses (changing nothing) a head it cannot read."""
    head = model.get_output_embeddings()
    head_linear(head)
    config = model.config
    softcap_attr = SUPPORTED[type(model).__name__]
    softcap = getattr(config, softcap_attr) if softcap_attr else None
    saved = (head, vars(model).get("_loss_function", _NOTHING), softcap_attr, softcap)
    head.forward = _hidden_states_through.__get__(head)
    model.loss_function = _fused_loss_function(model, head, softcap, chunk_size)
    if softcap is not None:
        setattr(config, softcap_attr, None)
    return saved


@torch.compiler.disable
def _leave_fused(model: nn.Module, saved: tuple) -> None:
    head, loss_function, softcap_attr, softcap = saved
    vars(head).pop("forward", None)
    if loss_function is _NOTHING:
        vars(model).pop("_loss_function", None)
    else:
        model.loss_function = loss_function
    if softcap is not None:
        setattr(model.config, softcap_attr, softcap)


_NOTHING = object()


def _without_logits(output):
    """The model's output with the slot of the logits (which held hidden states) emptied."""
    if isinstance(output, tuple):  # return_dict=False: (loss, logits, ...)
        return output[:1] + output[2:]
    return type(output)(**{k: v for k, v in output.items() if k != "logits"})


def _labels_position(forward) -> int | None:
    """Where ``labels`` sits among the positional arguments of a bound call (self excluded)."""
    params = list(inspect.signature(forward).parameters.values())[1:]  # the class's function
    for position, param in enumerate(params):
        if param.name == "labels":
            return position if param.kind == param.POSITIONAL_OR_KEYWORD else None
    return None


@functools.cache
def _fused_forward(cls: type) -> Callable:
    """The fused forward of a model class, bound to each fused instance. It reads everything
    from the instance (no closure over it), so a deepcopy of a fused model is fused itself,
    bound to the copy; functools.wraps gives it the stock signature, whose names Trainer keeps
    as dataset columns."""
    stock = cls.forward
    labels_at = _labels_position(stock)

    def run(self, args, kwargs):
        # stock(self, ...), not stock.__get__(self) kept in a local: under torch.compile (2.14)
        # the frame resumed after _enter_fused's graph break called that local and recursed
        # into this very forward
        earlier = vars(self)[_FUSED][0]
        return stock(self, *args, **kwargs) if earlier is None else earlier(*args, **kwargs)

    @functools.wraps(stock)
    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        if labels is None and labels_at is not None and len(args) > labels_at:
            labels = args[labels_at]
        if labels is None or not self.training:
            return run(self, args, kwargs)
        saved = _enter_fused(self, vars(self)[_FUSED][1])
        try:
            output = run(self, args, kwargs)
        finally:
            _leave_fused(self, saved)
        return _without_logits(output)

    return forward


def fuse(model: nn.Module, *, chunk_size: int | None = None) -> nn.Module:
    """Make a supported transformers causal LM train through the fused head + loss, in place;
    returns ``model``. See the module docstring for what changes and what does not.

    ``model``: an instance of a class in ``SUPPORTED`` or a PEFT model around one; calling
    ``fuse`` again is a no-op. A head the fused loss cannot read (LoRA on lm_head itself, a
    quantized, FSDP-sharded or offloaded head) is refused with UnsupportedModelError, here and
    at every training forward (an adapter may be added later). ``chunk_size`` goes to
    ``fused_linear_cross_entropy`` (None: its own plan).
    """
    causal_lm = _causal_lm(model)
    head_linear(causal_lm.get_output_embeddings())
    if _FUSED in vars(causal_lm):
        return model
    earlier = vars(causal_lm).get("forward")  # an instance-level wrapper put there before us
    setattr(causal_lm, _FUSED, (earlier, chunk_size))
    causal_lm.forward = types.MethodType(_fused_forward(type(causal_lm)), causal_lm)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo ``fuse``: the instance's forward is the stock one again; returns ``model``."""
    causal_lm = _causal_lm(model)
    if _FUSED in vars(causal_lm):
        earlier, _ = vars(causal_lm).pop(_FUSED)
        if earlier is None:
            del causal_lm.forward
        else:
            causal_lm.forward = earlier
    return model

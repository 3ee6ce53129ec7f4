"""Hugging Face transformers causal LMs on gpufit's fused head + loss.

``fuse(model)`` takes a transformers model (or a PEFT model around one, or a wrapper holding
one as ``.module``) whose forward gpufit reproduces, and wraps that instance's own ``forward``:
in a training forward with ``labels``, the head's call computes the loss with
``fused_linear_cross_entropy`` from the final hidden states (the tokens x vocabulary logits are
never formed) and returns it, and the model's ``loss_function`` returns what the head returned
(_fused.py). Everything else the model's forward does runs as it is written. Without labels, or
in eval mode (``generate``), the stock forward runs untouched. Nothing is patched globally.

A model is admitted by what its forward does, not by its name (_source.py reads the installed
forward's source; _models.py checks the head and the loss): the head is called once and its
output goes to ``self.loss_function`` unchanged or through transforms gpufit folds into the op
(a scalar multiply or divide, a softcap, a cast); anything else is an UnsupportedModelError
naming the class and the reason. ``python -m gpufit.hf families`` prints the verdict for every
class of the installed transformers.

``causal_lm_loss(hidden_states, lm_head, labels, ...)`` is the same loss for custom training
loops (e.g. TRL's ``compute_loss_func`` or a ``Trainer.compute_loss`` override).

This package imports transformers only once a model is known to be one of its own, so
``gpufit.fuse`` can tell a transformers model apart without the extra installed.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gpufit.hf import _fused, _trl
from gpufit.hf._models import (
    UnsupportedModelError,
    admit,
    causal_lm,
    head_linear,
    is_transformers_model,
)

__all__ = [
    "UnsupportedModelError",
    "causal_lm_loss",
    "fuse",
    "head_linear",
    "is_transformers_model",
    "unfuse",
]

# set on a fused instance
_FUSED = "_gpufit_fused"


@dataclass(frozen=True)
class _Fused:
    earlier: Callable | None  # an instance-level forward the model had before fuse
    chunk_size: int | None


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor | None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The causal-LM loss of transformers' ``ForCausalLMLoss`` on ``lm_head(hidden_states)``,
    computed by ``gpufit.ops.fused_linear_cross_entropy`` without the logits, inside a call of
    ``lm_head`` (so an engine that gathers the head's weight around its call has it there).

    hidden_states (batch, seq, hidden) are the final hidden states (before the head); lm_head
    the model's head (``model.lm_head``: a plain ``nn.Linear``, or PEFT's modules_to_save
    wrapper or an FSDP unit of one, or one that ``ColwiseParallel`` shards over the vocabulary:
    then each rank computes on its own rows, _tensor_parallel.py). Token t predicts
    ``labels[:, t + 1]`` (the last position predicts nothing) unless ``shift_labels`` (batch,
    seq), already shifted, is given. The loss is the mean over tokens whose label is not
    ``ignore_index``, or with ``num_items_in_batch`` (an int or a 0-dim tensor: the token count
    over all micro-batches of a gradient-accumulation step) their sum divided by it, as
    transformers' Trainer computes it. The logits are ``logit_scale * lm_head(hidden_states)``,
    then ``softcap * tanh(logits / softcap)`` if a softcap is given (Gemma's final softcap).
    """
    if shift_labels is None and labels is None:
        raise ValueError("gpufit.hf.causal_lm_loss: give labels or shift_labels")
    linear = head_linear(lm_head)
    operations = (logit_scale, softcap, [])
    call = _fused.new_call(None, lm_head, linear, labels, shift_labels, num_items_in_batch,
                           ignore_index, chunk_size, lambda: operations)  # fmt: skip
    token = _fused.enter(call, head_only=True)
    try:
        loss = lm_head(hidden_states)
    finally:
        _fused.leave(call, token)
    if call.head_calls != 1:
        raise UnsupportedModelError(
            f"gpufit.hf.causal_lm_loss: calling lm_head ran {call.head_calls} fused losses "
            "(a hook or wrapper around the head changes what it calls)"
        )
    return loss


# ================================================================ the patched forward


def _without_logits(output):
    """The model's output with the slot of the logits (which held the loss) emptied."""
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


# Entering and leaving a fused call run eagerly under torch.compile (a graph break each side):
# they read the model's state and set this context's call, which the compiled stock forward
# must see as it is.
@torch.compiler.disable
def _enter(model: nn.Module, labels, kwargs: dict):
    """Check the model for this call and start it; refuses (changing nothing) a model or head
    the fused loss cannot stand in for."""
    spec, head, linear = admit(model, _fused.LOSS_FUNCTION)
    call = _fused.new_call(
        model, head, linear, labels, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"),
        kwargs.get("ignore_index", -100), vars(model)[_FUSED].chunk_size,
        functools.partial(_fused.fold, spec, model),
    )  # fmt: skip
    return call, _fused.enter(call)


@torch.compiler.disable
def _leave(call, token, failed: bool) -> None:
    _fused.leave(call, token)
    if not failed:
        call.check_complete()


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
        # the frame resumed after _enter's graph break called that local and recursed into
        # this very forward
        earlier = vars(self)[_FUSED].earlier
        return stock(self, *args, **kwargs) if earlier is None else earlier(*args, **kwargs)

    @functools.wraps(stock)
    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        if labels is None and labels_at is not None and len(args) > labels_at:
            labels = args[labels_at]
        if labels is None or not self.training:
            return run(self, args, kwargs)
        call, token = _enter(self, labels, kwargs)
        try:
            output = run(self, args, kwargs)
        except BaseException:
            _leave(call, token, failed=True)
            raise
        _leave(call, token, failed=False)
        return _without_logits(output)

    return forward


def fuse(model: nn.Module, *, chunk_size: int | None = None) -> nn.Module:
    """Make a transformers causal LM train through the fused head + loss, in place; returns
    ``model``. See the package docstring for what changes and what does not.

    ``model``: a transformers model whose forward gpufit reproduces (``python -m gpufit.hf
    families`` lists them), a PEFT model around one, or a wrapper that holds one as ``.module``
    (DDP, FSDP1, DeepSpeed) or ``_orig_mod``; the transformers class may be an engine's subclass
    of it (FSDP2's ``FSDP<Name>``). Calling ``fuse`` again is a no-op. Anything else, or a head
    the fused loss cannot read (LoRA on lm_head itself, a quantized or offloaded head, a hook on
    it), is refused with UnsupportedModelError, here and at every training forward (an adapter
    may be added later). ``chunk_size`` goes to ``fused_linear_cross_entropy`` (None: its own
    plan).
    """
    model_lm = causal_lm(model)
    admit(model_lm, _fused.LOSS_FUNCTION)
    if _FUSED in vars(model_lm):
        return model
    earlier = vars(model_lm).get("forward")  # an instance-level wrapper put there before us
    if earlier is not None and _trl.trl_head_of(earlier):
        raise UnsupportedModelError(
            f"gpufit.fuse: {type(model_lm).__name__} is not fused: it has TRL's fused LM head "
            f"already (a TRL trainer added it), which never calls the model's head; {_trl.FIX}"
        )
    setattr(model_lm, _FUSED, _Fused(earlier, chunk_size))
    model_lm.forward = types.MethodType(_fused_forward(type(model_lm)), model_lm)
    _trl.watch(model_lm)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo ``fuse``: the instance's forward is the stock one again; returns ``model``."""
    model_lm = causal_lm(model)
    if _FUSED in vars(model_lm):
        earlier = vars(model_lm).pop(_FUSED).earlier
        _trl.unwatch(model_lm)
        if earlier is None:
            del model_lm.forward
        else:
            model_lm.forward = earlier
    return model

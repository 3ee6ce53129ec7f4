"""gpufit's fused op as the kernel under TRL's fused LM head.

TRL's trainers (SFT, DPO, GRPO, KTO, RLOO, ...) never compute their losses from the model's
logits: at construction they call ``trl.trainer.utils.add_fused_lm_head``, which replaces the
model's forward, and ``model(..., fused_lm_head=True)`` then runs the backbone and TRL's chunked
head (``trl.kernels.ChunkedLogProbFunction``), which returns per-token log-probabilities and,
on request, entropy, ``log_sum_sq_probs``, ``mean_logits`` and ``is_top1``.

``use_gpufit()`` puts gpufit in that kernel's place: every fused head of every TRL trainer
(whenever it was added) then runs on ``gpufit.ops.fused_linear_cross_entropy`` with the same
arguments and the same outputs, and ``use_trl_kernel()`` puts TRL's kernel back. ``use_gpufit``
also works as a context manager that restores, on exit, whichever kernel was in place before::

    import gpufit.trl

    gpufit.trl.use_gpufit()          # from here on, for the whole process
    trainer = SFTTrainer(...)
    trainer.train()

    with gpufit.trl.use_gpufit():    # or for one block only
        trainer.train()

A call gpufit cannot serve runs on TRL's own kernel, unchanged (never on something else), and
the first call of each kind warns once, saying why: an output gpufit's op does not compute, a
device other than CPU or CUDA (or CUDA with a CPU-only build), a head that DeepSpeed ZeRO-3
partitions (TRL gathers it around the forward and gathers it again in its own backward;
gpufit's backward would find the released weight), a tensor subclass (a DTensor, a quantized
weight), or an argument the op refuses.

What the stand-in does with TRL's arguments: ``hidden @ weight.T + bias`` with TRL's
``logit_scale``, ``final_logit_softcapping`` and ``temperature`` become the op's
``logit_scale``, ``softcap`` and ``temperature``; the log-probability of each target is
``-loss`` with ``reduction="none"``, ``is_top1`` is the op's argmax equal to the target, and
entropy, ``log_sum_sq_probs`` and ``mean_logits`` are the op's outputs of those names. The
dtype the head computes in is TRL's: the autocast dtype where autocast is on, else the hidden
states' (a weight in another dtype is cast to it as a whole, where TRL casts it chunk by chunk).
TRL's ``chunk_size`` (its tile's width) is not passed on: gpufit's op plans its own chunks.
Per-token outputs are float32 and ``is_top1`` bool, as TRL returns them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import warnings

import torch

__all__ = ["is_gpufit_in_use", "use_gpufit", "use_trl_kernel"]

# TRL's per-token outputs besides the log-probabilities -> the op's option that computes each
_OUTPUT_OPTIONS = {
    "entropy": "return_entropy",
    "log_sum_sq_probs": "return_log_sum_sq_probs",
    "mean_logits": "return_mean_logits",
    "is_top1": "return_predicted",
}
# in the order of the op's outputs after the loss (and of TRL's results after the log-probs)
_OP_RESULTS = ("return_predicted", "return_entropy", "return_log_sum_sq_probs",
               "return_mean_logits")  # fmt: skip
_TRL_RESULTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# the module whose global name TRL's fused forward calls, and that name
_TRL_UTILS = "trl.trainer.utils"
_KERNEL_NAME = "_ChunkedLogProbFunction"


def _trl_utils():
    try:
        return importlib.import_module(_TRL_UTILS)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "gpufit.trl needs TRL: pip install 'gpufit[trl]'", name="trl"
        ) from None


class GpufitLogProbFunction:
    """Stands in for TRL's ``ChunkedLogProbFunction``: the same ``apply`` arguments and
    results, computed by gpufit's op, or by ``trl_kernel`` (the kernel it replaced) where gpufit
    cannot serve the call."""

    trl_kernel = None  # set by use_gpufit

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size,
              final_logit_softcapping=None, logit_scale=1.0, outputs=None):  # fmt: skip
        if outputs is None:  # TRL's default: every output
            outputs = _TRL_RESULTS
        call = _Call.of(hidden, weight, bias, targets, temperature, final_logit_softcapping,
                        logit_scale, outputs)  # fmt: skip
        if isinstance(call, str):
            _warn_once(call)
            return cls.trl_kernel.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                        final_logit_softcapping, logit_scale, outputs)  # fmt: skip
        return call.run()


@dataclasses.dataclass
class _Call:
    """One call gpufit serves: the op's tensors and options, and which TRL outputs to return."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    options: object  # gpufit.ops.LinearCEOptions
    wanted: tuple[str, ...]

    @classmethod
    def of(cls, hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs):
        """The call, or why gpufit cannot serve it (a string)."""
        from gpufit import ops

        why = _unservable(hidden, weight, bias)
        if why:
            return why
        unknown = [name for name in outputs if name != "log_probs" and name not in _OUTPUT_OPTIONS]
        if unknown:
            return f"an output gpufit does not know ({', '.join(map(repr, unknown))})"
        wanted = tuple(name for name in _TRL_RESULTS if name in outputs)
        flags = {_OUTPUT_OPTIONS[name]: True for name in wanted}
        try:
            options = ops.LinearCEOptions(reduction="none", softcap=softcap,
                                          logit_scale=logit_scale, temperature=temperature,
                                          **flags)  # fmt: skip
        except (TypeError, ValueError) as err:
            return f"the op refuses an argument ({err})"
        x, weight, bias = _in_compute_dtype(hidden, weight, bias)
        return cls(x, weight, bias, targets, options, wanted)

    def run(self) -> tuple:
        from gpufit import ops

        results = ops.run_fused_linear_cross_entropy(
            self.options, self.x, self.weight, self.targets, self.bias
        )
        if not isinstance(results, tuple):
            results = (results,)
        loss, rest = results[0], results[1:]
        # the op's extra outputs come in _OP_RESULTS order, those asked only
        asked = [name for name in _OP_RESULTS if getattr(self.options, name)]
        by_option = dict(zip(asked, rest, strict=True))
        per_token = {"log_probs": (-loss).float()}
        for name in self.wanted:
            value = by_option[_OUTPUT_OPTIONS[name]]
            per_token[name] = value == self.targets if name == "is_top1" else value.float()
        return tuple(per_token.get(name) for name in ("log_probs", *_TRL_RESULTS))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _unservable(hidden, weight, bias) -> str | None:
    """Why gpufit's op cannot take these tensors from TRL (None: it can)."""
    from gpufit import ops

    tensors = [t for t in (hidden, weight, bias) if t is not None]
    device = hidden.device
    if device.type not in ("cpu", "cuda"):
        return f"gpufit has no kernel for {device.type} tensors"
    if device.type == "cuda" and not (ops.BACKEND.kind == "reference" or ops.BACKEND.with_cuda):
        return "this gpufit build has no CUDA kernels"
    if any(hasattr(t, "ds_id") for t in (weight, bias) if t is not None):
        return "the head is partitioned by DeepSpeed ZeRO-3"
    subclassed = [type(t).__name__ for t in tensors if type(t) not in _PLAIN]
    if subclassed:  # a DTensor (TRL gathers FSDP2's head first), a quantized weight, ...
        return f"a {subclassed[0]} input"
    if hidden.dim() != 2 or weight.dim() != 2:
        return "hidden states or weight not 2-D"
    if _compute_dtype(hidden) not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{_compute_dtype(hidden)} compute"
    if torch.is_autocast_enabled(device.type) and any(t.dtype == torch.float64 for t in tensors):
        return "float64 inputs under autocast (TRL casts them, gpufit's autocast rule does not)"
    return None


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype TRL's kernel computes the head in: autocast's where it is on, else hidden's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _in_compute_dtype(hidden, weight, bias):
    """Under autocast the op casts as TRL does; without it, a weight or bias in another dtype
    than the hidden states is cast to theirs (differentiably), as TRL casts its chunks."""
    dtype = _compute_dtype(hidden)
    if torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    weight = weight if weight.dtype == dtype else weight.to(dtype)
    bias = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
    return hidden, weight, bias


_warned: set[str] = set()


def _warn_once(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"gpufit.trl: TRL's own kernel runs this fused-head call: {why}",
                      stacklevel=3)  # fmt: skip


# ================================================================ switching the kernel


class _Switch(contextlib.AbstractContextManager):
    """What use_gpufit returns: the kernel is switched already; leaving a ``with`` block
    restores the one in place before."""

    def __init__(self, previous):
        self._previous = previous

    def __exit__(self, *exc) -> None:
        setattr(_trl_utils(), _KERNEL_NAME, self._previous)


def use_gpufit() -> _Switch:
    """From now on, TRL's fused LM heads (of models patched before or after this call) run on
    gpufit's op; returns a context manager whose exit restores the kernel in place before.
    Calling it again changes nothing. Raises ModuleNotFoundError without TRL."""
    utils = _trl_utils()
    previous = getattr(utils, _KERNEL_NAME)
    if previous is not GpufitLogProbFunction:
        GpufitLogProbFunction.trl_kernel = previous
        setattr(utils, _KERNEL_NAME, GpufitLogProbFunction)
    return _Switch(previous)


def use_trl_kernel() -> None:
    """Undo ``use_gpufit``: TRL's fused LM heads run on TRL's own kernel again."""
    utils = _trl_utils()
    if getattr(utils, _KERNEL_NAME) is GpufitLogProbFunction:
        setattr(utils, _KERNEL_NAME, GpufitLogProbFunction.trl_kernel)


def is_gpufit_in_use() -> bool:
    """Whether TRL's fused LM heads run on gpufit now (False when TRL is not imported)."""
    import sys

    utils = sys.modules.get(_TRL_UTILS)
    return utils is not None and getattr(utils, _KERNEL_NAME, None) is GpufitLogProbFunction

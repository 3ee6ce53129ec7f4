"""A fused model that a TRL trainer then gives its own fused LM head.

TRL's trainers call ``trl.trainer.utils.add_fused_lm_head`` on their model, which replaces the
model's forward: ``model(..., fused_lm_head=True)`` then runs the backbone and TRL's chunked
head, and the forward that ``gpufit.fuse`` installed never runs in training. gpufit cannot stop
that replacement, so it watches for its effect: ``watch`` puts a forward pre-hook on the fused
model's backbone, which looks (a few frames up) for TRL's fused forward calling it, and warns
once per model, naming the fix, unless ``gpufit.trl.use_gpufit()`` has put gpufit under TRL's
head already. ``trl_head_of`` tells ``fuse`` that a model has TRL's head already.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

# the module of TRL's add_fused_lm_head, and the name of the forward it installs
_TRL_UTILS = "trl.trainer.utils"
_TRL_FORWARD = "_fused_forward"
# frames between the hook and the code that called the backbone: nn.Module's _call_impl and
# _wrapped_call_impl, and room for an engine's wrapper or two
_FRAMES_UP = 6
_WARNED = "_gpufit_trl_warned"

FIX = "call gpufit.trl.use_gpufit() to run TRL's head on gpufit's op"


def _is_trl_forward(code) -> bool:
    return code.co_name == _TRL_FORWARD and code.co_filename.replace("\\", "/").endswith(
        "trl/trainer/utils.py"
    )


def trl_head_of(forward) -> bool:
    """Whether an instance's forward is (or wraps, through functools.wraps) TRL's fused one."""
    for _ in range(8):
        function = getattr(forward, "__func__", forward)
        code = getattr(function, "__code__", None)
        if code is not None and _is_trl_forward(code):
            return True
        forward = getattr(function, "__wrapped__", None) or getattr(forward, "__wrapped__", None)
        if forward is None:
            return False
    return False


def _gpufit_under_trl() -> bool:
    trl_adapter = sys.modules.get("gpufit.trl")
    return trl_adapter is not None and trl_adapter.is_gpufit_in_use()


@torch.compiler.disable
def _backbone_pre_hook(backbone: nn.Module, args) -> None:
    if not backbone.training:
        return
    frame = sys._getframe(1)
    for _ in range(_FRAMES_UP):
        if frame is None:
            return
        if _is_trl_forward(frame.f_code):
            break
        frame = frame.f_back
    else:
        return
    model = frame.f_locals.get("self")
    if model is None or vars(model).get(_WARNED) or _gpufit_under_trl():
        return
    vars(model)[_WARNED] = True
    warnings.warn(
        f"gpufit.fuse: TRL's fused LM head (add_fused_lm_head, which TRL's trainers add) "
        f"replaced the forward of this fused {type(model).__name__}: it trains on TRL's "
        f"kernel, not on gpufit's; {FIX}",
        stacklevel=2,
    )


def _backbone(model: nn.Module) -> nn.Module | None:
    backbone = getattr(model, "base_model", None)
    return backbone if isinstance(backbone, nn.Module) and backbone is not model else None


def watch(model: nn.Module) -> None:
    """Warn once when TRL's fused head runs ``model``'s backbone (see the module docstring)."""
    backbone = _backbone(model)
    if backbone is not None and _backbone_pre_hook not in backbone._forward_pre_hooks.values():
        backbone.register_forward_pre_hook(_backbone_pre_hook)


def unwatch(model: nn.Module) -> None:
    backbone = _backbone(model)
    if backbone is not None:
        hooks = backbone._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is _backbone_pre_hook]:
            del hooks[key]

"""The fused loss inside the head's own call.

In a fused training forward, the innermost ``nn.Linear`` of the head computes the loss from its
input (``fused_linear_cross_entropy``: no logits) and returns it as its output; the model's
``loss_function`` then receives that tensor and returns it. The loss thus runs inside the head's
call, where every engine (FSDP1/2, DeepSpeed ZeRO-3) has the weight gathered, and leaves it as
that call's output, on which they hook backward. A tensor-parallel head (ColwiseParallel: its
weight a DTensor sharded over the vocabulary) computes it from its own rows and the other
ranks' statistics (_tensor_parallel.py) and returns it past the style's output hook, which
converts logits' layouts (_LayoutHook). What the call needs (labels, shift_labels,
num_items_in_batch, the transforms' values) is handed to it through a context variable, so a
call of the same head elsewhere (another thread, another context) is the stock one.

For the duration of a fused call the Linear's instance ``forward`` and the model's
``_loss_function`` are dispatchers that look the context up; they are put there by the first
call that needs them and taken away (the previous ones restored) by the last, under a lock.

A handshake checks each fused forward: one head call, one loss call; the loss call gets the very
tensor the head returned (version unchanged), the labels, shift_labels, num_items_in_batch and
ignore_index the call was given, and a vocab_size that is the head's. Transforms the forward
applies between them (read from its source, _source.py) are folded into the op; the head then
returns the loss as a tensor subclass on which exactly those operations, with exactly those
operands, return it unchanged. Anything else raises UnsupportedModelError.
"""

from __future__ import annotations

import contextvars
import numbers
import threading
import types
from collections import OrderedDict, deque

import torch
from torch import nn

from gpufit import ops
from gpufit.hf._models import (
    UnsupportedModelError,
    check_weight,
    head_chain,
    hook_owner,
    is_checkpoint_wrapper,
    is_engine_code,
)
from gpufit.hf._source import HeadSpec, describe_path
from gpufit.hf._tensor_parallel import is_dtensor, sharded_head, vocab_parallel_cross_entropy

_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("gpufit_hf_call", default=None)


# ================================================================ the loss itself


def fused_causal_lm_loss(
    hidden_states: torch.Tensor,
    linear: nn.Linear,
    labels: torch.Tensor | None,
    *,
    shift_labels: torch.Tensor | None,
    num_items_in_batch,
    ignore_index: int,
    softcap: float | None,
    logit_scale: float,
    chunk_size: int | None,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss of ``linear``'s logits of hidden_states, fused (a
    vocabulary-sharded head's too: _tensor_parallel.py)."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("gpufit.hf.causal_lm_loss: give labels or shift_labels")
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    target = shift_labels.reshape(-1).to(hidden_states.device)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(hidden_states.device)
    if is_dtensor(linear.weight):
        x, weight, bias, start, group = sharded_head(linear, hidden_states)
        return vocab_parallel_cross_entropy(
            x.reshape(-1, x.shape[-1]), weight, target, bias, vocab_start=start, group=group,
            ignore_index=ignore_index, num_items=num_items_in_batch, softcap=softcap,
            logit_scale=logit_scale, chunk_size=chunk_size,
        )  # fmt: skip
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    return ops.fused_linear_cross_entropy(
        x, linear.weight, target, linear.bias, ignore_index=ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum", softcap=softcap,
        num_items=num_items_in_batch, chunk_size=chunk_size, logit_scale=logit_scale,
    )  # fmt: skip


# ================================================================ one fused call


class _Call:
    """One fused computation of the loss: what the head's call needs, and what the handshake
    checks afterwards."""

    def __init__(self, owner, linear, labels, shift_labels, num_items, ignore_index, chunk_size,
                 fold):  # fmt: skip
        self.owner = owner  # the model whose forward this is (None: causal_lm_loss)
        self.linear = linear
        self.labels = labels
        self.shift_labels = shift_labels
        self.num_items = num_items
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.fold = fold  # () -> (logit_scale, softcap, the operations the forward will apply)
        self.head_calls = 0
        self.loss_calls = 0
        self.output = None
        self.version = None

    def refuse(self, why: str) -> UnsupportedModelError:
        name = "causal_lm_loss" if self.owner is None else type(self.owner).__name__
        return UnsupportedModelError(f"gpufit.fuse: {name}: {why}")

    def head(self, linear: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
        """The head's call: the fused loss, as what the head returns."""
        self.head_calls += 1
        if self.head_calls > 1:
            raise self.refuse("its head was called twice in one fused forward")
        if not is_dtensor(linear.weight):  # a sharded head's layout: sharded_head checks it
            check_weight(linear)
        logit_scale, softcap, operations = self.fold()
        loss = fused_causal_lm_loss(
            hidden_states, linear, self.labels, shift_labels=self.shift_labels,
            num_items_in_batch=self.num_items, ignore_index=self.ignore_index, softcap=softcap,
            logit_scale=logit_scale, chunk_size=self.chunk_size,
        )  # fmt: skip
        output = _HeadOutput.of(loss, operations, self) if operations else loss
        self.output, self.version = output, output._version
        return output

    def loss(self, logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels):
        """The model's loss_function call: the handshake, then the loss the head computed."""
        self.loss_calls += 1
        if self.loss_calls > 1:
            raise self.refuse("its loss_function was called twice in one fused forward")
        if self.head_calls != 1 or not _handed_through(logits, self.output):
            raise self.refuse(
                "its loss_function got a tensor other than the one its head returned (an "
                "unrecognised transform of the logits, or a hook); the fused loss would differ"
            )
        if logits._version != self.version:
            raise self.refuse("its logits were changed in place before the loss")
        if isinstance(logits, _HeadOutput) and logits.pending:
            missing = ", ".join(_describe(op) for op in logits.pending)
            raise self.refuse(f"its forward did not apply {missing} to its logits, as its "
                              "source says it does")  # fmt: skip
        same = (
            labels is self.labels
            and shift_labels is self.shift_labels
            and num_items_in_batch is self.num_items
            and ignore_index == self.ignore_index
        )
        if not same:
            raise self.refuse("its loss_function got labels, shift_labels, num_items_in_batch or "
                              "ignore_index other than its forward was given")  # fmt: skip
        if vocab_size != self.linear.out_features:
            raise self.refuse(f"its loss_function got vocab_size={vocab_size}, but its head has "
                              f"{self.linear.out_features} outputs")  # fmt: skip
        return logits.as_subclass(torch.Tensor) if isinstance(logits, _HeadOutput) else logits

    def check_complete(self) -> None:
        if self.head_calls != 1 or self.loss_calls != 1:
            raise self.refuse(
                f"its forward called its head {self.head_calls} and its loss_function "
                f"{self.loss_calls} times (a fused forward calls each once)"
            )


def _handed_through(got: torch.Tensor, output: torch.Tensor) -> bool:
    """Whether ``got`` is ``output``, or ``output`` handed on by the identity autograd functions
    an engine applies to a module's outputs to hook its backward (DeepSpeed ZeRO-3 passes each
    output through ``outputs.detach()`` in one): the same storage, shape, strides, dtype and
    version, and between the two only such functions, each of the one before."""
    if got is output:
        return True
    same_data = (
        torch.is_tensor(got)
        and got.data_ptr() == output.data_ptr()
        and got.shape == output.shape
        and got.stride() == output.stride()
        and got.dtype == output.dtype
        and got._version == output._version
    )
    if not same_data:
        return False
    fn = got.grad_fn
    while fn is not output.grad_fn:
        forward_cls = getattr(fn, "_forward_cls", None)
        if forward_cls is None or not is_engine_code(forward_cls) or len(fn.next_functions) != 1:
            return False
        fn = fn.next_functions[0][0]
    return True


def _describe(operation: tuple) -> str:
    kind, *rest = operation
    return {"mul": "* {}", "div": "/ {}", "tanh": "tanh", "cast": ".{}()"}[kind].format(*rest)


class _HeadOutput(torch.Tensor):
    """The fused loss, returned by the head in place of logits the forward then transforms:
    the operations it applies (all folded into the loss already) return it unchanged, one by one
    in the order its source gives, each only with the operand value that was folded. Any other
    operation works on it as on a plain tensor, whose result the handshake then refuses."""

    pending: deque

    @classmethod
    def of(cls, loss: torch.Tensor, operations: list, call: _Call) -> _HeadOutput:
        output = loss.as_subclass(cls)
        output.pending = deque(operations)
        return output

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if args and type(args[0]) is cls and args[0]._expects(func, args, kwargs):
            args[0].pending.popleft()
            return args[0]
        if func is torch.Tensor.detach and len(args) == 1 and type(args[0]) is cls:
            # an engine's identity function (ZeRO-3's) hands on the output detached: the same
            # loss, with the same operations still to come
            with torch._C.DisableTorchFunctionSubclass():
                detached = args[0].detach().as_subclass(cls)
            detached.pending = args[0].pending
            return detached
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def _expects(self, func, args, kwargs) -> bool:
        if not self.pending or kwargs:
            return False
        kind, *operand = self.pending[0]
        name = getattr(func, "__name__", "")
        if kind == "tanh":
            return name == "tanh" and len(args) == 1
        if kind == "cast":
            return name == operand[0] and len(args) == 1
        names = ("mul", "__mul__", "__rmul__") if kind == "mul" else ("div", "__truediv__")
        return name in names and len(args) == 2 and _same_value(args[1], operand[0])


def _same_value(got, expected) -> bool:
    if got is expected:
        return True
    return type(got) in (int, float) and type(expected) in (int, float) and got == expected


# ================================================================ transforms


def read_value(model: nn.Module, path) -> object:
    """The value at ``path`` (_source.Path) on the model, read now."""
    if path[0] == "const":
        return path[1]
    value = model
    for kind, name in path:
        if kind == "attr":
            value = getattr(value, name)
        elif kind == "call":
            value = getattr(value, name)()
        else:
            value = getattr(value, name, None)
    return value


def fold(spec: HeadSpec, model: nn.Module) -> tuple[float, float | None, list]:
    """(logit_scale, softcap, the operations the forward applies to its logits) for this call,
    from the values the forward's transforms read now."""
    scale, softcap, operations = 1.0, None, []
    for step in spec.steps:
        if step.guard is not None and read_value(model, step.guard) is None:
            continue
        if step.kind == "cast":
            operations.append(("cast", step.name))
            continue
        value = read_value(model, step.value)
        number = _number(model, step, value)
        if step.kind == "mul":
            scale *= number
            operations.append(("mul", value))
        elif step.kind == "div":
            scale /= number
            operations.append(("div", value))
        else:
            softcap = number
            operations += [("div", value), ("tanh",), ("mul", value)]
    return scale, softcap, operations


def _number(model, step, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UnsupportedModelError(
            f"gpufit.fuse: {type(model).__name__}: {describe_path(step.value)} is {value!r}; its "
            f"transform ({step.describe()}) is folded into the fused loss as a number only"
        )
    return float(value)


# ================================================================ the dispatchers


class _Patches:
    """Attributes set on objects for as long as any fused call needs them (reference counted,
    under one lock); the last one out restores what was there before."""

    lock = threading.Lock()
    table: dict[tuple[int, str], list] = {}  # (id(obj), attr) -> [count, obj, previous]
    ABSENT = object()

    @classmethod
    def acquire(cls, obj, attr: str, value) -> None:
        with cls.lock:
            entry = cls.table.get((id(obj), attr))
            if entry is not None and entry[1] is obj:
                entry[0] += 1
                return
            cls.table[(id(obj), attr)] = [1, obj, vars(obj).get(attr, cls.ABSENT)]
            setattr(obj, attr, value)

    @classmethod
    def release(cls, obj, attr: str) -> None:
        with cls.lock:
            entry = cls.table[(id(obj), attr)]
            entry[0] -= 1
            if entry[0]:
                return
            del cls.table[(id(obj), attr)]
            if entry[2] is cls.ABSENT:
                vars(obj).pop(attr, None)
            else:
                setattr(obj, attr, entry[2])

    @classmethod
    def previous(cls, obj, attr: str):
        entry = cls.table.get((id(obj), attr))
        return cls.ABSENT if entry is None or entry[1] is not obj else entry[2]


@torch.compiler.disable
def _head_forward(linear, input, *args, **kwargs):
    """The head Linear's forward while fused calls run: the fused loss in a call of this
    context that expects it, the Linear's own forward otherwise."""
    call = _CALL.get()
    if call is not None and call.linear is linear:
        return call.head(linear, input)
    previous = _Patches.previous(linear, "forward")
    if previous is _Patches.ABSENT or getattr(previous, "__func__", None) is _head_forward:
        return type(linear).forward(linear, input, *args, **kwargs)
    return previous(input, *args, **kwargs)


@torch.compiler.disable
def _loss_function(model, logits, labels, vocab_size=None, num_items_in_batch=None,
                   ignore_index=-100, shift_labels=None, **kwargs):  # fmt: skip
    """The model's loss_function while fused calls run (transformers' ForCausalLMLoss
    signature): the handshake and the head's loss in a fused call of this context, transformers'
    own loss otherwise."""
    call = _CALL.get()
    if call is not None and call.owner is model:
        return call.loss(logits, labels, vocab_size, num_items_in_batch, ignore_index,
                         shift_labels)  # fmt: skip
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(
        logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index, shift_labels=shift_labels, **kwargs,
    )  # fmt: skip


LOSS_FUNCTION = _loss_function
_head_forward._gpufit_dispatcher = True  # a bound method reads its function's attributes


@torch.compiler.disable
def _unwrapped_forward(wrapper, *args, **kwargs):
    """An activation-checkpoint wrapper's forward around the head while fused calls run: in a
    fused call, the wrapped module's own call (the fused loss keeps no logits, so there is
    nothing to recompute, and a recomputation in backward would run outside the fused call);
    its own forward otherwise."""
    call = _CALL.get()
    if call is not None and any(w is wrapper for w in call.unwrapped):
        return wrapper._checkpoint_wrapped_module(*args, **kwargs)
    previous = _Patches.previous(wrapper, "forward")
    if previous is _Patches.ABSENT or getattr(previous, "__func__", None) is _unwrapped_forward:
        return type(wrapper).forward(wrapper, *args, **kwargs)
    return previous(*args, **kwargs)


_unwrapped_forward._gpufit_dispatcher = True


class _LayoutHook:
    """A tensor-parallel style's output hook on the head (DTensor's ``distribute_module``
    registers it: it converts the logits' layout) while fused calls run: in a fused call the
    head returns the loss, the same on every rank, which it hands on unchanged; the hook's own
    conversion otherwise."""

    _gpufit_dispatcher = True

    def __init__(self, linear: nn.Linear, hook):
        self.linear, self.hook = linear, hook

    def __call__(self, module, *args, **kwargs):
        call = _CALL.get()
        if call is not None and call.linear is self.linear:
            return None
        return self.hook(module, *args, **kwargs)

    @staticmethod
    def converts_layout(hook) -> bool:
        return isinstance(hook, _LayoutHook) or hook_owner(hook) == "torch.distributed.tensor._api"


def _output_hooks(linear: nn.Linear) -> OrderedDict | None:
    """The head's forward hooks with each layout hook behind a _LayoutHook, or None if it has
    none (no tensor-parallel style on it)."""
    hooks = linear._forward_hooks
    if not any(_LayoutHook.converts_layout(h) for h in hooks.values()):
        return None
    return OrderedDict(
        (key, _LayoutHook(linear, h) if _LayoutHook.converts_layout(h) and not isinstance(
            h, _LayoutHook) else h)
        for key, h in hooks.items()
    )  # fmt: skip


def _patches(call: _Call, head_only: bool) -> list[tuple[object, str, object]]:
    """(object, attribute, dispatcher) for each attribute a fused call needs set."""
    patches = [(w, "forward", types.MethodType(_unwrapped_forward, w)) for w in call.unwrapped]
    patches.append((call.linear, "forward", types.MethodType(_head_forward, call.linear)))
    hooks = _output_hooks(call.linear)
    if hooks is not None:
        patches.append((call.linear, "_forward_hooks", hooks))
    if not head_only:
        model = call.owner
        patches.append((model, "_loss_function", types.MethodType(_loss_function, model)))
    return patches


def enter(call: _Call, head_only: bool = False) -> contextvars.Token:
    """Install the dispatchers (if this is the first call that needs them) and make ``call``
    this context's; returns the token ``leave`` needs."""
    done = []
    call.patches = _patches(call, head_only)
    try:
        for obj, attr, value in call.patches:
            _Patches.acquire(obj, attr, value)
            done.append((obj, attr))
    except BaseException:
        for obj, attr in reversed(done):
            _Patches.release(obj, attr)
        raise
    return _CALL.set(call)


def leave(call: _Call, token: contextvars.Token) -> None:
    _CALL.reset(token)
    for obj, attr, _value in reversed(call.patches):
        _Patches.release(obj, attr)


def new_call(owner, head, linear, labels, shift_labels, num_items, ignore_index, chunk_size,
             fold_now):  # fmt: skip
    call = _Call(owner, linear, labels, shift_labels, num_items, ignore_index, chunk_size,
                 fold_now)  # fmt: skip
    call.unwrapped = [m for m in head_chain(head, linear) if is_checkpoint_wrapper(m)]
    return call

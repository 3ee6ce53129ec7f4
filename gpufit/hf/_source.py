"""What a model's ``forward`` does between its head and its loss, read from its source.

``read_forward(function)`` parses the forward that will run (through ``inspect.unwrap`` and
``inspect.getsource``) and returns a ``HeadSpec``: the attribute of the head it calls, and the
transforms it applies to the head's output before ``self.loss_function``, each with the place
its value is read from (taken from the code, never guessed from config names). Anything outside
the grammar below is a ``Refusal`` saying what stands in the way; nothing here imports
transformers or runs the forward.

The grammar, over the forward's top-level statements:

- exactly one call of the head, ``L = self.<head>(...)``, optionally followed in the same
  expression by the transforms below (``self.lm_head(h).float()``, ``self.lm_head(h) * P``);
- then statements that do not touch ``L``, and statements ``L = <transforms of L>`` made of
  ``L * P``, ``P * L``, ``L / P``, ``torch.tanh(L)`` (``nn.functional.tanh``), ``L.float()`` and
  ``L.contiguous()``, where ``P`` is a number or a value read from the model: ``self.a.b``,
  ``self.config.get_text_config().c``, ``getattr(<that>, "name", None)``, or a local name bound
  once to one of those; such statements may sit in ``if P is not None:`` (the transform applies
  only while the value is set); ``L / c``, ``tanh``, ``L * c`` with the same ``c`` is a softcap;
- exactly one ``self.loss_function(L, labels, vocab_size, **kwargs)`` (positional or keyword;
  further keywords only those ``ForCausalLMLoss`` ignores), with ``labels`` and ``kwargs`` the
  forward's own parameters, never reassigned or mutated;
- after the loss, ``L`` only as ``logits=L`` in a call or an element of a tuple (the output).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass

# names of the loss call's arguments that transformers' ForCausalLMLoss reads
_LOSS_ARGS = ("logits", "labels", "vocab_size")
_LOSS_READS = ("num_items_in_batch", "ignore_index", "shift_labels")
# methods that may appear in a value's path: side-effect-free readers of a config
_PATH_METHODS = ("get_text_config",)
_CASTS = ("float", "contiguous")
# the head's own attributes a forward may read without computing logits a second way
_HEAD_READS = ("dtype", "device", "out_features", "in_features")


class Refusal(Exception):
    """Why a forward is not one gpufit reproduces (the message is the reason)."""


# A value's path from the model: ("attr", name), ("call", method) or ("getattr", name) (that
# is getattr(obj, name, None)); a number is ("const", value).
Path = tuple


@dataclass(frozen=True)
class Step:
    """One transform of the head's output: kind "mul", "div", "softcap" or "cast" (the cast's
    method in ``name``); ``value`` the path of its operand; ``guard`` a path whose value must be
    set (not None) for the step to apply, or None."""

    kind: str
    value: Path | None = None
    guard: Path | None = None
    name: str = ""

    def describe(self) -> str:
        if self.kind == "cast":
            return f".{self.name}()"
        where = describe_path(self.value)
        text = {"mul": f"* {where}", "div": f"/ {where}", "softcap": f"softcap {where}"}[self.kind]
        return text + (" (if set)" if self.guard else "")


@dataclass(frozen=True)
class HeadSpec:
    """What a forward does from its head to its loss: the head's attribute and the steps."""

    head: str
    steps: tuple[Step, ...]

    def describe(self) -> str:
        transforms = [s.describe() for s in self.steps if s.kind != "cast"]
        return ", ".join(transforms) if transforms else "standard"


def describe_path(path: Path) -> str:
    if path[0] == "const":
        return repr(path[1])
    text = "self"
    for kind, name in path:
        if kind == "attr":
            text += f".{name}"
        elif kind == "call":
            text += f".{name}()"
        else:
            text = f"getattr({text}, {name!r}, None)"
    return text


def forward_source(function) -> ast.FunctionDef:
    """The parsed source of ``function`` (decorators unwrapped), or a Refusal."""
    function = inspect.unwrap(function)
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError) as err:
        raise Refusal(f"the source of its forward is not available ({err})") from None
    node = ast.parse(source).body[0]
    if not isinstance(node, ast.FunctionDef):
        raise Refusal("its forward is not a plain function")
    return node


@functools.cache
def read_forward(function) -> HeadSpec:
    """The HeadSpec of ``function`` (a model class's forward), or a Refusal naming the reason."""
    return _Reader(forward_source(function)).spec()


class _Reader:
    def __init__(self, node: ast.FunctionDef):
        self.node = node
        args = node.args
        positional = [a.arg for a in args.posonlyargs + args.args]
        if not positional:
            raise Refusal("its forward takes no self")
        self.self = positional[0]
        if "labels" not in positional + [a.arg for a in args.kwonlyargs]:
            raise Refusal("its forward takes no labels")
        self.kwargs = args.kwarg.arg if args.kwarg else None
        self.parameters = {*positional, *(a.arg for a in args.kwonlyargs), self.kwargs}
        self.aliases: dict[str, Path] = {}
        self._collect_aliases()

    # ------------------------------------------------------------ the whole function

    def spec(self) -> HeadSpec:
        body = self.node.body
        loss_at, loss_call = self._loss_call(body)
        logits = self._logits_name(loss_call)
        self._check_loss_arguments(loss_call, logits)
        self._check_unchanged("labels")
        if self.kwargs:
            self._check_unchanged(self.kwargs)
        self._no_nested_use(logits)
        head_at, head, steps = self._head_statement(body, logits, loss_at)
        self._check_head_references(head)
        steps = list(steps)
        for statement in body[head_at + 1 : loss_at]:
            steps += self._between(statement, logits)
        steps += self._loss_statement(body[loss_at], logits, loss_call)
        for statement in body[loss_at + 1 :]:
            self._after(statement, logits)
        return HeadSpec(head, _group_softcaps(steps))

    def _loss_call(self, body) -> tuple[int, ast.Call]:
        uses = [
            (i, node)
            for i, statement in enumerate(body)
            for node in ast.walk(statement)
            if isinstance(node, ast.Attribute) and self._is_self_attr(node, "loss_function")
        ]
        if not uses:
            raise Refusal("it computes its loss itself (its forward never calls "
                          "self.loss_function)")  # fmt: skip
        calls = [
            (i, node)
            for i, statement in enumerate(body)
            for node in ast.walk(statement)
            if isinstance(node, ast.Call) and any(node.func is use for _, use in uses)
        ]
        if len(uses) != 1 or len(calls) != 1:
            raise Refusal("its forward uses self.loss_function more than once")
        return calls[0]

    def _is_self_attr(self, node, attr=None) -> bool:
        """node is ``self.<attr>`` itself, or its call."""
        if isinstance(node, ast.Call):
            node = node.func
        return (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == self.self
            and (attr is None or node.attr == attr)
        )

    def _logits_name(self, call: ast.Call) -> str:
        logits = _argument(call, 0, "logits")
        if not isinstance(logits, ast.Name):
            raise Refusal(f"its loss is computed from `{_text(logits)}`, not from a name bound "
                          "to its head's output")  # fmt: skip
        return logits.id

    def _check_loss_arguments(self, call: ast.Call, logits: str) -> None:
        if len(call.args) > len(_LOSS_ARGS) or any(isinstance(a, ast.Starred) for a in call.args):
            raise Refusal(f"self.loss_function is called as `{_text(call)}`")
        labels = _argument(call, 1, "labels")
        if not (isinstance(labels, ast.Name) and labels.id == "labels"):
            raise Refusal(f"its loss gets labels `{_text(labels)}`, not the forward's labels")
        vocab = _argument(call, 2, "vocab_size")
        if vocab is None or _mentions(vocab, logits):
            raise Refusal(f"self.loss_function gets vocab_size `{_text(vocab)}`")
        for keyword in call.keywords:
            if keyword.arg is None:
                if not (isinstance(keyword.value, ast.Name) and keyword.value.id == self.kwargs):
                    raise Refusal(f"self.loss_function gets `**{_text(keyword.value)}`, not the "
                                  "forward's own **kwargs")  # fmt: skip
            elif keyword.arg in _LOSS_READS:
                raise Refusal(f"self.loss_function is called with its own {keyword.arg}=")
            elif keyword.arg not in _LOSS_ARGS and _mentions(keyword.value, logits):
                raise Refusal(f"self.loss_function gets {keyword.arg}= from the logits")

    def _check_unchanged(self, name: str) -> None:
        for node in ast.walk(self.node):
            targets = ()
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign | ast.NamedExpr | ast.For):
                targets = (node.target,)
            elif isinstance(node, ast.Delete):
                targets = node.targets
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                targets = (node.optional_vars,)
            mutating_call = (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == name
                and node.func.attr in ("pop", "update", "setdefault", "clear", "popitem")
            )
            for target in targets:
                for part in ast.walk(target):
                    if isinstance(part, ast.Name) and part.id == name:
                        raise Refusal(f"its forward changes {name} (`{_text(node)}`)")
            if mutating_call:
                raise Refusal(f"its forward changes {name} (`{_text(node)}`)")

    def _no_nested_use(self, logits: str) -> None:
        for node in ast.walk(self.node):
            inner = isinstance(node, ast.Lambda | ast.FunctionDef | ast.comprehension)
            if inner and node is not self.node and _mentions(node, logits):
                raise Refusal(f"its forward uses {logits} inside `{_text(node)}`")

    # ------------------------------------------------------------ the head

    def _head_statement(self, body, logits, loss_at) -> tuple[int, str, list[Step]]:
        at = next((i for i, s in enumerate(body[:loss_at]) if _assigns(s, logits)), None)
        if at is None:
            raise Refusal(f"{logits} is not assigned at the top level of its forward before "
                          "the loss")  # fmt: skip
        statement = body[at]
        if not (isinstance(statement, ast.Assign) and _is_name(statement.targets, logits)):
            raise Refusal(f"its logits come from `{_text(statement)}`, not from a call of its head")
        if not any(isinstance(n, ast.Call) and self._is_self_attr(n.func)
                   for n in ast.walk(statement.value)):  # fmt: skip
            raise Refusal(f"its logits are `{_text(statement.value)}`, not the output of a head "
                          "it calls (the loss is computed on a sub-model's logits)")  # fmt: skip
        head, steps = self._transforms(statement.value, logits, first=True)
        if head is None:
            raise Refusal(f"its logits come from `{_text(statement.value)}`, not from a call of "
                          "its head")  # fmt: skip
        nested = [n for n in ast.walk(self.node) if self._is_self_attr(n, head)
                  and isinstance(n, ast.Call)]  # fmt: skip
        if len(nested) != 1:
            raise Refusal(f"its forward calls self.{head} {len(nested)} times")
        return at, head, steps

    def _check_head_references(self, head: str) -> None:
        """The head is called once and otherwise only read for its dtype, device or sizes: its
        weight read directly would be a second way to logits, outside the head's call."""
        parents = {c: p for p in ast.walk(self.node) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(self.node):
            if not self._is_self_attr(node, head) or isinstance(node, ast.Call):
                continue
            parent = parents.get(node)
            if isinstance(parent, ast.Call) and parent.func is node:
                continue
            chain = [node]
            while isinstance(parents.get(chain[-1]), ast.Attribute):
                chain.append(parents[chain[-1]])
            called = isinstance(parents.get(chain[-1]), ast.Call) and (
                parents[chain[-1]].func is chain[-1]
            )
            if chain[-1].attr in _HEAD_READS and not called:
                continue
            raise Refusal(f"its forward reads `{_text(chain[-1])}` besides calling its head")

    def _transforms(self, expr, logits, first=False) -> tuple[str | None, list[Step]]:
        """(the head called in expr (first statement only), the steps expr applies to it)."""
        if first and isinstance(expr, ast.Call) and self._is_self_attr(expr.func):
            if any(_mentions(a, logits) for a in ast.walk(expr) if a is not expr):
                raise Refusal(f"its head is called on its own logits (`{_text(expr)}`)")
            return expr.func.attr, []
        if not first and isinstance(expr, ast.Name) and expr.id == logits:
            return None, []
        if isinstance(expr, ast.Call) and not expr.args and not expr.keywords:
            func = expr.func
            if isinstance(func, ast.Attribute) and func.attr in _CASTS:
                head, steps = self._transforms(func.value, logits, first)
                return head, steps + [Step("cast", name=func.attr)]
        if isinstance(expr, ast.Call) and _is_tanh(expr.func) and len(expr.args) == 1:
            if not expr.keywords:
                head, steps = self._transforms(expr.args[0], logits, first)
                return head, steps + [Step("tanh")]
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Mult | ast.Div):
            kind = "mul" if isinstance(expr.op, ast.Mult) else "div"
            left, right = expr.left, expr.right
            if kind == "mul" and not self._holds_logits(left, logits, first):
                left, right = right, left
            if self._holds_logits(left, logits, first) and not _mentions(right, logits):
                head, steps = self._transforms(left, logits, first)
                return head, steps + [Step(kind, value=self._value(right))]
        raise Refusal(f"`{_text(expr)}` is not a transform of the logits gpufit reproduces")

    def _holds_logits(self, expr, logits, first) -> bool:
        if first:
            return any(isinstance(n, ast.Call) and self._is_self_attr(n.func)
                       for n in ast.walk(expr))  # fmt: skip
        return _mentions(expr, logits)

    # ------------------------------------------------------------ values read from the model

    def _collect_aliases(self) -> None:
        """Local names bound exactly once, to a value read from the model (``cap =
        self.config.x``, ``text_config = self.config.get_text_config()``, a walrus)."""
        bound: dict[str, list] = {}
        for node in ast.walk(self.node):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    for part in ast.walk(target):
                        if isinstance(part, ast.Name):
                            bound.setdefault(part.id, []).append(node.value)
            elif isinstance(node, ast.NamedExpr | ast.AugAssign | ast.AnnAssign | ast.For):
                for part in ast.walk(node.target):
                    if isinstance(part, ast.Name):
                        bound.setdefault(part.id, []).append(getattr(node, "value", None))
        for name, values in bound.items():
            if len(values) == 1 and values[0] is not None and name not in self.parameters:
                try:
                    self.aliases[name] = self._value(values[0])
                except Refusal:
                    pass

    def _value(self, expr) -> Path:
        """Where an operand is read from: ('const', number) or a path from self."""
        if isinstance(expr, ast.Constant) and type(expr.value) in (int, float):
            return ("const", float(expr.value))
        if isinstance(expr, ast.Name):
            if expr.id in self.aliases:
                return self.aliases[expr.id]
            raise Refusal(f"the operand `{expr.id}` is not read from the model")
        if isinstance(expr, ast.Attribute):
            if isinstance(expr.value, ast.Name) and expr.value.id == self.self:
                return (("attr", expr.attr),)
            return self._value(expr.value) + (("attr", expr.attr),)
        if isinstance(expr, ast.Call) and not expr.args and not expr.keywords:
            func = expr.func
            if isinstance(func, ast.Attribute) and func.attr in _PATH_METHODS:
                return self._value(func.value) + (("call", func.attr),)
        getattr_call = (
            isinstance(expr, ast.Call)
            and isinstance(expr.func, ast.Name)
            and expr.func.id == "getattr"
            and len(expr.args) == 3
            and isinstance(expr.args[1], ast.Constant)
            and isinstance(expr.args[1].value, str)
            and isinstance(expr.args[2], ast.Constant)
            and expr.args[2].value is None
        )
        if getattr_call:
            return self._value(expr.args[0]) + (("getattr", expr.args[1].value),)
        raise Refusal(f"the operand `{_text(expr)}` is not read from the model")

    # ------------------------------------------------------------ statements

    def _between(self, statement, logits) -> list[Step]:
        """The steps of one statement between the head and the loss (none if it leaves the
        logits alone)."""
        if isinstance(statement, ast.If):
            return self._guarded(statement, logits)
        if not _mentions(statement, logits):
            return []
        if isinstance(statement, ast.Assign) and _is_name(statement.targets, logits):
            return self._transforms(statement.value, logits)[1]
        raise Refusal(f"its logits pass through `{_text(statement)}`, which gpufit does not "
                      "reproduce")  # fmt: skip

    def _guarded(self, statement: ast.If, logits) -> list[Step]:
        if not _mentions(statement, logits):
            return []
        guard = self._guard(statement.test)
        if guard is None or statement.orelse or _mentions(statement.test, logits):
            raise Refusal(f"its logits are transformed under `if {_text(statement.test)}:`, "
                          "which gpufit does not reproduce")  # fmt: skip
        steps = []
        for inner in statement.body:
            if isinstance(inner, ast.If):
                raise Refusal(f"its logits are transformed under nested conditions "
                              f"(`{_text(inner.test)}`)")  # fmt: skip
            steps += self._between(inner, logits)
        for step in steps:
            if step.value is not None and step.value != guard:
                raise Refusal(f"`{describe_path(step.value)}` is applied under a condition on "
                              f"`{describe_path(guard)}`")  # fmt: skip
        return [Step(s.kind, s.value, guard, s.name) for s in steps]

    def _guard(self, test) -> Path | None:
        """The path of ``if <path> is not None`` (or its walrus form), else None."""
        plain = (
            isinstance(test, ast.Compare)
            and len(test.ops) == 1
            and isinstance(test.ops[0], ast.IsNot)
            and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value is None
        )
        if not plain:
            return None
        subject = test.left
        if isinstance(subject, ast.NamedExpr):
            subject = subject.value
        try:
            path = self._value(subject)
        except Refusal:
            return None
        return None if path[0] == "const" else path

    def _loss_statement(self, statement, logits, call) -> list[Step]:
        """The statement holding the loss call: ``loss = self.loss_function(...)``, at the top
        level or under ``if labels is not None:`` (nothing else there touches the logits)."""
        if isinstance(statement, ast.If):
            labels_guard = (
                isinstance(statement.test, ast.Compare)
                and isinstance(statement.test.left, ast.Name)
                and statement.test.left.id == "labels"
                and isinstance(statement.test.ops[0], ast.IsNot)
            )
            if not labels_guard or statement.orelse:
                raise Refusal(f"its loss is computed under `if {_text(statement.test)}:`")
            before = True
            for inner in statement.body:
                if any(node is call for node in ast.walk(inner)):
                    self._loss_assignment(inner, call)
                    before = False
                elif before and _mentions(inner, logits):
                    raise Refusal(f"its logits pass through `{_text(inner)}` before the loss")
                elif not before:
                    self._after(inner, logits)
            return []
        self._loss_assignment(statement, call)
        return []

    def _loss_assignment(self, statement, call) -> None:
        if not (isinstance(statement, ast.Assign) and statement.value is call):
            raise Refusal(f"its loss is `{_text(statement)}`, not self.loss_function's result")

    def _after(self, statement, logits) -> None:
        """After the loss, the logits only go into the output."""
        parents = {c: p for p in ast.walk(statement) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(statement):
            if not (isinstance(node, ast.Name) and node.id == logits):
                continue
            parent = parents.get(node)
            if isinstance(parent, ast.keyword) and parent.arg == "logits":
                continue
            if isinstance(parent, ast.Tuple) and isinstance(node.ctx, ast.Load):
                continue
            raise Refusal(f"its logits are used after the loss (`{_text(statement)}`)")


def _group_softcaps(steps: list[Step]) -> tuple[Step, ...]:
    """``/ c``, tanh, ``* c`` (same c, same guard) become one softcap step; then refuses a
    tanh on its own, a second softcap and a scale after the softcap."""
    out: list[Step] = []
    i = 0
    while i < len(steps):
        window = steps[i : i + 3]
        is_cap = (
            len(window) == 3
            and [s.kind for s in window] == ["div", "tanh", "mul"]
            and window[0].value == window[2].value
            and window[0].value[0] != "const"
            and window[0].guard == window[2].guard
        )
        if is_cap:
            out.append(Step("softcap", window[0].value, window[0].guard))
            i += 3
            continue
        if steps[i].kind == "tanh":
            raise Refusal("its logits go through a tanh that is not a softcap (c * tanh(z / c))")
        out.append(steps[i])
        i += 1
    kinds = [s.kind for s in out]
    if kinds.count("softcap") > 1:
        raise Refusal("its logits are softcapped twice")
    if "softcap" in kinds and any(k in ("mul", "div") for k in kinds[kinds.index("softcap") :]):
        raise Refusal("its logits are scaled after the softcap")
    return tuple(out)


def _argument(call: ast.Call, position: int, name: str):
    if len(call.args) > position:
        return call.args[position]
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _assigns(statement, name: str) -> bool:
    for node in ast.walk(statement):
        if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Store):
            return True
    return False


def _is_name(targets, name: str) -> bool:
    return len(targets) == 1 and isinstance(targets[0], ast.Name) and targets[0].id == name


def _mentions(node, name: str) -> bool:
    return node is not None and any(
        isinstance(n, ast.Name) and n.id == name for n in ast.walk(node)
    )


def _is_tanh(func) -> bool:
    """torch.tanh, nn.functional.tanh, torch.nn.functional.tanh, F.tanh."""
    if not (isinstance(func, ast.Attribute) and func.attr == "tanh"):
        return False
    text = _text(func.value)
    return text in ("torch", "nn.functional", "torch.nn.functional", "F")


def _text(node) -> str:
    if node is None:
        return "nothing"
    text = ast.unparse(node).replace("\n", " ")
    return text if len(text) <= 100 else text[:97] + "..."

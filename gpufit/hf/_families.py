"""Which classes of the installed transformers ``gpufit.fuse`` takes, and why not the others.

``verdicts()`` goes over every causal-LM and image-text-to-text class transformers exports
(its two auto mappings, and every exported ``*ForCausalLM`` / ``*LMHeadModel``); for each it
reads the forward (_source.py), builds the class on the meta device (no memory: a default
config, one layer where that builds) and runs the same checks ``fuse`` runs (_models.py).
``table(verdicts)`` is the markdown ``python -m gpufit.hf families`` prints and the README
shows. tests/test_hf_families.py probes every admitted class numerically.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from gpufit.hf._models import UnsupportedModelError, admit
from gpufit.hf._source import HeadSpec, Refusal, read_forward

_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers",
                 "encoder_layers")  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """name: the class; fused: True, False (refused) or None (it cannot be built here);
    detail: its transforms if fused, else the reason."""

    name: str
    fused: bool | None
    detail: str
    spec: HeadSpec | None = None


def class_names() -> list[str]:
    import transformers
    from transformers.models.auto import modeling_auto

    names = set()
    for mapping in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                    modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):  # fmt: skip
        for value in mapping.values():
            names.update(value if isinstance(value, list | tuple) else [value])
    names.update(
        n
        for n in dir(transformers)
        if n.endswith(("ForCausalLM", "LMHeadModel")) and not n.startswith("Auto")
    )
    return sorted(names)


def _shrink(config, layers: bool, vocab: int | None) -> None:
    """One layer (if ``layers``) and ``vocab`` tokens (if given) in the config and its
    sub-configs."""
    import transformers

    subs = [config] + [
        v for v in vars(config).values() if isinstance(v, transformers.PretrainedConfig)
    ]
    sizes = {attr: 1 for attr in _LAYER_COUNTS} if layers else {}
    if vocab is not None:
        sizes["vocab_size"] = vocab
    for sub in subs:
        for attr, size in sizes.items():
            value = getattr(sub, attr, None)
            if type(value) is int and value > size:
                try:
                    setattr(sub, attr, size)
                except Exception:  # a read-only or validated attribute: leave it
                    pass


def shell(cls: type, vocab: int | None = None) -> nn.Module:
    """An instance of ``cls`` on the meta device, from its default config (one layer, and
    ``vocab`` tokens if given, where that builds); raises what building raised."""
    import transformers

    errors = []
    for layers, tokens in ((True, vocab), (False, vocab), (False, None)):
        config = cls.config_class()
        _shrink(config, layers, tokens)
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                transformers.logging.set_verbosity_error()
                return cls(config)
        except Exception as error:  # any failure of a class's own construction
            errors.append(error)
    raise errors[-1]


def verdict(name: str) -> Verdict:
    import transformers

    try:
        cls = getattr(transformers, name)
        spec = read_forward(cls.forward)
    except Refusal as why:
        return Verdict(name, False, str(why))
    except Exception as error:  # a class that cannot be imported here (a missing package)
        return Verdict(name, None, f"cannot be imported here ({type(error).__name__})")
    try:
        model = shell(cls)
    except Exception as error:
        return Verdict(name, None, f"cannot be built here ({type(error).__name__}: "
                       f"{str(error).splitlines()[0][:80]})", spec)  # fmt: skip
    from gpufit.hf import _fused

    try:
        admit(model, _fused.LOSS_FUNCTION, meta_ok=True)
    except UnsupportedModelError as error:
        return Verdict(name, False, error.reason, spec)
    return Verdict(name, True, spec.describe(), spec)


def verdicts() -> list[Verdict]:
    return [verdict(name) for name in class_names()]


def table(results: list[Verdict]) -> str:
    """Markdown: one row per verdict and detail, with the classes that share it."""
    groups: dict[tuple, list[str]] = {}
    for v in results:
        groups.setdefault((v.fused, v.detail), []).append(v.name)
    order = {True: 0, False: 1, None: 2}
    lines = ["| fused | transforms folded / reason refused | classes |", "| --- | --- | --- |"]
    for (fused, detail), names in sorted(
        groups.items(), key=lambda kv: (order[kv[0][0]], -len(kv[1]), kv[0][1])
    ):
        mark = {True: "yes", False: "no", None: "not here"}[fused]
        cell = detail.replace("|", "\\|")
        lines.append(f"| {mark} | {cell} | {len(names)}: {', '.join(names)} |")
    return "\n".join(lines)


def counts(results: list[Verdict]) -> str:
    fused = sum(v.fused is True for v in results)
    refused = sum(v.fused is False for v in results)
    other = len(results) - fused - refused
    return (f"{len(results)} classes: {fused} fused, {refused} refused, {other} not buildable "
            "here")  # fmt: skip

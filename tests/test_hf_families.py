"""Every causal-LM and image-text-to-text class of the installed transformers, as gpufit.fuse
judges it: each one admitted is probed numerically, each one refused names its reason.

The probe runs the class's own forward on a meta-device shell of its default config with the
backbone it calls first replaced by a probe that returns fixed hidden states (hidden 16), and
its head by a real Linear (hidden 16 -> its vocabulary, with a bias); every transform the
forward applies is set to a value that bends the logits (a softcap of 0.5, a multiplier of 0.37,
a divisor of 2.5). The stock forward and the fused one then give the loss and the gradients of
the hidden states, the head's weight and its bias; they must agree within 1e-5 of the largest
entry (fp32), with and without num_items_in_batch. A test sabotages the folding of the
transforms and checks that the probe notices. Everything shares one pass over the classes
(importing every model module of transformers is most of this file's time).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip(
    "transformers", reason="needs gpufit[hf] (transformers): pip install -e '.[hf]'"
)

import gpufit  # noqa: E402
from gpufit.hf import _families, _fused, _source  # noqa: E402

HIDDEN = 16
VOCAB = 509  # a prime: no vocabulary block divides it
TEST_VALUES = {"softcap": 0.5, "mul": 0.37, "div": 2.5}
# the families people fine-tune most (issue 24's list): each must be fused here
POPULAR = [
    "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
    "Qwen3NextForCausalLM", "Qwen2ForCausalLM", "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration", "Gemma4ForConditionalGeneration", "Gemma4ForCausalLM",
    "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "Gemma3nForCausalLM",
    "GptOssForCausalLM", "LlamaForCausalLM", "Llama4ForCausalLM", "MistralForCausalLM",
    "Ministral3ForCausalLM", "Mistral3ForConditionalGeneration", "DeepseekV3ForCausalLM",
    "DeepseekV4ForCausalLM", "Glm4MoeForCausalLM", "GlmMoeDsaForCausalLM", "Phi3ForCausalLM",
    "SmolLM3ForCausalLM", "Olmo3ForCausalLM", "Lfm2ForCausalLM", "NemotronHForCausalLM",
    "GraniteForCausalLM", "GraniteMoeHybridForCausalLM", "FalconH1ForCausalLM",
    "CohereForCausalLM", "Cohere2ForCausalLM", "AyaVisionForConditionalGeneration",
]  # fmt: skip


@pytest.fixture(scope="module")
def verdicts():
    return {v.name: v for v in _families.verdicts()}


# ---------------------------------------------------------------- the probe


class _Output:
    """What a backbone returns, as far as a causal-LM forward reads it."""

    def __init__(self, hidden):
        self.last_hidden_state = hidden

    def __getattr__(self, name):
        return None

    def __getitem__(self, index):
        return (self.last_hidden_state,)[index]


class _Backbone(nn.Module):
    """Stands in for the module a forward calls first: returns the probe's hidden states; any
    other attribute is the original module's."""

    def __init__(self, original, hidden):
        super().__init__()
        object.__setattr__(self, "_original", original)
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return _Output(self.hidden)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


def _backbone_path(cls, head: str) -> list[str] | None:
    """The first module the forward calls (``self.model(...)``, ``self.model.decoder(...)``),
    not the head, as attribute names from the model."""
    node = _source.forward_source(cls.forward)
    self_name = node.args.args[0].arg
    for call in ast.walk(node):
        path, func = [], getattr(call, "func", None)
        while isinstance(func, ast.Attribute):
            path.insert(0, func.attr)
            func = func.value
        if (
            isinstance(call, ast.Call)
            and isinstance(func, ast.Name)
            and func.id == self_name
            and path
            and path[0] not in (head, "loss_function")
        ):
            return path
    return None


def _set(model, path, value) -> None:
    *parent_path, (_kind, name) = path
    parent = _fused.read_value(model, tuple(parent_path)) if parent_path else model
    setattr(parent, name, value)


def _no_router_loss(config) -> None:
    for sub in [config, *(v for v in vars(config).values() if hasattr(v, "to_dict"))]:
        if getattr(sub, "output_router_logits", None):
            sub.output_router_logits = False


class Probe:
    """One class on the meta device with a probe backbone and a real head; ``run`` gives the
    loss and gradients of its stock or fused forward."""

    def __init__(self, name, spec):
        cls = getattr(transformers, name)
        self.cls, self.spec = cls, spec
        model = _families.shell(cls, vocab=VOCAB)
        old_head = getattr(model, spec.head)
        self.vocab = old_head.out_features
        g = torch.Generator().manual_seed(0)
        head = nn.Linear(HIDDEN, self.vocab, bias=True)
        with torch.no_grad():
            head.weight.copy_(torch.randn(self.vocab, HIDDEN, generator=g) * 0.4)
            head.bias.copy_(torch.randn(self.vocab, generator=g) * 0.3)
        setattr(model, spec.head, head)
        self.hidden = torch.randn(2, 8, HIDDEN, generator=g)
        path = _backbone_path(cls, spec.head) or []
        parent = model
        for attr in path[:-1]:
            parent = getattr(parent, attr, None)
        original = getattr(parent, path[-1], None) if path else None
        if not isinstance(original, nn.Module) or not isinstance(parent, nn.Module):
            raise LookupError(f"no backbone module found in {name}'s forward")
        self.backbone = parent._modules[path[-1]] = _Backbone(original, self.hidden)
        _no_router_loss(model.config)
        for step in spec.steps:
            if step.kind != "cast":
                _set(model, step.value, TEST_VALUES[step.kind])
        self.model, self.head = model.train(), head
        self.ids = torch.randint(0, self.vocab, (2, 8), generator=g)
        self.labels = self.ids.clone()
        self.labels[0, :3] = -100
        params = _source.forward_source(cls.forward).args
        self.takes_kwargs = params.kwarg is not None

    def run(self, fused: bool, num_items=None):
        hidden = self.hidden.clone().requires_grad_()
        self.backbone.hidden = hidden
        kwargs = {"input_ids": self.ids, "labels": self.labels}
        if num_items is not None:
            kwargs["num_items_in_batch"] = torch.tensor(num_items)
        forward = self.model if fused else type(self.model).forward.__get__(self.model)
        loss = forward(**kwargs).loss
        grads = torch.autograd.grad(loss, [hidden, self.head.weight, self.head.bias])
        return loss.detach(), grads


def assert_rel_close(actual, expected, what, rel=1e-5):
    scale = expected.abs().max().clamp_min(1e-30)
    err = float((actual - expected).abs().max() / scale)
    assert err <= rel, f"{what}: max |diff| / max |expected| = {err:.3g} > {rel}"


def compare(probe: Probe) -> None:
    gpufit.fuse(probe.model)
    for num_items in (None, 11) if probe.takes_kwargs else (None,):
        loss0, grads0 = probe.run(False, num_items)
        loss1, grads1 = probe.run(True, num_items)
        tag = f"{probe.cls.__name__} (num_items={num_items})"
        assert_rel_close(loss1, loss0, f"{tag} loss")
        for what, g1, g0 in zip(("hidden", "weight", "bias"), grads1, grads0, strict=True):
            assert_rel_close(g1, g0, f"{tag} grad of {what}")


# admitted classes whose hidden states pass through another module before the head: the
# probe's fixed hidden states do not fit there (encoder-style models, rarely trained as LMs)
NOT_PROBED = {"ElectraForCausalLM", "ModernBertDecoderForCausalLM"}
# ---------------------------------------------------------------- the tests


def test_every_admitted_class_matches_stock(verdicts):
    failures, probed = [], 0
    for name, verdict in verdicts.items():
        if verdict.fused is not True or name in NOT_PROBED:
            continue
        try:
            compare(Probe(name, verdict.spec))
            probed += 1
        except Exception as error:  # collected: one report for all classes
            failures.append(f"{name}: {type(error).__name__}: {str(error)[:300]}")
    assert not failures, f"{len(failures)} of {probed + len(failures)} failed:\n" + "\n".join(
        failures
    )
    assert probed >= 150


def test_every_refused_class_names_its_reason(verdicts):
    refused = [v for v in verdicts.values() if v.fused is False]
    assert len(refused) >= 40
    for v in refused:
        assert v.detail and v.detail.strip() != "", v.name
    by_name = {
        "BambaForCausalLM": "used after the loss",
        "BartForCausalLM": "computes its loss itself",
        "Llama4ForConditionalGeneration": "sub-model's logits",
        "ChameleonForConditionalGeneration": "does not reproduce",
        "DoryForCausalLM": "not a plain torch.nn.Linear",
        "RobertaForCausalLM": "composite head",
        "InklingForCausalLM": "vocab_size `logits.shape[-1]`",
    }
    for name, reason in by_name.items():
        assert verdicts[name].fused is False and reason in verdicts[name].detail, verdicts[name]


def test_fuse_refuses_a_refused_class_with_its_reason(verdicts):
    model = _families.shell(transformers.BambaForCausalLM)
    with pytest.raises(gpufit.hf.UnsupportedModelError, match="BambaForCausalLM is not fused: "
                       "its logits are used after the loss"):  # fmt: skip
        gpufit.fuse(model)


def test_the_popular_families_are_fused(verdicts):
    # fused, or (AyaVision: its default config does not build) admitted by its source
    not_fused = [n for n in POPULAR if verdicts[n].fused is False or verdicts[n].spec is None]
    assert not not_fused, [verdicts[n] for n in not_fused]
    assert sum(verdicts[n].fused is True for n in POPULAR) >= len(POPULAR) - 1
    transforms = {
        "Gemma4ForConditionalGeneration": "softcap self.config.get_text_config()",
        "GraniteForCausalLM": "/ self.config.logits_scaling",
        "FalconH1ForCausalLM": "* self.model.lm_head_multiplier",
        "CohereForCausalLM": "* self.logit_scale",
        "AyaVisionForConditionalGeneration": "standard",  # its config's logit_scale is unused
        "MistralLarge4ForConditionalGeneration": "softcap self.final_logit_softcapping",
    }
    for name, detail in transforms.items():
        assert verdicts[name].spec.describe().startswith(detail), verdicts[name]


@pytest.mark.parametrize(
    "name", ["CohereForCausalLM", "GraniteForCausalLM", "Gemma3ForCausalLM",
             "MuseSparkForConditionalGeneration", "PaliGemmaForConditionalGeneration"],
)  # fmt: skip
def test_the_probe_fails_if_a_transform_were_dropped(verdicts, name, monkeypatch):
    # the folding made to ignore every scale and softcap: the forward still applies them (the
    # tensor subclass returns the loss unchanged for exactly those operations), so the fused
    # loss is the untransformed one, and the comparison with stock must fail
    real_fold = _fused.fold

    def dropped(spec, model):
        _scale, _softcap, operations = real_fold(spec, model)
        return 1.0, None, operations

    monkeypatch.setattr(_fused, "fold", dropped)
    with pytest.raises(AssertionError, match="loss"):
        compare(Probe(name, verdicts[name].spec))


def test_the_readme_table_is_the_generated_one(verdicts):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    generated = _families.table(list(verdicts.values()))
    assert generated in readme, "README's families table differs: python -m gpufit.hf families"
    assert re.search(re.escape(_families.counts(list(verdicts.values()))), readme)


def test_the_command_prints_the_table(verdicts, monkeypatch, capsys):
    from gpufit.hf import __main__ as command

    monkeypatch.setattr(_families, "verdicts", lambda: list(verdicts.values()))
    assert command.main(["families"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"transformers {transformers.__version__}: ")
    assert _families.table(list(verdicts.values())) in out
    with pytest.raises(SystemExit):
        command.main(["nothing"])

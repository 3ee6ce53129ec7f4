"""gpufit.fuse on transformers causal LMs (gpufit/hf/): for common families a tiny
random-init model gives the stock loss and gradients (fp32: within 1e-5 relative to the
largest entry of each gradient), with and without num_items_in_batch and shift_labels; eval,
generation and label-free calls are the stock ones; other models and heads the fused loss
cannot read are refused with a message saying why. No download: models come from configs.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="needs gpufit[hf] (transformers): pip install -e '.[hf]'"
)

import gpufit  # noqa: E402
from gpufit import hf  # noqa: E402

VOCAB = 128
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# family -> (config class, model class, config overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True},
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "output_router_logits": True,
        },
    ),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    # random-init logits are ~0.1: a cap of 0.05 bends them all (1.0 would barely touch them)
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 8, "final_logit_softcapping": 0.05, "sliding_window": 8},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    # admitted by what their forward does: a scale, a divisor, a softcap folded into the op
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 8, "final_logit_softcapping": 0.05, "sliding_window": 8},
    ),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {"head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "gpt2":  # tied head, its own config names
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config).train()
    config_name, model_name, overrides = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**_COMMON, **overrides})
    return getattr(transformers, model_name)(config).train()


ALL_FAMILIES = [*FAMILIES, "gpt2"]


def batch(seed: int = 1, size=(2, 12)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, size, generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[1, -2:] = -100
    return ids, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    grads = {
        n.removeprefix("module.").replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }  # a wrapper's parameter names as the model's own
    return loss.detach(), grads


def assert_rel_close(actual, expected, rel=1e-5, what=""):
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max() / scale
    assert err <= rel, f"{what}: max |diff| / max |expected| = {err:.3g} > {rel}"


def assert_same_training(stock, fused, inputs, rel=1e-5):
    loss0, grads0 = loss_and_grads(stock, **inputs)
    loss1, grads1 = loss_and_grads(fused, **inputs)
    assert_rel_close(loss1, loss0, rel, "loss")
    assert grads1.keys() == grads0.keys()
    for name, g0 in grads0.items():
        assert_rel_close(grads1[name], g0, rel, name)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("num_items", [None, 13])
def test_stock_loss_and_gradients(family, num_items):
    stock = tiny_model(family)
    fused = gpufit.fuse(copy.deepcopy(stock))
    ids, labels = batch()
    inputs = {"input_ids": ids, "labels": labels}
    if num_items is not None:  # Trainer's count over all micro-batches: not this batch's own
        inputs["num_items_in_batch"] = torch.tensor(num_items)
    assert_same_training(stock, fused, inputs)


def test_the_loss_is_computed_from_hidden_states_not_logits(monkeypatch):
    # the fused path must not call the head's matmul (that is the memory it saves)
    model = gpufit.fuse(tiny_model("llama"))
    calls = []
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda *a, **k: calls.append(a[1].shape) or _linear(*a, **k)
    )
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    assert (VOCAB, 32) not in calls
    assert torch.isfinite(out.loss)


_linear = torch.nn.functional.linear


def test_mixtral_keeps_its_router_aux_loss():
    stock = tiny_model("mixtral")
    fused = gpufit.fuse(copy.deepcopy(stock))
    ids, labels = batch()
    out0 = stock(input_ids=ids, labels=labels)
    out1 = fused(input_ids=ids, labels=labels)
    assert out0.aux_loss is not None and float(out0.aux_loss.detach()) > 0
    assert_rel_close(out1.aux_loss, out0.aux_loss, 1e-6, "aux_loss")
    assert_rel_close(out1.loss, out0.loss, 1e-5, "loss with aux")
    no_aux = stock(input_ids=ids, labels=labels, output_router_logits=False).loss
    assert (
        abs(float(out1.loss.detach() - no_aux.detach())) > 1e-4
    )  # the aux term is really in the fused loss


def test_gemma2_softcap_is_gemma2s_formula():
    stock = tiny_model("gemma2")
    cap = stock.config.final_logit_softcapping
    fused = gpufit.fuse(copy.deepcopy(stock))
    ids, labels = batch()
    with torch.no_grad():
        hidden = stock.model(input_ids=ids).last_hidden_state
        logits = stock.lm_head(hidden)
        capped = torch.tanh(logits / cap) * cap  # Gemma2ForCausalLM.forward's own lines
        shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        expected = torch.nn.functional.cross_entropy(capped.flatten(0, 1), shift.flatten())
        uncapped = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shift.flatten())
    loss = fused(input_ids=ids, labels=labels).loss
    assert_rel_close(loss.detach(), expected, 1e-6, "softcapped loss")
    assert abs(float(expected - uncapped)) > 1e-3  # the cap changes the loss here
    assert fused.config.final_logit_softcapping == cap  # restored after the call


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shift_labels_and_return_dict_false(family):
    stock = tiny_model(family)
    fused = gpufit.fuse(copy.deepcopy(stock))
    ids, labels = batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shift[1, 3] = -100  # differs from what labels would give
    inputs = {"input_ids": ids, "labels": labels, "shift_labels": shift}
    assert_same_training(stock, fused, inputs)
    loss0 = stock(**inputs, return_dict=False)[0]
    out1 = fused(**inputs, return_dict=False)
    assert_rel_close(out1[0], loss0, 1e-5, "tuple loss")
    assert all(t is None or t.shape[-1] != 32 for t in out1[1:] if torch.is_tensor(t))


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_tied_head_gets_one_gradient(family):
    stock = tiny_model(family)
    assert stock.lm_head.weight is stock.get_input_embeddings().weight
    fused = gpufit.fuse(copy.deepcopy(stock))
    assert fused.lm_head.weight is fused.get_input_embeddings().weight
    assert_same_training(stock, fused, dict(zip(("input_ids", "labels"), batch(), strict=True)))


def test_without_labels_eval_and_generate_are_stock():
    stock = tiny_model("qwen2")
    fused = gpufit.fuse(copy.deepcopy(stock))
    ids, labels = batch()
    torch.testing.assert_close(fused(input_ids=ids).logits, stock(input_ids=ids).logits)
    stock.eval(), fused.eval()
    out0, out1 = stock(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    torch.testing.assert_close(out1.logits, out0.logits)
    torch.testing.assert_close(out1.loss, out0.loss)
    prompt = ids[:, :4]
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(fused.generate(prompt, **kw), stock.generate(prompt, **kw))


def test_signature_is_stock_and_fuse_is_idempotent():
    stock = tiny_model("llama")
    model = gpufit.fuse(copy.deepcopy(stock))
    assert model.forward is not type(model).forward
    assert inspect.signature(model.forward) == inspect.signature(stock.forward)
    assert {"input_ids", "attention_mask", "labels"} <= set(
        inspect.signature(model.forward).parameters
    )
    wrapper = model.forward
    assert gpufit.fuse(model).forward is wrapper
    assert type(model).forward is type(stock).forward  # the class is untouched
    assert stock.forward.__func__ is type(stock).forward
    hf.unfuse(model)
    assert "forward" not in vars(model)


def test_labels_given_positionally():
    stock = tiny_model("llama")
    fused = gpufit.fuse(copy.deepcopy(stock))
    ids, labels = batch()
    args = (ids, None, None, None, None, labels)  # input_ids, ..., labels
    torch.testing.assert_close(fused(*args).loss, stock(*args).loss, rtol=1e-5, atol=0)
    assert fused(*args).logits is None


def test_causal_lm_loss_matches_transformers_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = tiny_model("llama")
    ids, labels = batch()
    hidden = model.model(input_ids=ids).last_hidden_state
    logits = model.lm_head(hidden)
    for kwargs in ({}, {"num_items_in_batch": 9}, {"num_items_in_batch": torch.tensor(11)}):
        expected = ForCausalLMLoss(logits, labels, VOCAB, **kwargs)
        got = hf.causal_lm_loss(hidden, model.lm_head, labels, **kwargs)
        assert_rel_close(got.detach(), expected.detach(), 1e-6, str(kwargs))
    with pytest.raises(ValueError, match="labels or shift_labels"):
        hf.causal_lm_loss(hidden, model.lm_head, None)


class _Shifted(transformers.LlamaForCausalLM):
    """A Llama whose forward adds an affine transform gpufit does not reproduce."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        logits = logits * 2 + 1
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _Doubled(transformers.LlamaForCausalLM):
    """The same with a scalar multiply, which gpufit folds into the op."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        logits = logits * 2
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def _as(cls, model):
    model.__class__ = cls
    return model


def test_an_unrecognised_transform_is_refused_naming_class_and_reason():
    model = _as(_Shifted, tiny_model("llama"))
    with pytest.raises(
        hf.UnsupportedModelError, match=r"_Shifted is not fused: .*logits \* 2 \+ 1"
    ):
        gpufit.fuse(model)
    assert "forward" not in vars(model)


def test_a_recognised_transform_is_folded_and_matches_stock():
    stock = _as(_Doubled, tiny_model("llama"))
    fused = gpufit.fuse(copy.deepcopy(stock))
    assert_same_training(stock, fused, dict(zip(("input_ids", "labels"), batch(), strict=True)))


def test_models_gpufit_does_not_reproduce_are_refused_with_the_reason():
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.BartForCausalLM(config)
    with pytest.raises(hf.UnsupportedModelError, match="BartForCausalLM is not fused: it computes "
                       "its loss itself"):  # fmt: skip
        gpufit.fuse(model)
    assert "forward" not in vars(model)


class _QuantizedLinear(torch.nn.Linear):
    pass


def test_heads_the_fused_loss_cannot_read_are_refused():
    model = tiny_model("llama")
    head = model.lm_head
    model.lm_head = _QuantizedLinear(32, VOCAB, bias=False)
    with pytest.raises(hf.UnsupportedModelError, match="not a plain torch.nn.Linear"):
        gpufit.fuse(model)
    model.lm_head = head
    head._hf_hook = object()  # accelerate's offload hook
    with pytest.raises(hf.UnsupportedModelError, match="offloaded"):
        gpufit.fuse(model)
    del head._hf_hook
    fused = gpufit.fuse(model)
    ids, labels = batch()
    model.lm_head = _QuantizedLinear(32, VOCAB, bias=False)  # replaced after fuse: per call
    with pytest.raises(hf.UnsupportedModelError, match="not a plain"):
        fused(input_ids=ids, labels=labels)
    assert "forward" not in vars(model.lm_head)  # nothing left half-changed
    assert "_loss_function" not in vars(model)


def test_gradient_checkpointing():
    stock = tiny_model("llama")
    fused = gpufit.fuse(copy.deepcopy(stock))
    for m in (stock, fused):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_training(stock, fused, dict(zip(("input_ids", "labels"), batch(), strict=True)))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: the softcap's tensor subclass
def test_torch_compile_of_the_fused_forward(family):
    # aot_eager: dynamo's trace and AOT autograd of the patched forward (fake kernels
    # included); inductor's code generation of the op is tested in test_linear_ce.py, and
    # compiling this model with it takes minutes on 2 cores
    stock = tiny_model(family)
    fused = gpufit.fuse(copy.deepcopy(stock))
    compiled = torch.compile(fused, backend="aot_eager")
    inputs = dict(zip(("input_ids", "labels"), batch(), strict=True))
    loss0, grads0 = loss_and_grads(stock, **inputs)
    fused.zero_grad()
    loss1 = compiled(**inputs).loss
    loss1.backward()
    assert_rel_close(loss1.detach(), loss0, 1e-5, "compiled loss")
    for name, p in fused.named_parameters():
        assert_rel_close(p.grad, grads0[name], 1e-4, name)
    assert "forward" not in vars(fused.lm_head)


# ---------------------------------------------------------------- the mechanism


def test_two_threads_each_get_what_they_asked_for():
    # one thread trains with labels (the fused loss runs in the head's call), the other calls
    # lm_head for logits meanwhile: the fused call is local to its context, never the head's
    import threading

    stock = tiny_model("llama")
    model = gpufit.fuse(copy.deepcopy(stock))
    ids, labels = batch()
    expected = stock(input_ids=ids, labels=labels).loss.detach()
    with torch.no_grad():
        hidden = stock.model(input_ids=ids).last_hidden_state
        logits = stock.lm_head(hidden)
    losses, shapes, errors = [], [], []
    done = threading.Event()

    def train():
        try:
            for _ in range(15):
                loss = model(input_ids=ids, labels=labels).loss
                loss.backward()
                losses.append(loss.detach())
        except BaseException as error:  # reported below
            errors.append(error)
        finally:
            done.set()

    def look():
        try:
            with torch.no_grad():
                while not done.is_set():
                    got = model.lm_head(hidden)
                    shapes.append(got.shape)
                    torch.testing.assert_close(got, logits)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=train), threading.Thread(target=look)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(losses) == 15 and len(shapes) > 15
    assert all(s == (*ids.shape, VOCAB) for s in shapes)
    for loss in losses:
        assert_rel_close(loss, expected, 1e-5, "loss")
    assert "forward" not in vars(model.lm_head) and "_loss_function" not in vars(model)


def test_the_heads_own_forward_is_left_as_it_was():
    model = gpufit.fuse(tiny_model("llama"))
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert "forward" not in vars(model.lm_head)  # the class's forward, untouched
    assert model.lm_head(torch.zeros(1, 32)).shape == (1, VOCAB)
    own = model.lm_head.forward  # a forward another library set on the instance: refused, kept
    model.lm_head.forward = lambda x: own(x)
    kept = vars(model.lm_head)["forward"]
    with pytest.raises(hf.UnsupportedModelError, match="its own instance-level forward"):
        model(input_ids=ids, labels=labels)
    assert vars(model.lm_head)["forward"] is kept


def test_a_hook_on_the_head_is_refused():
    model = gpufit.fuse(tiny_model("llama"))
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(hf.UnsupportedModelError, match="lm_head has a hook"):
        model(**dict(zip(("input_ids", "labels"), batch(), strict=True)))
    handle.remove()
    assert torch.isfinite(model(**dict(zip(("input_ids", "labels"), batch(), strict=True))).loss)


class _EngineModule:
    """Stands for FSDP2's FSDPModule: fully_shard makes FSDP<Name>(FSDPModule, <Name>)."""


def test_an_engine_made_subclass_is_fused():
    stock = tiny_model("llama")
    fused = copy.deepcopy(stock)
    fused.__class__ = type("FSDPLlamaForCausalLM", (_EngineModule, type(stock)), {})
    gpufit.fuse(fused)
    assert_same_training(stock, fused, dict(zip(("input_ids", "labels"), batch(), strict=True)))
    first_fuse_then_subclass = gpufit.fuse(copy.deepcopy(stock))
    first_fuse_then_subclass.__class__ = type(fused)
    assert_same_training(
        stock, first_fuse_then_subclass, dict(zip(("input_ids", "labels"), batch(), strict=True))
    )


class _Wrapper(torch.nn.Module):  # DDP, FSDP1 and DeepSpeed's engine hold the model as .module
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_a_wrapper_and_activation_checkpointing_of_the_whole_model():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    stock = tiny_model("llama")
    inputs = dict(zip(("input_ids", "labels"), batch(), strict=True))
    wrapped = _Wrapper(copy.deepcopy(stock))
    assert hf.is_transformers_model(wrapped)
    assert gpufit.fuse(wrapped) is wrapped
    assert_same_training(stock, wrapped, inputs)
    checkpointed = checkpoint_wrapper(copy.deepcopy(stock))  # recomputed in backward, in full
    gpufit.fuse(checkpointed)
    assert_same_training(stock, checkpointed, inputs)


def test_a_checkpointed_head_trains_through_its_wrapper():
    # a fused call bypasses the head's checkpoint wrapper (nothing to recompute); a call
    # outside one goes through it
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    stock = tiny_model("llama")
    inputs = dict(zip(("input_ids", "labels"), batch(), strict=True))
    model = copy.deepcopy(stock)
    model.lm_head = checkpoint_wrapper(model.lm_head)
    gpufit.fuse(model)
    assert_same_training(stock, model, inputs)
    assert "forward" not in vars(model.lm_head)  # the bypass is gone after the call
    hidden = torch.randn(2, 3, 32, requires_grad=True)
    torch.testing.assert_close(model.lm_head(hidden), stock.lm_head(hidden))


def test_the_handshake_refuses_a_transform_the_source_reading_missed(monkeypatch):
    # were the source reading to drop Gemma 2's cap, the forward would apply it to the fused
    # loss: the loss_function then gets a tensor other than the head's output, and refuses
    from gpufit.hf import _source

    model = gpufit.fuse(tiny_model("gemma2"))
    spec = _source.read_forward(type(model).forward)
    assert [s.kind for s in spec.steps] == ["softcap"]
    monkeypatch.setattr(_source, "read_forward", lambda function: _source.HeadSpec(spec.head, ()))
    monkeypatch.setattr("gpufit.hf._models.read_forward", _source.read_forward)
    with pytest.raises(hf.UnsupportedModelError, match="other than the one its head returned"):
        model(**dict(zip(("input_ids", "labels"), batch(), strict=True)))
    assert "forward" not in vars(model.lm_head) and "_loss_function" not in vars(model)

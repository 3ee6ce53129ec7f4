"""gpufit under TRL's trainers (gpufit.trl): each trainer runs a few steps on TRL's own fused
head and again after gpufit.trl.use_gpufit(), from the same seed, and must log the same losses
and metrics and end with the same parameters; gpufit's op must have served the head's calls.

Offline and small: a tiny random-init Llama with the 32,000-token vocabulary of the
SentencePiece model mistral-common ships, its pieces read into a tokenizers Unigram model.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import warnings

import pytest

pytest.importorskip("trl", reason="needs gpufit[trl] (trl)")
pytest.importorskip("mistral_common", reason="needs gpufit[lm] (mistral-common)")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
import trl.trainer.utils as trl_utils  # noqa: E402

import gpufit  # noqa: E402
import gpufit.trl  # noqa: E402
from gpufit import ops  # noqa: E402
from gpufit.examples.lm import shipped_tokenizer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning:trl")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A fused head never forms the logits of every token.",
    "Gradient accumulation sums the micro-batches' gradients.",
    "Packing puts several short documents into one sequence.",
    "Entropy measures how spread the next-token distribution is.",
    "Small models train fast on two cores.",
    "Every step logs its loss and its token accuracy.",
    "The reward function prefers short completions.",
]
# fp32 tolerance of a few steps' losses, metrics and parameters
ATOL = 2e-5


@functools.cache
def tokenizer_object():
    """The SentencePiece model's 32,000 pieces and scores as a tokenizers Unigram model."""
    import sentencepiece
    from tokenizers import Tokenizer, decoders, models, normalizers

    sp = sentencepiece.SentencePieceProcessor(model_file=str(shipped_tokenizer()))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])  # fmt: skip
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])  # fmt: skip
    return tok


def tokenizer():
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object(), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="</s>",
    )  # fmt: skip


def tiny_llama(**config) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        pad_token_id=2, bos_token_id=1, eos_token_id=2, **config,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def saved_tiny_llama(tmp_path) -> str:
    """A folder holding tiny_llama(): the trainers that build a reference model load it from
    the policy's path."""
    folder = tmp_path / "tiny-llama"
    if not folder.exists():
        tiny_llama().save_pretrained(folder)
    return str(folder)


def common_args(tmp_path, **kwargs) -> dict:
    """TrainingArguments for a 3-step CPU run in fp32: TRL's configs default to bf16, which on the
    CPU is autocast, where TRL's kernel rounds each tile of logits to bf16 and gpufit's does not
    (so they agree to bf16's tolerance only: test_kernel_autocast_bf16). Plain SGD, so that the
    parameters differ as the gradients do (Adam divides each gradient by its own running size,
    which turns rounding differences of gradients near zero into differences up to the lr)."""
    return {**dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                   optim="sgd", learning_rate=0.5, logging_steps=1, report_to="none",
                   save_strategy="no",
                   use_cpu=True, seed=0, dataloader_num_workers=0, bf16=False),
            **kwargs}  # fmt: skip


class Served:
    """Counts the fused-head calls gpufit's op served and those TRL's own kernel ran."""

    def __init__(self, monkeypatch):
        self.gpufit = self.trl = 0
        run_op = ops.run_fused_linear_cross_entropy
        trl_apply = trl_utils._ChunkedLogProbFunction.apply

        def op(*args, **kwargs):
            self.gpufit += 1
            return run_op(*args, **kwargs)

        def kernel(*args, **kwargs):
            self.trl += 1
            return trl_apply(*args, **kwargs)

        monkeypatch.setattr(ops, "run_fused_linear_cross_entropy", op)
        monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", kernel)


def train(make_trainer, *, on_gpufit: bool):
    """(log history, final parameters) of make_trainer().train(), on TRL's head or gpufit's."""
    trainer = make_trainer()
    with gpufit.trl.use_gpufit() if on_gpufit else contextlib.nullcontext():
        trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return trainer.state.log_history, params


def assert_same_training(
    make_trainer, monkeypatch, *, metrics: tuple[str, ...], nonzero: tuple[str, ...] = ()
):
    """The run on gpufit's op logs the same values as the run on TRL's kernel and ends with the
    same parameters; returns the largest differences. ``nonzero``: metrics that must be nonzero
    at some step (so that their comparison says something)."""
    served = Served(monkeypatch)
    trl_log, trl_params = train(make_trainer, on_gpufit=False)
    assert served.trl > 0 and served.gpufit == 0
    trl_calls = served.trl
    gpufit_log, gpufit_params = train(make_trainer, on_gpufit=True)
    assert served.gpufit > 0, "gpufit's op served no call"
    assert served.trl == trl_calls, "a call fell back to TRL's kernel"
    steps = [entry for entry in trl_log if "loss" in entry]
    assert len(steps) == 3
    diffs = {}
    for name in ("loss", *metrics):
        expected = [entry[name] for entry in trl_log if name in entry]
        got = [entry[name] for entry in gpufit_log if name in entry]
        assert len(expected) == len(got) == len(steps), name
        assert all(math.isfinite(v) for v in expected), (name, expected)
        assert name not in nonzero or any(expected), (name, expected)
        diffs[name] = max(abs(a - b) for a, b in zip(expected, got, strict=True))
        assert diffs[name] <= ATOL * max(1.0, *map(abs, expected)), (name, expected, got)
    diffs["params"] = max((trl_params[n] - gpufit_params[n]).abs().max().item()
                          for n in trl_params)  # fmt: skip
    assert diffs["params"] <= ATOL, diffs
    moved = max((trl_params[n] - p).abs().max().item()
                for n, p in tiny_llama().named_parameters())  # fmt: skip
    assert moved > 1e-3, "the steps did not train"
    print(f"max abs differences: {diffs}")
    return diffs


# ================================================================ SFT

SFT_METRICS = ("entropy", "mean_token_accuracy", "grad_norm")


def sft_trainer(tmp_path, **config):
    data = datasets.Dataset.from_dict({"text": TEXTS})
    # a high lr (the gradients are clipped to norm 1) so that some top-1 predictions come true
    args = trl.SFTConfig(**common_args(tmp_path, **{"max_length": 24, "learning_rate": 2.0,
                                                    **config}))  # fmt: skip
    return trl.SFTTrainer(model=tiny_llama(), args=args, train_dataset=data,
                          processing_class=tokenizer())  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"gradient_accumulation_steps": 2},
        {"packing": True},
        {"padding_free": True, "max_length": None},
    ],
    ids=["plain", "grad-accum", "packing", "padding-free"],
)
def test_sft_equal(tmp_path, monkeypatch, config):
    assert_same_training(lambda: sft_trainer(tmp_path, **config), monkeypatch,
                         metrics=SFT_METRICS, nonzero=SFT_METRICS)  # fmt: skip


# ================================================================ DPO


@pytest.mark.parametrize("config", [{}, {"use_weighting": True}], ids=["sigmoid", "wpo-weighting"])
def test_dpo_equal(tmp_path, monkeypatch, config):
    """DPO's policy asks for entropy, mean logits and top-1 (and log_sum_sq_probs for WPO's
    weights); its reference model, loaded from the same folder, for log-probs only."""
    data = datasets.Dataset.from_dict({
        "prompt": TEXTS[:4],
        "chosen": [" Yes.", " Short.", " Right.", " Fine."],
        "rejected": [" No, not at all, never.", " Long and winding.", " Wrong.", " Bad."],
    })  # fmt: skip

    def make():
        args = trl.DPOConfig(**common_args(tmp_path, max_length=32, **config))
        return trl.DPOTrainer(model=saved_tiny_llama(tmp_path), args=args, train_dataset=data,
                              processing_class=tokenizer())  # fmt: skip

    assert_same_training(make, monkeypatch, metrics=(
        "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
        "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
        "mean_token_accuracy"))  # fmt: skip


# ================================================================ GRPO and RLOO


def shortness(completions, **kwargs) -> list[float]:
    """A local reward: shorter completions score higher."""
    return [-float(len(c)) for c in completions]


@pytest.mark.parametrize(
    "config, trainer, nonzero",
    [
        ("GRPOConfig", "GRPOTrainer", ()),
        ("RLOOConfig", "RLOOTrainer", ("reward", "entropy")),
    ],
    ids=["grpo", "rloo"],
)
def test_online_equal(tmp_path, monkeypatch, config, trainer, nonzero):
    """Both sample completions at a temperature, which their head divides the logits by."""
    data = datasets.Dataset.from_dict({"prompt": TEXTS[:4]})

    def make():
        args = getattr(trl, config)(**common_args(
            tmp_path, num_generations=2, max_completion_length=6, temperature=0.7,
            generation_kwargs={"do_sample": True}, beta=0.04,
        ))  # fmt: skip
        return getattr(trl, trainer)(model=saved_tiny_llama(tmp_path), reward_funcs=shortness,
                                     args=args, train_dataset=data,
                                     processing_class=tokenizer())  # fmt: skip

    assert_same_training(make, monkeypatch, metrics=(
        "reward", "reward_std", "entropy", "kl", "completions/mean_length"),
        nonzero=nonzero)  # fmt: skip


# ================================================================ KTO


def test_kto_equal(tmp_path, monkeypatch):
    """KTO's policy runs the head on each batch and on its mismatched pairs (the KL term), for
    log-probs and entropy; its reference model, loaded from the same folder, for log-probs.
    Each batch of 4 holds one desirable and one undesirable example at least, so every step
    logs both sides' rewards."""
    data = datasets.Dataset.from_dict({
        "prompt": TEXTS[:4] * 3,
        "completion": [" Yes.", " No, not at all, never.", " Right.", " Wrong."] * 3,
        "label": [True, False, True, False] * 3,
    })  # fmt: skip

    def make():
        args = trl.KTOConfig(**common_args(tmp_path, max_length=32,
                                           per_device_train_batch_size=4))  # fmt: skip
        return trl.KTOTrainer(model=saved_tiny_llama(tmp_path), args=args, train_dataset=data,
                              processing_class=tokenizer())  # fmt: skip

    assert_same_training(make, monkeypatch, metrics=(
        "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
        "logps/rejected", "logits/chosen", "logits/rejected", "entropy"),
        nonzero=("rewards/margins", "entropy"))  # fmt: skip


# ================================================================ the kernel, call by call

ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
RESULTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def head_inputs(n=37, hidden=16, vocab=300, bias=True, dtype=torch.float32, seed=0,
                device="cpu"):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.5
    b = torch.randn(vocab, generator=g, dtype=dtype) * 0.1 if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    return tuple(None if v is None else v.to(device).requires_grad_(v.is_floating_point())
                 for v in (x, w, b, t))  # fmt: skip


def both_kernels(inputs, monkeypatch, outputs=ALL_OUTPUTS, temperature=1.0, softcap=None,
                 logit_scale=1.0, autocast=None):  # fmt: skip
    """Each kernel's results and input gradients (upstream: random weights on log-probs and
    entropy), TRL's first; checks that gpufit's op served the second."""
    served = Served(monkeypatch)
    runs = []
    for on_gpufit in (False, True):
        x, w, b, t = (v.detach().clone().requires_grad_(v.requires_grad) if v is not None
                      else None for v in inputs)  # fmt: skip
        with contextlib.ExitStack() as stack:
            if on_gpufit:
                stack.enter_context(gpufit.trl.use_gpufit())
            if autocast is not None:
                stack.enter_context(torch.autocast(x.device.type, dtype=autocast))
            got = trl_utils._ChunkedLogProbFunction.apply(
                x, w, b, t, temperature, 64, softcap, logit_scale, outputs)  # fmt: skip
        g = torch.Generator().manual_seed(5)
        upstream = sum((torch.rand(r.shape, generator=g).to(r.device) * r).sum()
                       for r in got[:2] if r is not None)  # fmt: skip
        leaves = [v for v in (x, w, b) if v is not None and v.requires_grad]
        grads = torch.autograd.grad(upstream, leaves) if leaves else ()
        runs.append((got, grads))
    assert served.trl == 1 and served.gpufit == 1, (served.trl, served.gpufit)
    return runs


def assert_close_runs(runs, atol=1e-5, rtol=1e-5):
    (expected, expected_grads), (got, grads) = runs
    for name, e, r in zip(RESULTS, expected, got, strict=True):
        assert (e is None) == (r is None), name
        if e is None:
            continue
        assert r.dtype == e.dtype and r.shape == e.shape, (name, r.dtype, e.dtype)
        if name == "is_top1":
            assert torch.equal(r, e)
        else:
            torch.testing.assert_close(r, e, atol=atol, rtol=rtol, msg=name)
    for e, r in zip(expected_grads, grads, strict=True):
        assert r.dtype == e.dtype
        torch.testing.assert_close(r, e, atol=atol, rtol=rtol)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(
    "transform",
    [{}, {"softcap": 2.0}, {"logit_scale": 0.5}, {"temperature": 0.7},
     {"softcap": 1.5, "logit_scale": 2.0, "temperature": 1.3}],
    ids=["plain", "softcap", "scale", "temperature", "all"],
)  # fmt: skip
def test_kernel_same_outputs_and_gradients(monkeypatch, bias, transform):
    runs = both_kernels(head_inputs(bias=bias), monkeypatch, **transform)
    assert_close_runs(runs)


@pytest.mark.parametrize(
    "outputs",
    [("log_probs",), ("log_probs", "is_top1"), ("log_probs", "entropy"),
     ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")],
    ids=["log_probs", "is_top1", "entropy", "dpo-weighting"],
)  # fmt: skip
def test_kernel_outputs_asked_only(monkeypatch, outputs):
    runs = both_kernels(head_inputs(), monkeypatch, outputs=outputs)
    assert_close_runs(runs)
    assert [r is not None for r in runs[1][0][1:]] == [n in outputs for n in RESULTS[1:]]


def test_kernel_is_top1_first_of_tied(monkeypatch):
    x, w, b, t = head_inputs(n=8, vocab=20, bias=False)
    with torch.no_grad():
        w[7] = w[3]  # classes 3 and 7 tie on every row: only 3 (the first) is the argmax
        x.mul_(4)  # and one of them is every row's argmax
    w[0:1].mul(1)  # still a leaf
    t = torch.tensor([3, 7, 3, 7, 3, 7, 3, 7])
    runs = both_kernels((x, w, b, t), monkeypatch, outputs=("log_probs", "is_top1"))
    assert_close_runs(runs)
    top1 = runs[1][0][4]
    assert not top1[1::2].any()


def test_kernel_autocast_bf16(monkeypatch):
    """Under CPU autocast both compute the head in bf16 (TRL rounds each tile's product to
    bf16; gpufit may keep it in fp32): the same to bf16 tolerance, fp32 outputs."""
    runs = both_kernels(head_inputs(bias=True), monkeypatch, autocast=torch.bfloat16)
    assert_close_runs(runs, atol=3e-2, rtol=3e-2)


def test_kernel_fp32_head_over_bf16_weight(monkeypatch):
    """cast_lm_head_to_fp32: fp32 hidden states, autocast off, a bf16 weight and bias (TRL
    casts them to fp32); their gradients come back in bf16."""
    x, w, b, t = head_inputs()
    w = w.detach().bfloat16().requires_grad_()
    b = b.detach().bfloat16().requires_grad_()
    runs = both_kernels((x, w, b, t), monkeypatch)
    assert_close_runs(runs, atol=1e-5, rtol=1e-2)  # bf16 gradients: one rounding apart


def test_kernel_no_rows(monkeypatch):
    """TRL's compact path passes no rows when no label is kept."""
    x, w, b, t = head_inputs(n=0)
    runs = both_kernels((x, w, b, t), monkeypatch)
    assert_close_runs(runs)


@pytest.mark.cuda
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_kernel_cuda(monkeypatch, autocast):
    """On CUDA TRL scores only the kept rows (its compact path) with its Triton kernel."""
    runs = both_kernels(head_inputs(n=300, hidden=64, vocab=5000, device="cuda"), monkeypatch,
                        softcap=20.0, temperature=0.9, autocast=autocast)  # fmt: skip
    tol = 1e-4 if autocast is None else 3e-2
    assert_close_runs(runs, atol=tol, rtol=tol)


def test_without_trl_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'gpufit\[trl\]'"):
        gpufit.trl.use_gpufit()


def test_fallback_zero3_head(monkeypatch):
    """A head partitioned by DeepSpeed ZeRO-3 (TRL gathers it around the forward and again in
    its own backward) runs on TRL's kernel, saying why once."""
    x, w, b, t = head_inputs()
    w = torch.nn.Parameter(w.detach())
    w.ds_id = 0  # what DeepSpeed ZeRO-3 marks its parameters with
    served = Served(monkeypatch)
    monkeypatch.setattr(gpufit.trl, "_warned", set())
    with gpufit.trl.use_gpufit(), pytest.warns(UserWarning, match="ZeRO-3"):
        got = trl_utils._ChunkedLogProbFunction.apply(x, w, b, t, 1.0, 64, None, 1.0,
                                                      ALL_OUTPUTS)  # fmt: skip
    with gpufit.trl.use_gpufit(), warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        trl_utils._ChunkedLogProbFunction.apply(x, w, b, t, 1.0, 64, None, 1.0, ALL_OUTPUTS)
    assert served.trl == 2 and served.gpufit == 0
    assert got[0].shape == (37,) and got[1] is not None


def test_fallback_float64_under_autocast(monkeypatch):
    x, w, b, t = head_inputs()
    w = w.detach().double().requires_grad_()
    served = Served(monkeypatch)
    monkeypatch.setattr(gpufit.trl, "_warned", set())
    with gpufit.trl.use_gpufit(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match="float64 inputs under autocast"):
            trl_utils._ChunkedLogProbFunction.apply(x, w, b, t, 1.0, 64, None, 1.0,
                                                    ("log_probs",))  # fmt: skip
    assert served.trl == 1 and served.gpufit == 0


def test_fallback_unknown_output(monkeypatch):
    x, w, b, t = head_inputs()
    served = Served(monkeypatch)
    monkeypatch.setattr(gpufit.trl, "_warned", set())
    with gpufit.trl.use_gpufit(), pytest.warns(UserWarning, match="'top5'"):
        trl_utils._ChunkedLogProbFunction.apply(x, w, b, t, 1.0, 64, None, 1.0,
                                                ("log_probs", "top5"))  # fmt: skip
    assert served.trl == 1 and served.gpufit == 0


def test_switch_and_undo():
    trl_kernel = trl_utils._ChunkedLogProbFunction
    assert not gpufit.trl.is_gpufit_in_use()
    gpufit.trl.use_gpufit()
    try:
        assert gpufit.trl.is_gpufit_in_use()
        with gpufit.trl.use_gpufit():  # nested: leaving it keeps gpufit
            pass
        assert gpufit.trl.is_gpufit_in_use()
    finally:
        gpufit.trl.use_trl_kernel()
    assert trl_utils._ChunkedLogProbFunction is trl_kernel
    with gpufit.trl.use_gpufit():
        assert gpufit.trl.is_gpufit_in_use()
    assert trl_utils._ChunkedLogProbFunction is trl_kernel
    gpufit.trl.use_trl_kernel()  # undoing twice changes nothing
    assert trl_utils._ChunkedLogProbFunction is trl_kernel


# ================================================================ gpufit.fuse, then a trainer


def test_fuse_then_trainer_warns_once(tmp_path, monkeypatch):
    model = tiny_llama()
    gpufit.fuse(model)
    data = datasets.Dataset.from_dict({"text": TEXTS})
    args = trl.SFTConfig(**common_args(tmp_path, max_length=24, max_steps=2))
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data,
                             processing_class=tokenizer())  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if "gpufit.fuse" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "gpufit.trl.use_gpufit()" in str(ours[0].message)


def test_fuse_then_trainer_on_gpufit_is_quiet(tmp_path, monkeypatch):
    model = gpufit.fuse(tiny_llama())
    data = datasets.Dataset.from_dict({"text": TEXTS})
    args = trl.SFTConfig(**common_args(tmp_path, max_length=24, max_steps=1))
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data,
                             processing_class=tokenizer())  # fmt: skip
    with gpufit.trl.use_gpufit(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "gpufit.fuse" in str(w.message)]


def test_fuse_after_trl_head_refused():
    model = tiny_llama()
    trl_utils.add_fused_lm_head(model)
    with pytest.raises(gpufit.hf.UnsupportedModelError, match="TRL's fused LM head"):
        gpufit.fuse(model)

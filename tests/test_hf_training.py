"""gpufit.fuse composes with how transformers models are trained: PEFT LoRA on the attention
and MLP projections, PEFT modules_to_save on lm_head (LoRA on lm_head itself is refused, at
fuse and at the first training forward), and Trainer with gradient accumulation, each over 20
steps against the same run unfused (loss within 1e-5 relative at every step; parameters at
the end). Tiny random-init models on CPU, fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="needs gpufit[hf] (transformers): pip install -e '.[hf]'"
)
peft = pytest.importorskip("peft", reason="needs gpufit[lm] (peft): pip install -e '.[lm]'")

import gpufit  # noqa: E402
from gpufit import hf  # noqa: E402

VOCAB = 128
STEPS = 20
REL = 1e-5


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).train()


def batches(count: int, size=(2, 10), seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        ids = torch.randint(3, VOCAB, size, generator=g)
        labels = ids.clone()
        labels[:, : int(torch.randint(1, 5, (), generator=g))] = -100
        yield ids, labels


def train(model, steps=STEPS):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for ids, labels in batches(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def assert_same_run(losses0, losses1, model0, model1):
    for step, (a, b) in enumerate(zip(losses0, losses1, strict=True)):
        assert abs(a - b) <= REL * abs(a), f"step {step}: loss {b} vs unfused {a}"
    state0, state1 = model0.state_dict(), model1.state_dict()
    assert state0.keys() == state1.keys()
    for key, value in state0.items():
        torch.testing.assert_close(state1[key], value, rtol=1e-4, atol=1e-5, msg=key)


def lora(model, **kwargs):
    torch.manual_seed(7)  # LoRA's A matrices are drawn at random
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **kwargs)
    return peft.get_peft_model(model, config)


def test_lora_on_projections_trains_as_unfused():
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    stock = lora(tiny_llama(), target_modules=targets)
    fused = gpufit.fuse(lora(tiny_llama(), target_modules=targets))
    assert isinstance(fused, peft.PeftModel)
    losses0, losses1 = train(stock), train(fused)
    assert losses0[-1] < losses0[0]  # it trains
    assert_same_run(losses0, losses1, stock, fused)


def test_modules_to_save_lm_head_trains_as_unfused():
    # fuse first, then PEFT: the head is resolved at every forward
    stock = lora(tiny_llama(), target_modules=["q_proj"], modules_to_save=["lm_head"])
    fused = lora(gpufit.fuse(tiny_llama()), target_modules=["q_proj"], modules_to_save=["lm_head"])
    head = fused.get_base_model().lm_head
    assert type(head).__name__ == "ModulesToSaveWrapper"
    losses0, losses1 = train(stock), train(fused)
    assert_same_run(losses0, losses1, stock, fused)
    # the trained copy changed, the original head did not: the fused loss used the copy
    assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)
    with fused.disable_adapter():  # adapters off: the original head, as PEFT's forward picks
        ids, labels = next(batches(1))
        loss0 = stock.get_base_model()(input_ids=ids, labels=labels)
    assert torch.isfinite(loss0.loss)


def test_lora_on_lm_head_is_refused():
    model = lora(tiny_llama(), target_modules=["q_proj", "lm_head"])
    with pytest.raises(hf.UnsupportedModelError, match="LoRA adapter.*modules_to_save"):
        gpufit.fuse(model)
    fused_first = lora(gpufit.fuse(tiny_llama()), target_modules=["lm_head"])
    ids, labels = next(batches(1))
    with pytest.raises(hf.UnsupportedModelError, match="lm_head carries a LoRA adapter"):
        fused_first(input_ids=ids, labels=labels)
    fused_first.eval()  # eval is the stock forward: LoRA on the head works there
    assert fused_first(input_ids=ids, labels=labels).logits.shape == (*ids.shape, VOCAB)


class _RecordingTrainer(transformers.Trainer):
    """A Trainer that keeps every training step's loss unrounded."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.step_losses.append(loss.item())
        return loss


def _trainer_run(model, folder):
    g = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(STEPS * 4):
        ids = torch.randint(3, VOCAB, (10,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(1, 8, (), generator=g))] = -100  # uneven token counts
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    args = transformers.TrainingArguments(
        output_dir=str(folder), max_steps=STEPS, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=5e-3, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = _RecordingTrainer(model=model, args=args, train_dataset=rows)
    trainer.step_losses = []
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer.step_losses, logged


def test_trainer_with_gradient_accumulation_matches_unfused(tmp_path):
    stock, fused = tiny_llama(), gpufit.fuse(tiny_llama())
    steps0, logged0 = _trainer_run(stock, tmp_path / "stock")
    steps1, logged1 = _trainer_run(fused, tmp_path / "fused")
    assert len(steps0) == STEPS * 2 and len(logged0) == STEPS
    for a, b in zip(steps0, steps1, strict=True):
        assert abs(a - b) <= REL * abs(a), (a, b)
    assert logged1 == pytest.approx(logged0, rel=REL, abs=1e-4)  # Trainer rounds what it logs
    for key, value in stock.state_dict().items():  # Adam's step is ~lr wherever a gradient is
        # near 0, so rounding there moves a weight by up to ~lr x 1e-3 over the run
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    assert "_loss_function" not in vars(fused)


def test_trainer_keeps_the_input_columns(tmp_path):
    # Trainer drops dataset columns its model's forward does not name
    model = gpufit.fuse(tiny_llama())
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none")
    trainer = transformers.Trainer(model=model, args=args)
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)


def test_a_copy_of_a_fused_model_is_fused_and_trains_itself():
    model = gpufit.fuse(tiny_llama())
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin
    ids, labels = next(batches(1))
    twin(input_ids=ids, labels=labels).loss.backward()
    assert twin.lm_head.weight.grad is not None
    assert model.lm_head.weight.grad is None  # not the original's parameters
    assert twin(input_ids=ids, labels=labels).logits is None

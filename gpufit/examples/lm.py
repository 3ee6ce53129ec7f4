"""``gpufit lm``: fine-tune a causal LM on a local text file, offline.

The model is a local Hugging Face folder (``--model DIR``: config.json and weights, loaded with
``local_files_only``) or, for a smoke run, ``--model tiny``: a 2-layer Llama built from a config
with random weights. The text is tokenized once (the folder's tokenizer, or a SentencePiece
``.model``: for ``tiny`` the one the mistral-common wheel ships) and cut into sequences of
``--seq-len`` tokens, drawn in an order fixed by the seed, so step s always trains on the same
batch. AdamW over the trainable parameters (all of them, or LoRA adapters on the attention and
MLP projections with ``--lora``); the loss is computed by ``gpufit.fuse`` (no logits) unless
``--no-fused``. Checkpoints (trainable weights, optimizer, step, random state) are written
atomically every ``--save-every`` steps and at the end; ``--resume`` continues so that the
result equals an uninterrupted run. The summary gives tokens/s and peak memory.

What can be checked before training is: flags, the model folder, the text, the output folder
and a checkpoint to resume; each problem is one line, exit 2 (as ``gpufit mnist``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from gpufit.examples import training
from gpufit.examples.lm_config import TINY, LMConfig, config_problems
from gpufit.examples.training import OutputError, UsageError

CHECKPOINT_FORMAT = "gpufit-lm-checkpoint/1"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_RESUME_KEYS = ("model", "text_sha256", "tokens", "batch_size", "seq_len", "lr", "seed",
                "lora", "lora_rank", "bf16", "fused")  # fmt: skip
_CHECKPOINT_KEYS = ("format", "run", "step", "trainable", "optimizer", "rng", "losses")


# ================================================================ model, tokenizer, text


def _transformers():
    try:
        import transformers
    except ModuleNotFoundError:
        raise UsageError("gpufit lm needs transformers: pip install 'gpufit[lm]'") from None
    transformers.logging.set_verbosity_error()  # no hub or generation-config chatter
    return transformers


def shipped_tokenizer() -> Path:
    """The SentencePiece model (32,000 tokens) inside the mistral-common wheel."""
    try:
        from importlib.resources import files

        path = Path(str(files("mistral_common") / "data" / "tokenizer.model.v1"))
    except ModuleNotFoundError:
        raise UsageError(
            "--model tiny needs a tokenizer: pip install mistral-common (it ships a "
            "SentencePiece model), or pass --tokenizer FILE.model"
        ) from None
    if not path.is_file():
        raise UsageError(f"mistral-common is installed but has no {path.name}; pass --tokenizer")
    return path


class SentencePieceTokenizer:
    def __init__(self, path: Path):
        try:
            import sentencepiece
        except ModuleNotFoundError:
            raise UsageError("--tokenizer needs sentencepiece: pip install sentencepiece") from None
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise UsageError(
                f"--tokenizer {path}: not a SentencePiece model ({training.first_line(err)})"
            ) from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_token_id = self.sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)


# files of which a model folder's tokenizer is made (one is enough to try loading it)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class HFTokenizer:
    def __init__(self, folder: Path):
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise UsageError(
                f"--model {folder}: no tokenizer could be loaded from it (none of "
                f"{', '.join(_TOKENIZER_FILES)}); pass --tokenizer FILE.model"
            )
        try:
            self.tok = _transformers().AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise UsageError(
                f"--model {folder}: no tokenizer could be loaded from it "
                f"({training.first_line(err)}); pass --tokenizer FILE.model"
            ) from None
        self.vocab_size = len(self.tok)
        self.bos_token_id = self.tok.bos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def load_tokenizer(cfg: LMConfig):
    if cfg.tokenizer:
        path = Path(cfg.tokenizer)
        training.open_regular_file(path, "--tokenizer", "a SentencePiece model file").close()
        return SentencePieceTokenizer(path)
    if cfg.model == TINY:
        return SentencePieceTokenizer(shipped_tokenizer())
    return HFTokenizer(Path(cfg.model))


def check_model_folder(folder: Path) -> None:
    if not folder.exists():
        raise UsageError(f"--model {folder}: no such folder (give a local Hugging Face model "
                         "folder, or --model tiny)")  # fmt: skip
    if not folder.is_dir():
        raise UsageError(f"--model {folder} is a file, not a model folder")
    if not (folder / "config.json").is_file():
        raise UsageError(f"--model {folder} is not a Hugging Face model folder (no config.json)")
    for entry in sorted(folder.iterdir()):  # transformers would block on a FIFO, read a device
        if not entry.is_dir():
            training.open_regular_file(entry, "--model", "a model file").close()


def build_model(cfg: LMConfig, vocab_size: int):
    transformers = _transformers()
    torch.manual_seed(cfg.seed)
    if cfg.model == TINY:
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=cfg.seq_len,
            tie_word_embeddings=True,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config)
    folder = Path(cfg.model)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        why = training.first_line(err)
        raise UsageError(f"--model {folder}: cannot be loaded ({why})") from None
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise UsageError(
            f"--model {folder} has {model.get_input_embeddings().num_embeddings} token "
            f"embeddings but the tokenizer {vocab_size} tokens"
        )
    return model


# The text is tokenized in memory at once (a Python list of ids): a cap keeps a huge or endless
# file from taking the machine's memory. 64 MiB is about 16 million tokens.
MAX_TEXT_BYTES = 64 * 2**20


def read_text(path: str) -> tuple[str, str]:
    """The text of --text and its sha256; UsageError for a missing, empty, binary or too large
    file, and for anything that is not a regular file (a FIFO, a device like /dev/zero)."""
    file = Path(path)
    data = training.read_regular_file(file, "--text", "a text file", MAX_TEXT_BYTES)
    if b"\0" in data[:65536]:
        raise UsageError(f"--text {file} holds binary data (NUL bytes), not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"--text {file} is not UTF-8 text (byte {err.start})") from None
    if not text.strip():
        raise UsageError(f"--text {file} is empty")
    return text, hashlib.sha256(data).hexdigest()


class TokenBatches:
    """The tokenized text cut into sequences of seq_len tokens; batch ``step`` is fixed by the
    seed (each pass over the sequences in a permutation seeded by seed + pass)."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        count = len(tokens) // seq_len
        if count < batch_size:
            raise UsageError(
                f"--text gives {len(tokens)} tokens, {count} sequences of --seq-len {seq_len}; "
                f"one batch needs {batch_size} (--batch-size): use a longer text or smaller sizes"
            )
        self.sequences = tokens[: count * seq_len].view(count, seq_len)
        self.batch_size, self.seed = batch_size, seed
        self.per_pass = count // batch_size

    def batch(self, step: int) -> torch.Tensor:
        epoch, index = divmod(step, self.per_pass)
        order = torch.randperm(
            len(self.sequences), generator=torch.Generator().manual_seed(self.seed + epoch)
        )
        rows = order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.sequences[rows]


# ================================================================ checkpoints


def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_checkpoint(path: str) -> dict:
    state = training.read_checkpoint(path)
    problems = checkpoint_problems(state)
    if problems:
        raise UsageError(f"--resume {path}: {'; '.join(problems)}")
    return state


def checkpoint_problems(state) -> list[str]:
    describe = training.describe
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        what = describe(state.get("format")) if isinstance(state, dict) else describe(state)
        return [f"it is not a gpufit lm checkpoint (format {what}, expected {CHECKPOINT_FORMAT})"]
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        return [f"it lacks {', '.join(missing)}"]
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        return [f"its step is {describe(step)}, not a count of finished steps (>= 1)"]
    problems = []
    if not isinstance(state["run"], dict):
        problems.append(f"its run settings are {describe(state['run'])}, not a dict")
    losses = state["losses"]
    if not isinstance(losses, list) or len(losses) != step:
        problems.append(f"its loss history is {describe(losses)}, not one loss per step")
    rng = state["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
        problems.append("its random number generator state is missing or damaged")
    return problems


def resume_problems(state: dict, run: dict, model, optimizer) -> list[str]:
    saved = state["run"]
    mismatched = [k for k in _RESUME_KEYS if saved.get(k) != run[k]]
    if mismatched:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {run[k]!r}" for k in mismatched)
        return [f"it is from a different run ({detail})"]
    trainable = state["trainable"]
    if not isinstance(trainable, dict):
        return [f"its weights are {training.describe(trainable)}, not a dict"]
    expected = trainable_state(model)
    missing = [k for k in expected if k not in trainable]
    if missing or len(trainable) != len(expected):
        return [f"its weights do not fit this model ({len(missing)} of {len(expected)} missing)"]
    for key, want in expected.items():
        have = trainable[key]
        if not isinstance(have, torch.Tensor) or have.shape != want.shape:
            return [f"its weight {key} does not fit this model"]
        if not torch.isfinite(have).all():
            return [f"its weight {key} holds NaN or infinite values"]
    return training.adam_state_problems(optimizer, state["optimizer"])


# ================================================================ the run


def _lora(model, rank: int):
    try:
        import peft
    except ModuleNotFoundError:
        raise UsageError("--lora needs peft: pip install 'gpufit[lm]'") from None
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in names] or ["c_attn", "c_proj", "c_fc"]
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                             target_modules=targets, task_type="CAUSAL_LM")  # fmt: skip
    return peft.get_peft_model(model, config)


def _peak_memory(device) -> tuple[str, int]:
    if device.type == "cuda":
        return "peak CUDA memory allocated", torch.cuda.max_memory_allocated(device)
    return "peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def library_chatter(quiet: bool):
    """For the duration: no FutureWarning/DeprecationWarning from the libraries (peft and
    transformers deprecations a user of this command cannot act on), and with ``quiet`` no
    progress bars from transformers (weight loading) either. Errors are still raised."""
    hf_logging = None
    if quiet:
        try:
            from transformers.utils import logging as hf_logging
        except ModuleNotFoundError:  # train() says that it is needed
            pass
    bars = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if bars:
            hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if bars:
                hf_logging.enable_progress_bar()


def train(cfg: LMConfig) -> dict:
    """Fine-tune as configured; returns the summary (and 'losses': this run's step losses, of
    the whole batch under --fsdp)."""
    with library_chatter(cfg.quiet):
        problems = config_problems(cfg)
        if problems:
            raise UsageError("; ".join(problems))
        dist = _launch(cfg)
        ds_config = deepspeed_config(cfg, dist) if cfg.deepspeed else None
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = training.pick_device(cfg.device, dist)
        with training.process_group(dist, device):
            return _train(cfg, dist, device, ds_config)


def _launch(cfg: LMConfig) -> training.Distributed:
    """The ranks torchrun launched (none without it), checked against --fsdp."""
    dist = training.Distributed.from_env()
    flag = _engine_flag(cfg)
    if cfg.fsdp and cfg.deepspeed:
        raise UsageError("--fsdp and --deepspeed: choose one engine")
    if flag and not dist.active:
        raise UsageError(f"{flag}: launch with torchrun --nproc_per_node=N (one process per "
                         "GPU, or CPU ranks with --device cpu)")  # fmt: skip
    if dist.active and not flag:
        raise UsageError("launched by torchrun without --fsdp or --deepspeed: each rank would "
                         "train alone; pass one to train one model across the ranks")  # fmt: skip
    if flag and cfg.resume:
        raise UsageError(f"{flag}: --resume is not supported yet (no checkpoint is written "
                         f"under {flag})")  # fmt: skip
    if flag and cfg.batch_size % dist.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size}: under {flag} each of the "
                         f"{dist.world_size} ranks takes an equal share of the batch; give a "
                         f"multiple of {dist.world_size}")  # fmt: skip
    return dist


def _engine_flag(cfg: LMConfig) -> str | None:
    """The flag of the engine that trains across the ranks (None: one process)."""
    return "--fsdp" if cfg.fsdp else ("--deepspeed" if cfg.deepspeed else None)


def deepspeed_config(cfg: LMConfig, dist: training.Distributed) -> dict:
    """--deepspeed FILE's JSON config, with the batch this run gives each rank (a size the
    file sets must agree with it)."""
    flag = f"--deepspeed {cfg.deepspeed}"
    data = training.read_regular_file(cfg.deepspeed, "--deepspeed", "a JSON file", 2**20)
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{flag}: not a JSON file ({training.first_line(err)})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{flag}: holds {training.describe(config)}, not a JSON object")
    if "optimizer" in config:
        raise UsageError(f"{flag}: has an 'optimizer' section; gpufit lm gives DeepSpeed its "
                         "own AdamW (--lr), so leave it out")  # fmt: skip
    share = cfg.batch_size // dist.world_size
    sizes = {"train_batch_size": cfg.batch_size, "train_micro_batch_size_per_gpu": share,
             "gradient_accumulation_steps": 1}  # fmt: skip
    for key, value in sizes.items():
        if config.setdefault(key, value) != value:
            raise UsageError(f"{flag}: {key} is {config[key]!r}, but this run has {value} "
                             f"(--batch-size {cfg.batch_size} over {dist.world_size} ranks, one "
                             "micro-batch per step)")  # fmt: skip
    return config


class _Stepper:
    """Backward and optimizer step, as the engine does them (a DeepSpeed engine's own, or
    the optimizer's)."""

    def __init__(self, optimizer, engine=None):
        self.optimizer, self.engine = optimizer, engine

    def __call__(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
            return
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _deepspeed(model, optimizer, cfg: LMConfig, config: dict):
    """The DeepSpeed engine of the model and optimizer, as ``config`` (--deepspeed FILE's)
    sets it up."""
    try:
        import deepspeed
    except ModuleNotFoundError:
        raise UsageError("--deepspeed needs deepspeed: pip install 'gpufit[deepspeed]'") from None
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                          dist_init_required=False)  # fmt: skip
    except (ValueError, KeyError, AssertionError) as err:
        raise UsageError(f"--deepspeed {cfg.deepspeed}: {training.first_line(err)}") from None
    return engine


def shard(model, device: torch.device, dist: training.Distributed):
    """FSDP2 over the ranks: each decoder layer (the classes the model names as
    ``_no_split_modules``) its own unit, the rest (embeddings, final norm, the head) the
    root's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gpufit import hf

    mesh = init_device_mesh(device.type, (dist.world_size,))
    units = set(getattr(hf.causal_lm(model), "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in units:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _rank_rows(ids: torch.Tensor, cfg: LMConfig, dist: training.Distributed) -> torch.Tensor:
    """This rank's equal share of the step's batch (all of it without --fsdp)."""
    if not _engine_flag(cfg):
        return ids
    share = cfg.batch_size // dist.world_size
    return ids[dist.rank * share : (dist.rank + 1) * share]


def _batch_loss(loss: torch.Tensor, cfg: LMConfig, dist: training.Distributed) -> float:
    """The step's loss over the whole batch: across ranks, the mean of the ranks' (each the
    mean over as many tokens: every sequence has seq_len - 1 targets)."""
    if not _engine_flag(cfg):
        return loss.item()
    import torch.distributed as torch_dist

    total = loss.detach().float().clone()
    torch_dist.all_reduce(total)
    return total.item() / dist.world_size


def _train(cfg: LMConfig, dist: training.Distributed, device: torch.device,
           ds_config: dict | None) -> dict:  # fmt: skip
    if cfg.model != TINY:
        check_model_folder(Path(cfg.model))
    text, text_sha256 = read_text(cfg.text)
    resume_state = load_checkpoint(cfg.resume) if cfg.resume else None
    out = Path(cfg.out) if cfg.out else (Path(cfg.resume).parent if cfg.resume else None)
    if not dist.writer:
        out = None
    if out is not None:
        training.check_output_dir(out, "--out" if cfg.out else "--resume's folder")

    tokenizer = load_tokenizer(cfg)
    tokens = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    if len(tokens) == 0:
        raise UsageError(f"--text {cfg.text}: the tokenizer made no tokens of it")
    batches = TokenBatches(tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
    model = build_model(cfg, tokenizer.vocab_size)
    if cfg.lora:
        model = _lora(model, cfg.lora_rank)
    if cfg.fused:
        import gpufit
        from gpufit import hf

        try:
            gpufit.fuse(model)
        except hf.UnsupportedModelError as err:
            raise UsageError(f"--fused: {err} (or train with --no-fused)") from None
    model.to(device).train()
    if cfg.fsdp:
        model = shard(model, device, dist)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    engine = _deepspeed(model, optimizer, cfg, ds_config) if cfg.deepspeed else None
    step_with = _Stepper(optimizer, engine)
    forward = model if engine is None else engine
    run = {
        "model": cfg.model, "text_sha256": text_sha256, "tokens": len(tokens),
        "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "lr": cfg.lr, "seed": cfg.seed,
        "lora": cfg.lora, "lora_rank": cfg.lora_rank if cfg.lora else None, "bf16": cfg.bf16,
        "fused": cfg.fused,
    }  # fmt: skip
    first, losses = 0, []
    if resume_state is not None:
        first = resume_state["step"]
        if first >= cfg.steps:
            raise UsageError(f"--resume {cfg.resume} has already trained {first} steps; pass "
                             f"--steps larger than {first} to train on")  # fmt: skip
        problems = resume_problems(resume_state, run, model, optimizer)
        if problems:
            raise UsageError(f"--resume {cfg.resume}: {'; '.join(problems)}")
        with torch.no_grad():
            named = dict(model.named_parameters())
            for name, value in resume_state["trainable"].items():
                named[name].copy_(value)
        try:
            optimizer.load_state_dict(resume_state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise UsageError(f"--resume {cfg.resume}: {training.first_line(err)}") from None
        torch.set_rng_state(resume_state["rng"]["torch"])
        losses = list(resume_state["losses"])
    claim = None
    if out is not None:
        flag = "--out" if cfg.out else "--resume's folder"
        claim = training.OutputClaim(out, CHECKPOINT_FORMAT, run, cfg.overwrite, flag)
        claim.check()
        if not _engine_flag(cfg):
            training.check_free_space(out, 2 * 3 * training.state_bytes(trainable_state(model)))

    progress = training.Progress(cfg.quiet or not dist.writer)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)  # ZeRO-3: partitioned
    progress.line(
        f"lm: {cfg.model} ({trainable:,} trainable parameters{', LoRA' * cfg.lora}) on "
        f"{device}, {len(tokens):,} tokens of {cfg.text}, steps {first + 1}..{cfg.steps} of "
        f"batch {cfg.batch_size} x {cfg.seq_len}, loss {'fused' if cfg.fused else 'stock'}"
        f"{', bf16 autocast' * cfg.bf16}{_engine_note(cfg, dist)}"
    )
    autocast = torch.autocast(device.type, torch.bfloat16) if cfg.bf16 else nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    training.sync(device)
    start = time.perf_counter()
    for step in range(first, cfg.steps):
        ids = _rank_rows(batches.batch(step), cfg, dist).to(device)
        with autocast:
            loss = forward(input_ids=ids, labels=ids).loss
        losses.append(_batch_loss(loss, cfg, dist))
        if not math.isfinite(losses[-1]):
            raise OutputError(non_finite_loss_message(cfg, model, step, first, losses[-1]))
        step_with(loss)
        done = step + 1
        progress.update(1, 1, done - first, cfg.steps - first, loss, start, cfg.batch_size)
        saving = not _engine_flag(cfg) and (done % cfg.save_every == 0 or done == cfg.steps)
        if claim is not None and saving:
            claim.recheck()
            state = {
                "format": CHECKPOINT_FORMAT, "run": run, "config": asdict(cfg), "step": done,
                "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state()}, "losses": losses,
            }  # fmt: skip
            training.write_or_explain(out / "checkpoint.pt", lambda f, s=state: torch.save(s, f))
    training.sync(device)
    seconds = time.perf_counter() - start
    memory_kind, memory = _peak_memory(device)
    summary = {
        "steps": cfg.steps, "trained_steps": cfg.steps - first, "loss": losses[-1],
        "tokens_per_s": (cfg.steps - first) * cfg.batch_size * cfg.seq_len / seconds,
        "seconds": seconds, "peak_memory_kind": memory_kind, "peak_memory_bytes": memory,
        "device": str(device), "fused": cfg.fused,
        "world_size": dist.world_size if _engine_flag(cfg) else 1,
        "engine": {"--fsdp": "FSDP2", "--deepspeed": "DeepSpeed"}.get(_engine_flag(cfg)),
    }  # fmt: skip
    if claim is not None:
        claim.recheck()
        doc = json.dumps({"config": asdict(cfg), "summary": summary, "losses": losses}, indent=2)
        training.write_or_explain(out / "metrics.json", lambda f: f.write(doc.encode()))
    return {**summary, "losses": losses, "model": model}


def non_finite_weights(model, limit: int = 3) -> tuple[list[str], int]:
    """The first ``limit`` names of the parameters holding NaN or infinite values, and how many
    there are in all."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    return bad[:limit], len(bad)


def non_finite_loss_message(cfg: LMConfig, model, step: int, first: int, loss: float) -> str:
    """Why step ``step``'s loss is not finite, as far as the weights tell: weights that were
    NaN/Inf before any step of this run came from --model or --resume; weights that became so
    since, from training (--lr); finite weights with a non-finite loss, from the numerics."""
    names, count = non_finite_weights(model)
    where = f"step {step + 1}: the loss is {loss}"
    if not names:
        return f"{where} while every weight is finite; lower --lr, or try without --bf16"
    listed = ", ".join(names) + (f" and {count - len(names)} more" if count > len(names) else "")
    if step == first:
        origin = f"--model {cfg.model}" + (f" and --resume {cfg.resume}" if cfg.resume else "")
        return (
            f"{where} because weights loaded from {origin} hold NaN or infinite values "
            f"({listed}); the model's weights are damaged, --lr cannot help"
        )
    return f"{where}: training made weights NaN or infinite ({listed}); lower --lr"


def summary_line(s: dict) -> str:
    return (
        f"lm: loss {s['loss']:.4f} after {s['steps']} steps | {s['tokens_per_s']:,.0f} tokens/s "
        f"over {s['trained_steps']} steps | {s['peak_memory_kind']} "
        f"{s['peak_memory_bytes'] / 2**20:,.0f} MiB | {s['device']}, "
        f"{'fused' if s['fused'] else 'stock'} loss"
        + (f", {s['engine']} over {s['world_size']} ranks" if s.get("engine") else "")
    )


def _engine_note(cfg: LMConfig, dist: training.Distributed) -> str:
    if not _engine_flag(cfg):
        return ""
    engine = "FSDP2" if cfg.fsdp else f"DeepSpeed ({cfg.deepspeed})"
    return (f", {engine} over {dist.world_size} ranks ({cfg.batch_size // dist.world_size} "
            "sequences each; metrics only, no checkpoint)")  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    from gpufit.examples.lm_config import config_from_args

    prog = "gpufit lm"
    try:
        summary = train(config_from_args(args))
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except OutputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    if training.Distributed.from_env().writer:
        print(summary_line(summary), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from gpufit.examples.lm_config import add_arguments

    return training.example_parser(
        "python -m gpufit.examples.lm",
        "Fine-tune a causal LM on a local text file (the same as gpufit lm)",
        add_arguments,
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""What ``gpufit lm`` can be asked: the LMConfig, its command-line flags and the rule each value
must meet. Torch-free, so ``gpufit lm --help`` answers at once; the training is in
gpufit.examples.lm.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from gpufit.examples import options

TINY = "tiny"  # --model tiny: a small Llama built from a config, random weights (a smoke run)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class LMConfig:
    text: str | None = None  # the training text (UTF-8 file)
    model: str = TINY  # a local Hugging Face model folder, or "tiny"
    tokenizer: str | None = None  # a SentencePiece .model (default: the model folder's own)
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-4
    seed: int = 0
    lora: bool = False
    lora_rank: int = 8
    bf16: bool = False
    fused: bool = True
    device: str = "auto"
    fsdp: bool = False  # FSDP2 over the ranks torchrun launched
    deepspeed: str | None = None  # or DeepSpeed, configured by this JSON file
    out: str | None = None
    resume: str | None = None
    overwrite: bool = False  # replace another run's checkpoint in --out
    save_every: int = 50
    threads: int | None = None
    quiet: bool = False


RULES = {
    "steps": options.whole_number(1, 10**9),
    "batch_size": options.whole_number(1, 1 << 16),
    "seq_len": options.whole_number(2, 1 << 20),
    "lr": options.positive_number(1.0, "AdamW's learning rate; 1e-4 is typical for fine-tuning"),
    "seed": options.whole_number(0, options.SEED_MAX, "torch seeds are 64-bit"),
    "lora_rank": options.whole_number(1, 4096),
    "device": options.one_of(DEVICES),
    "save_every": options.whole_number(1, 10**9),
    "threads": options.whole_number(1, options.cpu_count(), "the CPUs this process may use"),
}


def config_problems(cfg: LMConfig) -> list[str]:
    """What is wrong with a config, one message per field ("--steps: 0 must be at least 1")."""
    problems = []
    if not cfg.text:
        problems.append("--text: give the text file to train on")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        rule = RULES.get(f.name)
        if rule is not None and value is not None:
            problem = rule(value)
            if problem:
                problems.append(f"--{f.name.replace('_', '-')}: {problem}")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LMConfig()

    def value(name, convert, help, **kw):
        parser.add_argument(f"--{name.replace('_', '-')}", default=getattr(d, name), help=help,
                            type=options.parser(RULES[name], convert), **kw)  # fmt: skip

    parser.add_argument("--text", metavar="FILE", required=True,
                        help="UTF-8 text file to fine-tune on")  # fmt: skip
    parser.add_argument(
        "--model", metavar="DIR", default=d.model,
        help="a local Hugging Face causal LM folder (config.json + weights), or 'tiny': a "
        "2-layer Llama built from a config with random weights (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer", metavar="FILE",
        help="a SentencePiece .model file; default: the model folder's tokenizer, or for "
        "--model tiny the one mistral-common ships (pip install mistral-common)",
    )  # fmt: skip
    value("steps", int, "optimizer steps in all, a resumed run included (default: %(default)s)")
    value("batch_size", int, "sequences per step (default: %(default)s)")
    value("seq_len", int, "tokens per sequence (default: %(default)s)")
    value("lr", float, "AdamW's learning rate (default: %(default)s)")
    value("seed", int, "seed of the initial weights, LoRA and batch order (default: %(default)s)")
    parser.add_argument(
        "--lora",
        action="store_true",
        help="train LoRA adapters on the attention and MLP projections only",
    )
    value("lora_rank", int, "LoRA rank with --lora (default: %(default)s)")
    parser.add_argument("--bf16", action="store_true",
                        help="run forward and backward under bfloat16 autocast")  # fmt: skip
    parser.add_argument(
        "--fused", action=argparse.BooleanOptionalAction, default=d.fused,
        help="compute the loss with gpufit.fuse (no logits) or as transformers does "
        "(default: fused)",
    )  # fmt: skip
    parser.add_argument(
        "--fsdp", action="store_true",
        help="under torchrun: shard the model with FSDP2 (fully_shard) over the ranks, each "
        "training on an equal share of every batch (gloo on CPU, nccl on GPUs); writes "
        "metrics.json, no checkpoint",
    )  # fmt: skip
    parser.add_argument(
        "--deepspeed", metavar="FILE",
        help="under torchrun: train with DeepSpeed as this JSON config sets it up (ZeRO stage "
        "etc.; gpufit lm gives it the batch sizes and its AdamW), each rank on an equal share "
        "of every batch; e.g. docs/deepspeed_zero3.json; metrics.json, no checkpoint",
    )  # fmt: skip
    parser.add_argument("--device", choices=DEVICES, default=d.device,
                        help="auto: cuda if a GPU is visible (default: %(default)s)")  # fmt: skip
    parser.add_argument("--out", metavar="DIR",
                        help="folder for checkpoint.pt and metrics.json (default: none; with "
                        "--resume, the checkpoint's folder)")  # fmt: skip
    parser.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --out replace the checkpoint of another run or command there "
                        "(without it, such a folder is refused)")  # fmt: skip
    value("save_every", int, "steps between checkpoints (default: %(default)s)", metavar="N")
    value("threads", int, "CPU threads for torch (default: torch's)", metavar="N")
    parser.add_argument("--quiet", action="store_true", help="only the summary line")


def config_from_args(args: argparse.Namespace) -> LMConfig:
    return LMConfig(**{f.name: getattr(args, f.name) for f in fields(LMConfig)})

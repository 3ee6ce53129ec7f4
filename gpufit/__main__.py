"""The `gpufit` command line: `gpufit info`, `gpufit mnist`, ... (also `python -m gpufit ...`).

Arguments are parsed before torch is imported, so `--help` and usage errors answer at once; a
subcommand imports what it runs.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import gpufit

    report = gpufit.info()
    print(json.dumps(report.as_dict(), indent=2) if args.json else report)
    return 0


def _cmd_mnist(args: argparse.Namespace) -> int:
    from gpufit.examples import mnist

    return mnist.run_cli(args)


def _cmd_lm(args: argparse.Namespace) -> int:
    from gpufit.examples import lm

    return lm.run_cli(args)


def build_parser() -> argparse.ArgumentParser:
    from gpufit.examples import lm_config, mnist_config

    parser = argparse.ArgumentParser(
        prog="gpufit",
        description="Fused training ops for PyTorch. Start with `gpufit info` to see which "
        "kernels are active.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info = commands.add_parser(
        "info", help="show the active backend, torch/CUDA versions and compiled architectures"
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=_cmd_info)

    train = commands.add_parser(
        "mnist",
        help="train the MNIST tutorial MLP, as PyTorch writes it (--impl torch) or with gpufit",
        description="Train the MNIST MLP (784-256-10, Adam, batch 64) as the PyTorch tutorial "
        "writes it (--impl torch) or on gpufit's fused ops with device-resident data (--impl "
        "gpufit). Works under torchrun for data parallel training.",
    )
    mnist_config.add_arguments(train)
    train.set_defaults(run=_cmd_mnist)

    lm = commands.add_parser(
        "lm",
        help="fine-tune a causal LM (a local Hugging Face folder, or a tiny built-in one) on a "
        "text file, offline",
        description="Fine-tune a causal LM on a local text file with AdamW, its loss computed "
        "by gpufit.fuse (no logits) unless --no-fused; --lora trains LoRA adapters only. "
        "Checkpoints are atomic and a resumed run equals an uninterrupted one. Needs "
        "gpufit[lm] (transformers; peft for --lora; sentencepiece).",
    )
    lm_config.add_arguments(lm)
    lm.set_defaults(run=_cmd_lm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gpufit._backend import BackendChoiceError

    try:
        return args.run(args)
    except BackendChoiceError as err:  # GPUFIT_BACKEND / GPUFIT_JIT: one line, no traceback
        print(f"gpufit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

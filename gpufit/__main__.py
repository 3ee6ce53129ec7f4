"""The `gpufit` command line: `gpufit info`, ... (also `python -m gpufit ...`)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import gpufit

    report = gpufit.info()
    print(json.dumps(report.as_dict(), indent=2) if args.json else report)
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

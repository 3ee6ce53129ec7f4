"""``python -m gpufit.hf families``: which classes of the installed transformers gpufit.fuse
takes (with the transforms it folds into the fused op) and which it refuses (with the reason),
as a markdown table. It imports every model module of transformers: about a minute."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpufit.hf", description=__doc__)
    parser.add_argument("command", choices=["families"])
    parser.parse_args(argv)
    try:
        import transformers
    except ImportError:
        print("gpufit.hf families: needs transformers: pip install -e '.[hf]'", file=sys.stderr)
        return 2
    from gpufit.hf import _families

    results = _families.verdicts()
    print(f"transformers {transformers.__version__}: {_families.counts(results)}\n")
    print(_families.table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``lockgen`` command line.

Each subcommand is one :class:`Command`: a name, a one-line help, a function that adds its
arguments and a function that runs it and returns the exit code. They are registered in
``COMMANDS`` at the bottom of this file, in workflow order; adding a subcommand is one
function pair plus one line there.

Exit codes: 0 success / compatible / works; 1 incompatible / broken; 2 bad input (a clear
``lockgen: error: …`` message, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from lockgen.errors import LockgenError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Reproducible CUDA + PyTorch environments from a reviewed compatibility matrix.

workflow:
  1. lockgen matrix            what PyTorch shipped: torchvision, Python, CUDA/cuDNN builds,
                               driver floors, GPU architectures (envs/matrix.toml)
  2. lockgen targets           the environments this project generates (envs/targets.toml)
  3. lockgen check ...         is a torch/CUDA/cuDNN/Python/driver/GPU combination real and
                               runnable? explains each conflict, suggests the nearest valid ones
  4. lockgen doctor            inspects this machine (driver, GPUs, installed torch, nvcc) and
                               says: works / works with warnings / broken, and the fix
  later: render -> lock -> verify -> install (conda-lock and pip lockfiles per target),
         flake (a Nix dev shell per target)

example:
  lockgen check --torch 2.1.2 --cuda 12.1 --python 3.11 --driver 535 --gpu "RTX 3090"
"""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, TextIO], int]


def _matrix(args: argparse.Namespace):
    from lockgen.matrix import load_matrix

    return load_matrix(args.matrix, args.targets)


# -- matrix ---------------------------------------------------------------------------------


def _configure_matrix(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch", help="only this release (2.1 or 2.1.2)")
    p.add_argument("--cuda", help="only builds of this CUDA version (12.1 or cu121)")
    p.add_argument("--format", choices=("table", "json"), default="table")


def _run_matrix(args: argparse.Namespace, out: TextIO) -> int:
    from lockgen.versions import Version, parse_cuda

    m = _matrix(args)
    releases = list(m.releases)
    if args.torch:
        releases = [m.release(Version.parse(args.torch, "torch version"))]
    cuda = parse_cuda(args.cuda) if args.cuda else None
    if args.cuda and cuda is None:
        raise LockgenError("--cuda needs a CUDA version; every release has a CPU build")
    rows = []
    for r in releases:
        for b in r.builds:
            if cuda is not None and b.cuda != cuda:
                continue
            floor = m.driver_floor(b.cuda)
            archs = m.arch_list(r.torch, b.cuda)
            rows.append({
                "torch": r.torch.raw,
                "torchvision": r.torchvision.raw if r.torchvision else None,
                "python": [p.raw for p in r.python],
                "released": r.released,
                "cuda": b.cuda.raw,
                "cudnn": b.cudnn.raw if b.cudnn else None,
                "status": b.status,
                "pypi_default": b.cuda == r.pypi_default_cuda,
                "driver_linux": floor.full.raw if floor and floor.full else None,
                "driver_linux_min": floor.minimum.raw if floor else None,
                "archs": list(archs.names) if archs else None,
                "verified": r.verified and b.verified,
                "unverified": list(r.unverified) + ([] if b.verified else ["build"])
                + ([] if archs is None or archs.verified else ["archs"]),
                "source": sorted(set(r.source + b.source)),
            })
    if not rows:
        raise LockgenError(f"no build of the matrix matches --torch {args.torch} "
                           f"--cuda {args.cuda}")
    if args.format == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
        return EXIT_OK
    head = ("torch", "vision", "python", "cuda", "cudnn", "driver>=", "(mvc>=)", "archs", "")
    table = []
    for row in rows:
        py = row["python"]
        flags = []
        if row["pypi_default"]:
            flags.append("pypi")
        if row["status"] == "experimental":
            flags.append("exp")
        if row["unverified"]:
            flags.append("unverified: " + ",".join(row["unverified"]))
        archs = row["archs"]
        table.append((row["torch"], row["torchvision"] or "?", f"{py[0]}-{py[-1]}", row["cuda"],
                      row["cudnn"] or "?", row["driver_linux"] or "?",
                      row["driver_linux_min"] or "?",
                      f"{archs[0]}..{archs[-1]}" if archs else "?", " ".join(flags)))
    widths = [max(len(str(x[i])) for x in [head, *table]) for i in range(len(head))]
    for line in [head, *table]:
        cells = (str(c).ljust(w) for c, w in zip(line, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")
    out.write("driver>= toolkit driver (Linux); mvc>= minor-version-compatibility floor; "
              "pypi = the build plain `pip install torch` gets\n")
    return EXIT_OK


# -- targets --------------------------------------------------------------------------------


def _configure_targets(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one target in full")
    p.add_argument("--format", choices=("table", "json"), default="table")


def _target_json(t) -> dict:
    return {
        "name": t.name,
        "description": t.description,
        "torch": t.torch.raw,
        "torchvision": t.torchvision.raw,
        "python": t.python.raw,
        "cuda": t.cuda.raw if t.cuda else None,
        "cudnn": t.cudnn.raw if t.cudnn else None,
        "platforms": list(t.platforms),
        "conda_channel": t.conda_channel.name,
        "conda_channels": list(t.conda_channels),
        "conda_specs": list(t.conda_specs),
        "virtual_packages": t.virtual_packages,
        "pip_index_url": t.pip_index_url,
        "pip_requirements": list(t.pip_requirements),
        "driver_linux": (t.driver_floor.full.raw if t.driver_floor and t.driver_floor.full
                         else None),
        "driver_linux_min": t.driver_floor.minimum.raw if t.driver_floor else None,
        "arch_list": list(t.arch_list.names) if t.arch_list else [],
        "verified": t.verified,
    }


def _run_targets(args: argparse.Namespace, out: TextIO) -> int:
    m = _matrix(args)
    targets = [m.target(args.name)] if args.name else list(m.targets.values())
    if args.format == "json" or args.name:
        data = [_target_json(t) for t in targets]
        json.dump(data[0] if args.name else data, out, indent=2)
        out.write("\n")
        return EXIT_OK
    for t in targets:
        mark = "" if t.verified else "  (partly unverified)"
        out.write(f"{t.summary()}{mark}\n")
    return EXIT_OK


# -- check ----------------------------------------------------------------------------------


def _configure_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch", help="PyTorch version, e.g. 2.1 or 2.1.2 (or 2.1.2+cu121)")
    p.add_argument("--cuda", help="CUDA version of the build: 12.1, cu121, or cpu")
    p.add_argument("--cudnn", help="cuDNN version, e.g. 8.9.2")
    p.add_argument("--python", help="Python version, e.g. 3.11")
    p.add_argument("--torchvision", help="torchvision version, e.g. 0.16")
    p.add_argument("--driver", help="NVIDIA driver version, e.g. 535.104.05")
    p.add_argument("--gpu", help='GPU: sm_86, 8.6 or a name like "RTX 3090"')
    p.add_argument("--platform", default="linux-64", help="conda platform (default linux-64)")
    p.add_argument("--format", choices=("text", "json"), default="text")


def _run_check(args: argparse.Namespace, out: TextIO) -> int:
    from lockgen.check import Request, check, format_check

    m = _matrix(args)
    if not any((args.torch, args.cuda, args.cudnn, args.python, args.torchvision, args.driver,
                args.gpu)):
        raise LockgenError("nothing to check: give at least one of --torch, --cuda, --cudnn, "
                           "--python, --torchvision, --driver, --gpu")
    req = Request.from_strings(m, torch=args.torch, cuda=args.cuda, cudnn=args.cudnn,
                               python=args.python, torchvision=args.torchvision,
                               driver=args.driver, gpu=args.gpu, platform=args.platform)
    result = check(m, req)
    if args.format == "json":
        json.dump(result.to_json(), out, indent=2)
        out.write("\n")
    else:
        out.write(format_check(result) + "\n")
    return EXIT_OK if result.ok else EXIT_FAIL


# -- doctor ---------------------------------------------------------------------------------


def _configure_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")
    p.add_argument("--python-exe", default=sys.executable,
                   help="the interpreter whose torch to inspect (default: this one)")


def _run_doctor(args: argparse.Namespace, out: TextIO) -> int:
    from lockgen.doctor import BROKEN, diagnose, format_diagnosis
    from lockgen.probe import Prober

    m = _matrix(args)
    prober = args.prober if getattr(args, "prober", None) else Prober(python_exe=args.python_exe)
    d = diagnose(m, prober.probe())
    if args.json:
        json.dump(d.to_json(), out, indent=2)
        out.write("\n")
    else:
        out.write(format_diagnosis(d) + "\n")
    return EXIT_FAIL if d.verdict == BROKEN else EXIT_OK


# -- registry -------------------------------------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command("matrix", "show the compatibility matrix", _configure_matrix, _run_matrix),
    Command("targets", "list the environments the project generates", _configure_targets,
            _run_targets),
    Command("check", "check a torch/CUDA/cuDNN/Python/driver/GPU combination",
            _configure_check, _run_check),
    Command("doctor", "inspect this machine: verdict and fix", _configure_doctor, _run_doctor),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: keep its exit code 2
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"lockgen: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lockgen", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", help="matrix file (default: envs/matrix.toml)")
    parser.add_argument("--targets", help="targets file (default: targets.toml beside the "
                                          "matrix)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None, **inject) -> int:
    """Run lockgen; returns the exit code. ``inject`` sets extra attributes on the parsed
    arguments (tests pass ``prober=Prober(...)`` to ``doctor``)."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    for k, v in inject.items():
        setattr(args, k, v)
    if not getattr(args, "_run", None):
        parser.print_help(out)
        return EXIT_USAGE
    try:
        return args._run(args, out)
    except LockgenError as exc:
        err.write(f"lockgen: error: {exc}\n")
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

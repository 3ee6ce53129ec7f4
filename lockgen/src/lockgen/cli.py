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
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, TextIO

from lockgen.errors import LockgenError
from lockgen.matrix import PLATFORMS

if TYPE_CHECKING:  # pragma: no cover
    from lockgen.formats.pip import UvResolver
    from lockgen.formats.uv import Runner
    from lockgen.probe import Prober
    from lockgen.pypi import Get
    from lockgen.solve import Solver

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + 13  # as a process killed by SIGPIPE

DESCRIPTION = """\
Reproducible CUDA + PyTorch environments from a reviewed compatibility matrix.

workflow:
  1. lockgen matrix            what PyTorch shipped: torchvision, Python, CUDA/cuDNN builds,
                               driver floors, GPU architectures (lockgen/data/matrix.toml)
  2. lockgen targets           the environments this project generates (lockgen/data/targets.toml)
  3. lockgen check ...         is a torch/CUDA/cuDNN/Python/driver/GPU combination real and
                               runnable? names the builds that fit, explains each conflict,
                               suggests the nearest builds that fit the machine
  4. lockgen doctor            inspects this machine (driver, GPUs, installed torch and the
                               CUDA libraries it loaded, nvcc, environment) and says: works /
                               works with warnings / broken, and the fix
  5. lockgen render --all       every flavor's inputs: envs/<target>.yml + virtual packages
                               (conda-lock), envs/uv/<target>/pyproject.toml (uv)
  6. lockgen lock --all         solve into envs/<target>.lock (checked by verify); --flavor pip
                               writes envs/<target>.requirements.txt with --hash lines,
                               --flavor uv runs `uv lock` into envs/uv/<target>/uv.lock
  7. lockgen verify FILE        is a lockfile the CUDA build its target promises, fresh, hashed?
  8. lockgen install FILE --prefix DIR   install a lock without conda (checks the driver)
  later: flake (a Nix dev shell per target)
  LLM stack: check --with PKG[==VER] (xformers, vllm, flash-attn, bitsandbytes, ...: installs,
             loads beside that torch, runs on the GPU?), doctor --stack (the installed one),
             refresh-stack (re-read their facts from PyPI; lockgen/data/stack*.toml)

example:
  lockgen check --torch 2.1.2 --cuda 12.1 --python 3.11 --driver 535 --gpu "RTX 3090"
"""


@dataclass(frozen=True)
class Seams:
    """What a caller (the tests) puts in place of this machine and the real solvers; each
    None means the real one. Passed to :func:`main` by keyword, so a misspelt one is a
    TypeError instead of a silent run of the real thing."""

    prober: Prober | None = None  # doctor, install: the machine probed
    solver: Solver | None = None  # lock --flavor conda
    pip_resolver: UvResolver | None = None  # lock --flavor pip
    uv_runner: Runner | None = None  # lock --flavor uv: how `uv lock` is run
    pypi_get: Get | None = None  # refresh-stack: how PyPI is read


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, TextIO, Seams], int]


def _matrix(args: argparse.Namespace):
    from lockgen.load import load_matrix

    return load_matrix(args.matrix, args.targets)


class _FormatRenamed(argparse.Action):
    """``--json``, which some commands took before every command had ``--format json``."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--json is now --format json (the same on every command)")


def _add_format(p: argparse.ArgumentParser, default: str) -> None:
    """The one spelling of machine output on every command: ``--format json``."""
    p.add_argument(
        "--format",
        choices=(default, "json"),
        default=default,
        help="json: machine-readable, with stable keys (default: %(default)s)",
    )
    p.add_argument("--json", nargs=0, action=_FormatRenamed, help=argparse.SUPPRESS)


# -- matrix ---------------------------------------------------------------------------------


def _configure_matrix(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch", help="only this release (2.1 or 2.1.2)")
    p.add_argument("--cuda", help="only builds of this CUDA version (12.1 or cu121)")
    _add_format(p, "table")


def _run_matrix(args: argparse.Namespace, out: TextIO, seams: Seams) -> int:
    from lockgen.versions import Version, parse_cuda

    m = _matrix(args)
    releases = list(m.releases)
    if args.torch:
        releases = [m.release(Version.parse(args.torch, "torch version"))]
    cuda = parse_cuda(args.cuda) if args.cuda else None
    if args.cuda and cuda is None:
        raise LockgenError("--cuda needs a CUDA version; every release has a CPU build")
    rows = m.build_rows(releases, cuda)
    if not rows:
        raise LockgenError(
            f"no build of the matrix matches --torch {args.torch} --cuda {args.cuda}"
        )
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
        table.append(
            (
                row["torch"],
                row["torchvision"] or "?",
                f"{py[0]}-{py[-1]}",
                row["cuda"],
                row["cudnn"] or "?",
                row["driver_linux"] or "?",
                row["driver_linux_min"] or "?",
                f"{archs[0]}..{archs[-1]}" if archs else "?",
                " ".join(flags),
            )
        )
    widths = [max(len(str(x[i])) for x in [head, *table]) for i in range(len(head))]
    for line in [head, *table]:
        cells = (str(c).ljust(w) for c, w in zip(line, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")
    out.write(
        "driver>= toolkit driver (Linux); mvc>= minor-version-compatibility floor; "
        "pypi = the build plain `pip install torch` gets\n"
    )
    return EXIT_OK


ENVS_HELP = (
    "folder of the spec and lock files (default: beside a --matrix of your own, else "
    "$LOCKGEN_ENVS, else envs/ in the current folder)"
)


# -- targets --------------------------------------------------------------------------------


def _configure_targets(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one target in full")
    _add_format(p, "table")
    p.add_argument("--envs", help=ENVS_HELP)


def _target_json(t, target_routes) -> dict:
    return {
        "name": t.name,
        "description": t.description,
        "torch": t.torch.raw,
        "torchvision": t.torchvision.raw,
        "python": t.python.raw,
        "pythons": [p.raw for p in t.pythons],
        "cuda": t.cuda.raw if t.cuda else None,
        "cudnn": t.cudnn.raw if t.cudnn else None,
        "platforms": list(t.platforms),
        "conda_channel": t.conda_channel.name if t.conda_channel else None,
        "conda_channels": list(t.conda_channels),
        "conda_specs": list(t.conda_specs),
        "virtual_packages": t.virtual_packages,
        "pip_source": t.pip_source.kind,
        "pip_index_url": t.pip_index_url,
        "pip_requirements": list(t.pip_requirements),
        "stack": list(t.stack),
        "driver_linux": (
            t.driver_floor.full.raw if t.driver_floor and t.driver_floor.full else None
        ),
        "driver_linux_min": t.driver_floor.minimum.raw if t.driver_floor else None,
        "arch_list": list(t.arch_list.names) if t.arch_list else [],
        "arch_lists": {p: list(a.names) for p, a in t.arch_lists.items()},
        "verified": t.verified,
        "install": {r.flavor: r.to_json() for r in target_routes},
    }


def _target_table(t, target_routes) -> str:
    """One target in full, as label/value rows (the JSON's content, for reading)."""
    j = _target_json(t, target_routes)
    virtual = "; ".join(
        f"{platform}: " + ", ".join(f"{k}={v}" for k, v in packages.items())
        for platform, packages in j["virtual_packages"].items()
    )
    driver = "none (CPU)"
    if j["driver_linux_min"]:
        driver = f">= {j['driver_linux'] or '?'} (>= {j['driver_linux_min']} with minor version "
        driver += "compatibility)"
    rows = [
        ("description", j["description"]),
        ("platforms", ", ".join(j["platforms"])),
        ("Python", ", ".join(j["pythons"])),
        ("conda channels", ", ".join(j["conda_channels"]) or "none"),
        ("conda specs", ", ".join(j["conda_specs"]) or "none"),
        ("virtual packages", virtual),
        ("pip index", j["pip_index_url"]),
        ("pip requirements", ", ".join(j["pip_requirements"])),
        ("LLM stack", ", ".join(j["stack"]) or "none"),
        ("driver (Linux)", driver),
        (
            "GPU archs",
            "; ".join(f"{p}: {', '.join(a)}" for p, a in j["arch_lists"].items()) or "none (CPU)",
        ),
        ("verified", "yes" if j["verified"] else "partly unverified (see lockgen matrix)"),
    ]
    rows += [
        (f"install ({r.flavor})", f"{r.status}: {r.command if r.status != 'none' else r.note}")
        for r in target_routes
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join([t.summary(), *(f"  {label:<{width}}  {value}" for label, value in rows)])


def _run_targets(args: argparse.Namespace, out: TextIO, seams: Seams) -> int:
    from lockgen.routes import nix_shells, routes

    m = _matrix(args)
    envs = _envs_dir(args, m)
    shells, why_not = nix_shells(m)
    targets = [m.target(args.name)] if args.name else list(m.targets.values())
    by_target = {t.name: routes(m, t, envs, shells, why_not) for t in targets}
    if args.format == "json":
        data = [_target_json(t, by_target[t.name]) for t in targets]
        json.dump(data[0] if args.name else data, out, indent=2)
        out.write("\n")
        return EXIT_OK
    if args.name:
        out.write(_target_table(targets[0], by_target[targets[0].name]) + "\n")
        return EXIT_OK
    for t in targets:
        mark = "" if t.verified else "  (partly unverified)"
        cuda = f"CUDA {t.cuda} + cuDNN {t.cudnn or '?'}" if t.cuda else "CPU"
        out.write(
            f"{t.name}: torch {t.torch} + torchvision {t.torchvision} + {cuda}, Python "
            f"{t.python_range}, {', '.join(t.platforms)}{mark}\n"
        )
        if t.is_stack:
            out.write(f"  LLM stack: {', '.join(t.stack)}\n")
        for r in by_target[t.name]:
            what = r.command if r.status != "none" else r.note
            out.write(f"  {r.flavor:<5}  {r.status:<7}  {what}\n")
            if r.lock:
                out.write(f"  {'':<5}  {'':<7}  lock: {r.lock}\n")
    out.write(
        "locked: installs the committed lock; no lock: installs now without one (the lock "
        "line says how it is made); none: why there is no such environment\n"
    )
    return EXIT_OK


# -- check ----------------------------------------------------------------------------------


def _configure_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch", help="PyTorch version, e.g. 2.1 or 2.1.2 (or 2.1.2+cu121)")
    p.add_argument("--cuda", help="CUDA version of the build: 12.1, cu121, or cpu")
    p.add_argument("--cudnn", help="cuDNN version, e.g. 8.9.2")
    p.add_argument("--python", help="Python version, e.g. 3.11")
    p.add_argument("--torchvision", help="torchvision version, e.g. 0.16")
    p.add_argument(
        "--driver", help="NVIDIA driver version, e.g. 535.104.05, or a branch: 535 (its drivers)"
    )
    p.add_argument(
        "--gpu",
        help='GPU: sm_86, 8.6 or its name as nvidia-smi prints it ("NVIDIA GeForce RTX 3090"); '
        "several: one per line or comma-separated, each judged",
    )
    p.add_argument(
        "--platform",
        default="linux-64",
        choices=PLATFORMS,
        help="conda platform (default linux-64)",
    )
    p.add_argument(
        "--with",
        dest="with_",
        action="append",
        metavar="PKG[==VER]",
        help="also check this package of the LLM stack (repeatable; extras: 'trl[vllm]==1.16.0')",
    )
    _add_format(p, "text")


def _run_check(args: argparse.Namespace, out: TextIO, seams: Seams) -> int:
    from lockgen.check import Request, check, format_check

    m = _matrix(args)
    if (
        not any(
            (
                args.torch,
                args.cuda,
                args.cudnn,
                args.python,
                args.torchvision,
                args.driver,
                args.gpu,
            )
        )
        and not args.with_
    ):
        raise LockgenError(
            "nothing to check: give at least one of --torch, --cuda, --cudnn, "
            "--python, --torchvision, --driver, --gpu, --with"
        )
    req = Request.from_strings(
        m,
        torch=args.torch,
        cuda=args.cuda,
        cudnn=args.cudnn,
        python=args.python,
        torchvision=args.torchvision,
        driver=args.driver,
        gpu=args.gpu,
        platform=args.platform,
    )
    if args.with_:
        from lockgen.stack_check import run_with

        return run_with(m, req, args.with_, args.format, out)
    result = check(m, req)
    if args.format == "json":
        json.dump(result.to_json(), out, indent=2)
        out.write("\n")
    else:
        out.write(format_check(result) + "\n")
    return EXIT_OK if result.ok else EXIT_FAIL


# -- doctor ---------------------------------------------------------------------------------


def _configure_doctor(p: argparse.ArgumentParser) -> None:
    _add_format(p, "text")
    p.add_argument(
        "--python-exe",
        default=sys.executable,
        help="the interpreter whose torch to inspect (default: this one)",
    )
    p.add_argument(
        "--stack",
        action="store_true",
        help="inspect the LLM stack installed beside torch (xformers, vllm, flash-attn, ...)",
    )


def _check_interpreter(exe: str) -> None:
    """``--python-exe`` names a program that can run: one line saying why not, before the
    doctor blames torch for it."""
    import shutil
    from pathlib import Path

    found = shutil.which(exe)
    if found is not None:
        return
    path = Path(exe)
    try:
        path.stat()
    except OSError as exc:
        raise LockgenError(f"--python-exe {exe}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise LockgenError(f"--python-exe {exe} is a folder, not a Python interpreter")
    raise LockgenError(f"--python-exe {exe} is not an executable program")


def _run_doctor(args: argparse.Namespace, out: TextIO, seams: Seams) -> int:
    from lockgen.doctor import BROKEN, diagnose, format_diagnosis
    from lockgen.probe import Prober

    m = _matrix(args)
    if seams.prober is None:
        _check_interpreter(args.python_exe)
    prober = seams.prober or Prober(python_exe=args.python_exe)
    if args.stack:
        from lockgen.stack_doctor import run_stack_doctor

        return run_stack_doctor(m, prober, args.format, out)
    d = diagnose(m, prober.probe())
    if args.format == "json":
        json.dump(d.to_json(), out, indent=2)
        out.write("\n")
    else:
        out.write(format_diagnosis(d) + "\n")
    return EXIT_FAIL if d.verdict == BROKEN else EXIT_OK


# -- flake ----------------------------------------------------------------------------------


def _configure_flake(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nix-config", help="Nix facts file (default: nix.toml beside the matrix)")
    p.add_argument(
        "--output",
        "-o",
        help="where to write (default: flake.nix in the current folder; '-' for stdout)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 when the flake differs from the matrix",
    )
    p.add_argument(
        "--check-lock",
        metavar="FLAKE_LOCK",
        help="write nothing; exit 1 unless FLAKE_LOCK locks every nixpkgs input at the commit "
        "(and narHash) lockgen/data/nix.toml pins",
    )


def _run_flake(args: argparse.Namespace, out: TextIO, seams: Seams) -> int:
    from pathlib import Path

    from lockgen.flake import DEFAULT_FLAKE_PATH, generate, lock_problems, stale, write_flake
    from lockgen.formats.nix import load_nix_config

    m = _matrix(args)
    config = load_nix_config(args.nix_config, m)
    if args.check_lock:
        problems = lock_problems(config, Path(args.check_lock))
        for problem in problems:
            out.write(f"{problem}\n")
        if not problems:
            out.write(f"{args.check_lock}: every nixpkgs input is locked at its pinned commit\n")
        return EXIT_FAIL if problems else EXIT_OK
    text = generate(m, config)
    if args.output == "-":
        out.write(text)
        return EXIT_OK
    path = Path(args.output) if args.output else DEFAULT_FLAKE_PATH
    if args.check:
        diff = stale(path, text)
        if diff is None:
            out.write(f"{path} is up to date\n")
            return EXIT_OK
        out.write(f"{path} is stale; regenerate with `lockgen flake`:\n{diff}\n")
        return EXIT_FAIL
    write_flake(path, text)
    shells = sum(not t.is_stack for t in m.targets.values())
    out.write(f"wrote {path} ({shells} dev shells; none for LLM stack targets)\n")
    return EXIT_OK


# -- render / lock / verify / install ---------------------------------------------------------


def _channel_url(text: str) -> str:
    """A --channel value: a conda channel's URL (or a channel name), readable as a URL."""
    import urllib.parse

    try:
        url = urllib.parse.urlsplit(text)
        url.port  # noqa: B018 - a bad port is only found when read
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL ({exc})") from None
    if url.scheme and url.scheme not in ("http", "https", "file"):
        raise argparse.ArgumentTypeError(f"{text!r}: a channel is an http(s) or file URL")
    return text


def _envs_dir(args: argparse.Namespace, m):
    from pathlib import Path

    from lockgen.load import envs_dir_of

    return Path(args.envs) if getattr(args, "envs", None) else envs_dir_of(m.path)


def _selected_targets(args: argparse.Namespace, m) -> list:
    if args.all == bool(args.target):
        raise LockgenError(f"name one target or pass --all (targets: {', '.join(m.targets)})")
    return list(m.targets.values()) if args.all else [m.target(args.target)]


def _configure_target_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", help="a target of lockgen/data/targets.toml")
    p.add_argument("--all", action="store_true", help="every target")
    p.add_argument("--envs", help=ENVS_HELP)
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="also targets whose conda channel the matrix does not confirm "
        "(never one it says cannot supply the build)",
    )


def _configure_render(p: argparse.ArgumentParser) -> None:
    _configure_target_selection(p)
    p.add_argument(
        "--flavor",
        choices=("conda", "uv"),
        help="conda: envs/<target>.yml + envs/<target>.virtual-packages.yml; uv: "
        "envs/uv/<target>/pyproject.toml + .python-version (default: every flavor the "
        "target has)",
    )


def _render_flavors(args: argparse.Namespace, t) -> list[str]:
    if args.flavor:
        return [args.flavor]
    return (["conda"] if t.has_conda else []) + ["uv"]


def _run_render(args: argparse.Namespace, out: TextIO, seams: Seams) -> int:
    from lockgen.formats.conda import render_target
    from lockgen.formats.uv import render_uv

    m = _matrix(args)
    envs = _envs_dir(args, m)
    failed = 0
    for t in _selected_targets(args, m):
        for flavor in _render_flavors(args, t):
            if flavor == "conda" and args.all and not t.has_conda:
                out.write(f"skipped {t.name}: no conda channel (lockgen/data/targets.toml)\n")
                continue
            try:
                if flavor == "conda":
                    paths = render_target(m, t, envs, args.allow_unverified)
                else:
                    paths = render_uv(t, envs)
                for path in paths:
                    out.write(f"wrote {path}\n")
            except LockgenError as exc:
                if not args.all:
                    raise
                failed += 1
                out.write(f"refused {t.name} ({flavor}): {exc}\n")
    return EXIT_FAIL if failed else EXIT_OK


def _configure_lock(p: argparse.ArgumentParser) -> None:
    _configure_target_selection(p)
    p.add_argument(
        "--flavor",
        choices=("conda", "pip", "uv"),
        default="conda",
        help="conda: envs/<target>.lock (conda-lock format); pip: "
        "envs/<target>.requirements.txt with --hash lines (every platform and Python of the "
        "target); uv: `uv lock` of envs/uv/<target>",
    )
    p.add_argument(
        "--engine",
        choices=("rattler", "conda-lock"),
        default="rattler",
        help="rattler (embedded, default) or the real conda-lock (needs conda/mamba/micromamba)",
    )
    p.add_argument(
        "--channel",
        action="append",
        default=[],
        type=_channel_url,
        metavar="URL",
        help="solve against these channels instead of the target's (repeatable)",
    )
    p.add_argument("--conda", help="conda/mamba/micromamba executable for --engine conda-lock")
    p.add_argument("--index-url", help="pip flavor: resolve from this index instead")
    p.add_argument("--cache-dir", help="rattler's repodata cache folder")


def _progress_line(text: str) -> None:
    """Progress of long work, on stderr (stdout carries the results)."""
    sys.stderr.write(f"lockgen: {text}\n")
    sys.stderr.flush()


def _run_lock(args: argparse.Namespace, out: TextIO, seams: Seams) -> int:
    from pathlib import Path

    m = _matrix(args)
    envs = _envs_dir(args, m)
    failed = 0
    for t in _selected_targets(args, m):
        if args.flavor == "conda" and args.all and not t.has_conda:
            out.write(f"skipped {t.name}: no conda channel (lockgen/data/targets.toml)\n")
            continue
        try:
            if args.flavor == "pip":
                from lockgen.formats.pip import UvResolver, lock_pip
                from lockgen.verify import verify_file

                resolver = seams.pip_resolver or UvResolver(progress=_progress_line)
                path = lock_pip(t, envs, resolver, args.index_url)
                report = verify_file(path, m)
            elif args.flavor == "uv":
                from lockgen.formats.uv import lock_uv

                runner = {"run": seams.uv_runner} if seams.uv_runner else {}
                result = lock_uv(m, t, envs, **runner)
                path, report = result.path, result.report
            else:
                from lockgen.solve import lock_target, make_solver

                solver = seams.solver or make_solver(
                    args.engine, Path(args.cache_dir) if args.cache_dir else None, args.conda
                )
                result = lock_target(m, t, envs, solver, args.channel, args.allow_unverified)
                path, report = result.path, result.report
            out.write(f"wrote {path}\n{report.format()}\n")
            if not report.ok:
                failed += 1
        except LockgenError as exc:
            if not args.all:
                raise
            failed += 1
            out.write(f"failed {t.name}: {exc}\n")
    return EXIT_FAIL if failed else EXIT_OK


def _configure_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "lockfile",
        nargs="+",
        help="envs/<target>.lock, envs/<target>.requirements.txt or envs/uv/<target>/uv.lock",
    )
    p.add_argument("--envs", help="folder of envs/<target>.yml (default: the lockfile's)")
    p.add_argument(
        "--check-channels",
        action="store_true",
        help="also compare every hash with what the conda channel's repodata or the package "
        "index publishes (network; reads metadata only)",
    )
    _add_format(p, "text")


def _run_verify(args: argparse.Namespace, out: TextIO, seams: Seams) -> int:
    from pathlib import Path

    from lockgen.verify import verify_file, verify_or_report

    m = _matrix(args)
    envs = Path(args.envs) if args.envs else None
    if len(args.lockfile) == 1 and args.format != "json":  # one file: a bad one is a usage error
        reports = [verify_file(args.lockfile[0], m, envs, args.check_channels)]
    else:  # several, or JSON: a file that cannot be read is a failed report among the others
        reports = [verify_or_report(f, m, envs, args.check_channels) for f in args.lockfile]
    if args.format == "json":
        json.dump([r.to_json() for r in reports], out, indent=2)
        out.write("\n")
    else:
        out.write("\n".join(r.format() for r in reports) + "\n")
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAIL


def _configure_install(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "lockfile",
        help="a conda lockfile, envs/<target>.lock (a pip hash-lock installs with "
        "pip install --require-hashes -r FILE)",
    )
    p.add_argument(
        "--prefix",
        required=True,
        help="the environment folder to create (it must not exist, or be empty)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an environment already in --prefix (it is kept until the new one is "
        "complete, and restored if the install fails or is interrupted)",
    )
    p.add_argument("--platform", help="install the packages of this platform (default: host)")
    p.add_argument(
        "--no-driver-check",
        action="store_true",
        help="skip checking the NVIDIA driver against the lock's CUDA",
    )
    p.add_argument(
        "--cache-dir",
        help="keep the verified package archives here between installs (each is hashed "
        "again when used; extracted packages are never reused)",
    )


_PIP_LINE = re.compile(r"^(-|[A-Za-z0-9][A-Za-z0-9._-]*\s*(\[[^\]]*\])?\s*(==|>=|<=|~=|!=|===))")


def _pip_lock(path) -> bool:
    """Whether ``path`` reads as a pip requirements file (such as lockgen's pip hash-locks):
    its first line that is not a comment is a pip option or a pinned requirement."""
    try:
        with path.open("rb") as f:
            head = f.read(65536).decode("utf-8", "replace")
    except OSError:
        return False
    for line in head.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return bool(_PIP_LINE.match(line))
    return False


def _run_install(args: argparse.Namespace, out: TextIO, seams: Seams) -> int:
    from pathlib import Path

    from lockgen.install import install_lockfile

    lockfile = Path(args.lockfile)
    if _pip_lock(lockfile):
        raise LockgenError(
            f"{lockfile} is a pip requirements file; lockgen install takes a conda lockfile "
            f"(envs/<target>.lock). Install a pip hash-lock with pip itself: "
            f"pip install --require-hashes -r {lockfile}"
        )
    m = _matrix(args)
    res = install_lockfile(
        Path(args.lockfile),
        Path(args.prefix),
        m,
        platform=args.platform,
        prober=seams.prober,
        driver_check=not args.no_driver_check,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        force=args.force,
    )
    out.write(f"driver: {res.driver.message}\n")
    for w in res.warnings:
        out.write(f"warning: {w}\n")
    out.write(f"installed {res.packages} packages for {res.platform} into {res.prefix}\n")
    return EXIT_OK


# -- refresh-stack --------------------------------------------------------------------------


def _configure_refresh_stack(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--package", action="append", help="only this package (repeatable; default: all)"
    )
    p.add_argument(
        "--releases", type=int, default=8, help="newest final releases per package (default 8)"
    )
    p.add_argument(
        "--out",
        default="stack-pypi.new.toml",
        help="where to write the refreshed facts (default: %(default)s); the diff against "
        "lockgen's own data/stack-pypi.toml goes to stdout",
    )


def _run_refresh_stack(args: argparse.Namespace, out: TextIO, seams: Seams) -> int:
    import datetime
    from pathlib import Path

    from lockgen.load import DATA_DIR
    from lockgen.output import write_text
    from lockgen.pypi import urllib_get
    from lockgen.stack_refresh import PROBES, diff_against, refresh, to_toml

    if args.releases < 1:
        raise LockgenError("--releases must be at least 1")
    started = time.monotonic()
    facts = refresh(
        seams.pypi_get or urllib_get,
        args.package or tuple(PROBES),
        args.releases,
        lambda msg: print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr),
    )
    text = to_toml(facts, datetime.date.today().isoformat())
    write_text(Path(args.out), text)
    current = DATA_DIR / "stack-pypi.toml"
    old = current.read_text() if current.is_file() else ""
    out.write(diff_against(old, text, "data/stack-pypi.toml", args.out))
    print(
        f"read {len(facts)} releases of {len({f.package for f in facts})} packages in "
        f"{time.monotonic() - started:.1f}s; wrote {args.out}",
        file=sys.stderr,
    )
    return EXIT_OK


# -- registry -------------------------------------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command("matrix", "show the compatibility matrix", _configure_matrix, _run_matrix),
    Command(
        "targets", "list the environments the project generates", _configure_targets, _run_targets
    ),
    Command(
        "check",
        "check a torch/CUDA/cuDNN/Python/driver/GPU combination",
        _configure_check,
        _run_check,
    ),
    Command("doctor", "inspect this machine: verdict and fix", _configure_doctor, _run_doctor),
    Command("flake", "write flake.nix: a Nix dev shell per target", _configure_flake, _run_flake),
    Command(
        "render",
        "write envs/<target>.yml and its virtual packages (conda-lock input)",
        _configure_render,
        _run_render,
    ),
    Command(
        "lock",
        "solve a target into envs/<target>.lock (or a pip hash-lock)",
        _configure_lock,
        _run_lock,
    ),
    Command(
        "refresh-stack",
        "re-read the LLM stack's facts from PyPI; write them and print the diff",
        _configure_refresh_stack,
        _run_refresh_stack,
    ),
    Command("verify", "check a lockfile against its target", _configure_verify, _run_verify),
    Command(
        "install",
        "install a lockfile into a prefix without conda",
        _configure_install,
        _run_install,
    ),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: keep its exit code 2
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"lockgen: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lockgen",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--matrix",
        help="matrix file (default: $LOCKGEN_ENVS/matrix.toml if there is one, else lockgen's own)",
    )
    parser.add_argument("--targets", help="targets file (default: targets.toml beside the matrix)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(
    argv: Sequence[str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    *,
    prober: Prober | None = None,
    solver: Solver | None = None,
    pip_resolver: UvResolver | None = None,
    uv_runner: Runner | None = None,
    pypi_get: Get | None = None,
) -> int:
    """Run lockgen; returns the exit code. The keywords replace the real machine and solvers
    (:class:`Seams`; tests pass ``prober=Prober(...)`` to ``doctor``)."""
    seams = Seams(prober=prober, solver=solver, pip_resolver=pip_resolver, uv_runner=uv_runner,
                  pypi_get=pypi_get)  # fmt: skip
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(out)
        return EXIT_USAGE
    try:
        return args._run(args, out, seams)
    except LockgenError as exc:
        # one line, whatever an engine underneath wrote ("...\nCaused by: ..." from rattler)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        err.write(f"lockgen: error: {'; '.join(lines)}\n")
        return getattr(exc, "exit_code", EXIT_USAGE)
    except KeyboardInterrupt:  # outside an install (which handles its own): nothing half-done
        err.write("lockgen: interrupted\n")
        return 130


def run() -> NoReturn:
    """The ``lockgen`` program: :func:`main`, its output flushed, then ``os._exit`` with its
    code. Exiting without interpreter finalization keeps the status true: py-rattler's
    background threads can abort a finalizing interpreter (SIGABRT, exit 134) after a
    successful install. A reader that closes the pipe early (``lockgen matrix | head``) ends
    the program quietly, as SIGPIPE ends a C program (exit 141)."""
    try:
        rc = main()
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = EXIT_BROKEN_PIPE
    os._exit(rc)


if __name__ == "__main__":  # pragma: no cover
    run()

"""pip hash-locks per target: ``envs/<target>.requirements.txt``.

``lockgen lock <target> --flavor pip`` resolves torch, torchvision and the project's needs
(:data:`PIP_PROJECT_REQUIREMENTS`) once for every platform and Python of the target, with
uv's resolver (``uv pip compile --format pylock.toml --python-platform … --python-version …
--only-binary :all:``; it reads wheel metadata only, no multi-GB download), and writes exact
``==`` pins with the ``--hash`` of every chosen wheel as the index publishes it.

One file covers every platform and Python: a pin that holds everywhere has no marker; a pin
that holds only for some (platform, Python) pairs carries an environment marker naming them
(``; python_version == "3.10"``, or per platform: ``; (sys_platform == "linux" and
platform_machine == "x86_64")``). pip installs the pins whose markers hold on the machine
and checks each file's sha256 against the listed ones: ``pip install --require-hashes -r
FILE``.

Where the wheels come from is the target's :attr:`~lockgen.targets.Target.pip_source`: PyPI
when its torch *is* the target's build on every platform of the target, else the PyTorch
wheel index folder (``…/whl/cu126``), which is reachable only from the networked workflow
(``.github/workflows/lock.yml``). The file records target, index, platforms and Pythons in
``# lockgen:`` lines so that ``verify`` can check it.

The resolver is injectable (``UvResolver(run=...)``); it never touches this environment.

Verifying
---------
``verify_requirements(path, matrix, ...) -> Report`` and ``check_requirements``: the checks
``lockgen verify`` runs on a pip hash-lock. The wheel checks it shares with the uv format
(torch build, CUDA runtime, cuDNN, index hashes) live here too.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lockgen.errors import LockgenError
from lockgen.findings import Report
from lockgen.formats.locks import (
    check_file_name,
    exact_release_problem,
    marker_holds,
    marker_problem,
    read_lock_text,
    resolve_target,
    target_machines,
)
from lockgen.index import canonical_name
from lockgen.matrix import Matrix
from lockgen.output import write_text
from lockgen.stack_lock import CHECKED as STACK_CHECKED
from lockgen.stack_lock import check_stack_lock
from lockgen.targets import Target
from lockgen.versions import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PIP_PROJECT_REQUIREMENTS = ("numpy",)

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]
Combo = tuple[str, Version]  # (conda platform, Python)

_MACHINES = {"linux-64": "x86_64", "linux-aarch64": "aarch64"}
PLATFORM_MARKERS = {
    "linux-64": 'sys_platform == "linux" and platform_machine == "x86_64"',
    "linux-aarch64": 'sys_platform == "linux" and platform_machine == "aarch64"',
}


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True)


def cuda_runtime_package(cuda: Version) -> str:
    """The PyPI wheel of the CUDA runtime (``nvidia-cuda-runtime-cu12``; no suffix from 13)."""
    return "nvidia-cuda-runtime" if cuda.major >= 13 else f"nvidia-cuda-runtime-cu{cuda.major}"


def is_cuda_runtime_wheel(name: str) -> bool:
    """``nvidia-cuda-runtime`` or ``nvidia-cuda-runtime-cu12``, not another NVIDIA wheel."""
    return re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", name) is not None


def is_cudnn_wheel(name: str) -> bool:
    """``nvidia-cudnn-cu13`` (cuDNN itself), not ``nvidia-cudnn-frontend`` (its C++/Python
    API, versioned on its own)."""
    return re.fullmatch(r"nvidia-cudnn(-cu\d+)?", name) is not None


def uv_command() -> list[str]:
    """How to run uv: the ``uv`` package of this interpreter (``python -m uv``)."""
    import importlib.util

    if importlib.util.find_spec("uv") is None:
        raise LockgenError(
            "pip and uv locks are resolved by uv: pip install uv==0.13.9 (requirements-dev.txt)"
        )
    return [sys.executable, "-m", "uv"]


def uv_platform(platform: str, glibc: str = "2.28") -> str:
    """uv's ``--python-platform`` for a conda platform: ``x86_64-manylinux_2_28``."""
    if platform not in _MACHINES:
        raise LockgenError(
            f"no pip lock for platform {platform} (lockgen locks {', '.join(_MACHINES)} wheels)"
        )
    minor = Version.parse(glibc).padded(2)[1]
    return f"{_MACHINES[platform]}-manylinux_2_{minor}"


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str
    url: str


def _run_with_progress(
    run: Runner, argv: Sequence[str], progress: Callable[[str], None], tick_s: float
) -> subprocess.CompletedProcess:
    """``run(argv)``, reporting the elapsed time every ``tick_s`` seconds while it runs."""
    done: list = []

    def work():
        try:
            done.append(("ok", run(argv)))
        except BaseException as exc:  # re-raised below, in the caller's thread
            done.append(("error", exc))

    start = time.monotonic()
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while True:
        worker.join(tick_s)
        if not worker.is_alive():
            break
        progress(f"  still resolving ({time.monotonic() - start:.0f} s)")
    kind, value = done[0]
    if kind == "error":
        raise value
    return value


@dataclass
class UvResolver:
    """Resolves requirements for one platform and Python with ``uv pip compile``.

    ``progress`` (e.g. a line printer) hears what is resolved, from where, how long it has been
    running (every ``tick_s`` seconds) and what came out: a first resolve of CUDA wheels reads
    the metadata of GB-sized wheels and can take minutes."""

    run: Runner = _run
    uv: Sequence[str] = field(default_factory=uv_command)
    progress: Callable[[str], None] | None = None
    tick_s: float = 15.0

    def resolve(
        self,
        requirements: Sequence[str],
        index_url: str,
        python: Version,
        platform: str,
        glibc: str = "2.28",
    ) -> list[Wheel]:
        py = "{}.{}".format(*python.padded(2))
        with tempfile.TemporaryDirectory(prefix="lockgen-pip-") as tmp:
            src = Path(tmp) / "requirements.in"
            src.write_text("".join(f"{r}\n" for r in requirements))
            out = Path(tmp) / "pylock.toml"
            argv = [
                *self.uv,
                "pip",
                "compile",
                str(src),
                "--output-file",
                str(out),
                "--format",
                "pylock.toml",
                "--python-platform",
                uv_platform(platform, glibc),
                "--python-version",
                py,
                # any interpreter serves (markers come from the two flags above); naming one
                # spares uv a search for a Python of that version
                "--python",
                sys.executable,
                "--only-binary",
                ":all:",
                "--index-url",
                index_url,
                "--no-config",
                "--quiet",
            ]
            start = time.monotonic()
            if self.progress is None:
                res = self.run(argv)
            else:
                self.progress(
                    f"resolving {' '.join(requirements)} for {platform}, Python {py}, "
                    f"from {index_url}"
                )
                res = _run_with_progress(self.run, argv, self.progress, self.tick_s)
            if res.returncode != 0 or not out.exists():
                msg = (res.stderr or res.stdout or "").strip()[-3000:]
                raise LockgenError(
                    f"uv could not resolve {' '.join(requirements)} from {index_url} for "
                    f"{platform} + Python {py}:\n{msg}"
                )
            try:
                data = tomllib.loads(out.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise LockgenError(f"uv wrote an unreadable pylock.toml: {exc}") from None
        wheels = []
        for pkg in data.get("packages", []):
            name, version = pkg.get("name", "?"), pkg.get("version", "?")
            files = pkg.get("wheels") or []
            if not files:
                raise LockgenError(f"{name} {version}: the index has no wheel for {platform}")
            for w in files:
                sha = (w.get("hashes") or {}).get("sha256")
                if not sha:
                    raise LockgenError(
                        f"{name} {version}: the index published no sha256 for {w.get('url')}"
                    )
                wheels.append(Wheel(name, version, sha, w.get("url", "")))
        if not wheels:
            raise LockgenError(f"uv resolved nothing for {' '.join(requirements)}")
        if self.progress is not None:
            self.progress(f"  resolved {len(wheels)} wheels in {time.monotonic() - start:.0f} s")
        return wheels


def _pythons_marker(have: Sequence[Version], pythons: Sequence[Version]) -> str:
    if list(have) == list(pythons):
        return ""
    return " or ".join(f'python_version == "{py.raw}"' for py in have)


def combo_marker(combos: Sequence[Combo], target: Target) -> str:
    """The environment marker that holds exactly on ``combos`` among the target's
    (platform, Python) pairs; empty when it holds on all of them. The Pythons alone when
    every platform has the pin for the same ones, else one term per platform."""
    pythons = sorted(target.pythons)
    have = {p: sorted(py for q, py in combos if q == p) for p in target.platforms}
    shared = {tuple(v) for v in have.values()}
    if len(shared) == 1:
        return _pythons_marker(next(iter(have.values())), pythons)
    parts = []
    for platform, pys in have.items():
        if not pys:
            continue
        py = _pythons_marker(pys, pythons)
        parts.append(f"({PLATFORM_MARKERS[platform]}" + (f" and ({py}))" if py else ")"))
    return " or ".join(parts)


def requirements_text(target: Target, index_url: str, why: str, resolved: Mapping) -> str:
    """Pins with hashes from ``{(platform, python): [Wheel]}``; see the module docstring."""
    by_pin: dict[tuple[str, str], dict] = {}
    for combo, wheels in resolved.items():
        for w in wheels:
            entry = by_pin.setdefault(
                (canonical_name(w.name), w.version), {"combos": [], "hashes": set()}
            )
            if combo not in entry["combos"]:
                entry["combos"].append(combo)
            entry["hashes"].add(w.sha256)
    pythons = ",".join(p.raw for p in sorted(target.pythons))
    lines = [
        f"# Generated by `lockgen lock {target.name} --flavor pip`: exact pins and the sha256",
        f"# of every chosen wheel, as published by {index_url} ({why}).",
        f"# {target.summary()}; covers {', '.join(target.platforms)} x Python "
        f"{target.python_range}.",
        *(
            [f"# Needs glibc >= {target.glibc} (manylinux_2_{target.glibc.split('.')[1]} wheels)."]
            if target.glibc
            else []
        ),
        f"# Install: pip install --require-hashes -r envs/{target.name}.requirements.txt",
        f"# lockgen: target={target.name}",
        f"# lockgen: index-url={index_url}",
        f"# lockgen: platforms={','.join(target.platforms)} pythons={pythons}",
        f"--index-url {index_url}",
        "",
    ]
    for (name, version), entry in sorted(by_pin.items()):
        marker = combo_marker(entry["combos"], target)
        hashes = sorted(entry["hashes"])
        lines.append(f"{name}=={version}" + (f" ; {marker}" if marker else "") + " \\")
        lines += [
            f"    --hash=sha256:{h}" + (" \\" if i < len(hashes) - 1 else "")
            for i, h in enumerate(hashes)
        ]
    return "\n".join(lines) + "\n"


def requirements_path(envs_dir: Path, target: Target) -> Path:
    return Path(envs_dir) / f"{target.name}.requirements.txt"


def lock_pip(
    target: Target,
    envs_dir: Path,
    resolver: UvResolver | None = None,
    index_url: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Resolve every (platform, Python) of the target, check the torch build, then write
    ``envs/<target>.requirements.txt`` atomically."""
    resolver = resolver or UvResolver()
    source = target.pip_source
    url, why = source.url, source.why
    if index_url:
        url, why = index_url, "index given with --index-url"
    reqs = [*target.pip_requirements, *PIP_PROJECT_REQUIREMENTS]
    resolved: dict[Combo, list[Wheel]] = {}
    for platform in target.platforms:
        glibc = target.virtual_packages.get(platform, {}).get("__glibc", "2.28")
        for python in sorted(target.pythons):
            if progress:
                progress(f"resolving {target.name} for {platform} + Python {python}")
            resolved[(platform, python)] = resolver.resolve(reqs, url, python, platform, glibc)
    text = requirements_text(target, url, why, resolved)
    report = Report(str(requirements_path(envs_dir, target)), target.name)
    check_requirements(report, parse_requirements(text), target, check_index=False)
    build_errors = [
        f
        for f in report.findings
        if f.severity == "error" and f.code in ("torch", "cuda", "cudnn", "stack")
    ]
    if build_errors:
        raise LockgenError(
            f"{target.name}: {url} did not give the target's build (or a stack package "
            "that loads with it); not written:\n"
            + "\n".join(f"  {f.message}" for f in build_errors)
        )
    return write_text(requirements_path(envs_dir, target), text)


@dataclass
class Requirement:
    """One requirement line as pip reads it: ``name==version [; marker] --hash=...``.
    ``problems`` says why it breaks lockgen's rules (a direct URL, extras, no exact pin, an
    option other than ``--hash``); ``name`` is canonical, ``version`` the pinned text."""

    raw: str
    name: str
    version: str
    pinned: bool
    marker: str = ""
    hashes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Requirements:
    meta: dict[str, str]
    entries: list[Requirement]
    options: list[tuple[str, str]] = field(default_factory=list)  # (option, value) as pip reads

    @property
    def index_urls(self) -> list[str]:
        return [v for o, v in self.options if o == "--index-url"]


# pip's short option names, and the options of a requirements file that take a value
_LONG_NAMES = {
    "-i": "--index-url",
    "-f": "--find-links",
    "-r": "--requirement",
    "-c": "--constraint",
}
_TAKES_VALUE = {
    "--index-url",
    "--extra-index-url",
    "--find-links",
    "--requirement",
    "--constraint",
    "--trusted-host",
    "--editable",
    "-e",
}


def _option(item: str) -> tuple[str, str]:
    """``("--index-url", URL)`` of ``--index-url URL``, ``--index-url=URL``, ``-i URL``,
    ``-iURL``; the value is empty when the line gives none."""
    head, sep, value = item.partition("=") if item.startswith("--") else (item, "", "")
    if not sep:
        head, _, value = item.partition(" ")
        if head[:2] in _LONG_NAMES and len(head) > 2 and not head.startswith("--"):
            head, value = head[:2], head[2:] + (" " + value if value else "")
    name = _LONG_NAMES.get(head, head)
    return name, value.strip() if name in _TAKES_VALUE or sep else ""


# pip's own rules (pip._internal.req.req_file): a comment is ``#`` at the start of a line or
# after whitespace; a raw line ending in a backslash continues on the next, unless it is a
# comment, which ends the logical line; ${VAR} is taken from the environment.
_COMMENT = re.compile(r"(^|\s+)#.*$")


def _logical_lines(text: str) -> list[str]:
    """The logical lines pip reads from a requirements file: joined, comments dropped."""
    joined: list[str] = []
    buf: list[str] = []
    for line in text.splitlines():
        if not line.endswith("\\") or _COMMENT.match(line):
            if _COMMENT.match(line):
                line = " " + line
            if buf:
                joined.append("".join([*buf, line]))
                buf = []
            else:
                joined.append(line)
        else:
            buf.append(line.strip("\\"))
    if buf:
        joined.append("".join(buf))
    out = []
    for line in joined:
        line = _COMMENT.sub("", line).strip()
        if line:
            out.append(line)
    return out


def _shown(line: str) -> str:
    return line if len(line) <= 120 else line[:117] + "..."


def _split_args_options(line: str) -> tuple[str, str]:
    """pip's split of a line at its first space-separated token that starts with ``-``."""
    tokens = line.split(" ")
    for i, token in enumerate(tokens):
        if token.startswith("-"):
            return " ".join(tokens[:i]), " ".join(tokens[i:])
    return line, ""


def _hash_options(options: str, problems: list[str]) -> list[str]:
    """The ``--hash`` values of a requirement's options (``--hash=V`` or ``--hash V``); any
    other option is a problem (pip would obey it)."""
    import shlex

    try:
        tokens = shlex.split(options)
    except ValueError as exc:
        problems.append(f"unreadable options ({exc})")
        return []
    hashes = []
    it = iter(tokens)
    for token in it:
        if token.startswith("--hash="):
            hashes.append(token.removeprefix("--hash="))
        elif token == "--hash":
            hashes.append(next(it, ""))
        else:
            problems.append(f"option {token!r}: lockgen's pip locks give --hash and nothing else")
    return hashes


def _requirement(line: str) -> Requirement:
    """One requirement line, read as pip reads it (``packaging``'s grammar), with the
    problems that break lockgen's rules."""
    from lockgen.formats.pep508 import requirements

    InvalidRequirement, Pep508 = requirements.InvalidRequirement, requirements.Requirement

    problems: list[str] = []
    args, options = _split_args_options(line)
    hashes = _hash_options(options, problems)
    spec, _, marker = args.partition(";")
    marker = marker.strip()
    if "${" in line:
        problems.append("${...} is replaced from the environment by pip")
    try:
        req = Pep508(spec.strip())
    except InvalidRequirement as exc:
        problems.append(f"not a requirement pip reads as a name and a pin ({exc})")
        return Requirement(line, spec.strip(), "", False, marker, hashes, problems)
    name = canonical_name(req.name)
    if req.url:
        problems.append(f"a direct URL ({req.url}): pip would download it from there")
    if req.extras:
        problems.append(f"extras [{','.join(sorted(req.extras))}]")
    if req.marker:
        problems.append("a marker inside the requirement")
    specs = list(req.specifier)
    pinned = len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version
    version = specs[0].version if pinned else ""
    if not pinned and not req.url:
        problems.append(f"not pinned with == to one version ({spec.strip()})")
    return Requirement(line, name, version, pinned, marker, hashes, problems)


def parse_requirements(text: str) -> Requirements:
    """A requirements file as pip reads it (its line joining, comments and option syntax;
    ``packaging``'s requirement grammar): ``# lockgen:`` lines, every option line
    (``--index-url``, ``-i``, ``--extra-index-url``, ...: pip obeys each, so verify sees each),
    and ``name==version [; marker] --hash=...`` entries."""
    text = text.removeprefix("\ufeff")  # pip decodes a UTF-8 byte-order mark away
    meta: dict[str, str] = {}
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("# lockgen:"):
            for part in s.removeprefix("# lockgen:").split():
                k, _, v = part.partition("=")
                meta[k] = v
    entries = []
    options = []
    for item in _logical_lines(text):
        if item.startswith("-"):
            options.append(_option(item))
        else:
            entries.append(_requirement(item))
    return Requirements(meta, entries, options)


_MD5 = re.compile(r"^[0-9a-f]{32}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# -- pip hash-locks and uv locks: the checks they share ---------------------------------------


def sha256s(hashes) -> list[str]:
    return [h.removeprefix("sha256:") for h in hashes]


def check_index_hashes(report: Report, index: str, pins) -> None:
    """``pins``: (name, version, [sha256]) — every hash must be one the index publishes."""
    from lockgen.index import IndexHashes

    client = IndexHashes(index)
    for name, version, hashes in pins:
        try:
            published = client.release_hashes(name, version)
        except LockgenError as exc:
            report.error("hash", f"cannot compare hashes with {index}: {exc}")
            return
        if not published:
            report.error("hash", f"{name} {version}: {index} publishes no file of it")
            continue
        for h in hashes:
            if h not in published:
                report.error(
                    "hash",
                    f"{name} {version}: sha256 {h[:16]}... is not one {index} publishes for it",
                )


def check_cuda_runtime(report: Report, target: Target, runtimes, pypi: bool) -> None:
    """``runtimes``: (name, version) of the locked ``nvidia-cuda-runtime*`` wheels."""
    if target.is_cpu:
        if runtimes:
            names = ", ".join(f"{n} {v}" for n, v in runtimes)
            report.error("torch", f"the CPU target locks a CUDA runtime ({names})")
        return
    assert target.cuda is not None
    if not runtimes:
        if pypi:
            report.error(
                "torch",
                f"no {cuda_runtime_package(target.cuda)} in the lock: PyPI's CUDA "
                f"{target.cuda} torch requires it, so this torch is a CPU build",
            )
        return
    for name, version in runtimes:
        if not Version.parse(version.split("+")[0]).matches_prefix(target.cuda):
            report.error(
                "cuda", f"{name} {version} is not the CUDA {target.cuda} runtime of the target"
            )


def check_cudnn_wheels(report: Report, target: Target, cudnns) -> None:
    if target.cudnn is None:
        return
    for name, version in cudnns:
        if not Version.parse(version).matches_prefix(target.cudnn):
            report.error("cudnn", f"{name} {version}: the matrix says cuDNN {target.cudnn}")


def check_torch_wheel(
    report: Report, target: Target, what: str, version: str, want: Version, pypi: bool
) -> None:
    """The locked torch or torchvision is exactly the target's release and build: no other
    patch, no pre-, post- or dev release; from PyPI no local tag, else the target's."""
    local = version.partition("+")[2] if pypi else ""
    if local:
        report.error("torch", f"{what} {version}: PyPI builds carry no +{local}")
        return
    problem = exact_release_problem(what, version, want, None if pypi else target.tag)
    if problem:
        report.error("torch", problem)


def version_problem(name: str, version: str, pre_ok: bool = False) -> str | None:
    """Why a pinned version is not one lockgen locks: not PEP 440, or a pre- or dev release
    (a resolution never picks one unless asked to; ``pre_ok``: a pre-release is asked for,
    the target names the package in ``prereleases``)."""
    from lockgen.formats.pep508 import version as pep440

    InvalidVersion, Pep440 = pep440.InvalidVersion, pep440.Version
    try:
        v = Pep440(version)
    except InvalidVersion:
        return f"{name} {version!r} is not a PEP 440 version"
    if v.dev is not None or (v.pre and not pre_ok):
        return f"{name} {version} is a pre- or development release"
    return None


def check_installed_everywhere(
    report: Report, target: Target, installed, pypi: bool, listed=()
) -> None:
    """``installed``: ``{machine: {name: ...}}``; ``listed``: every name in the lock. torch
    and torchvision, and for a PyPI CUDA build the CUDA runtime, are installed on every
    machine the target promises."""
    if not installed:
        report.error("platform", f"lockgen knows the markers of none of {target.platforms}")
    needed = ["torch", "torchvision"]
    if pypi and target.cuda is not None:
        needed.append(canonical_name(cuda_runtime_package(target.cuda)))
    locked = {name for names in installed.values() for name in names} | set(listed)
    for what in needed:
        missing = [str(m) for m, names in installed.items() if what not in names]
        if what not in locked:
            report.error("torch", f"no {what} in the lock")
        elif missing:
            report.error(
                "platform",
                f"{what} is not installed on {', '.join(missing)} (its markers leave it out); "
                f"target {target.name} promises it on every platform x Python",
            )


# -- pip hash-locks ---------------------------------------------------------------------------


def check_requirements(report: Report, req, target: Target, check_index: bool) -> None:
    """Every check of a parsed pip hash-lock against its target (see the module docstring)."""
    if not req.entries:
        report.error("hash", "no requirements in the file")
    for e in req.entries:
        for problem in e.problems:
            report.error("pin", f"{e.name}: {problem}: {_shown(e.raw)}")
        if not e.hashes or not all(
            h.startswith("sha256:") and _SHA256.match(h.removeprefix("sha256:")) for h in e.hashes
        ):
            report.error("hash", f"{e.name}: missing or malformed --hash (sha256:<64 hex>)")
        if e.pinned and not e.problems:
            problem = version_problem(e.name, e.version, e.name in target.prereleases)
            if problem:
                report.error("pin", problem)
        if e.marker:
            problem = marker_problem(e.marker)
            if problem:
                report.error("marker", f"{e.name}: {problem}")
    want_platforms = ",".join(target.platforms)
    want_pythons = ",".join(p.raw for p in sorted(target.pythons))
    have = (req.meta.get("platforms", "?"), req.meta.get("pythons", "?"))
    if have != (want_platforms, want_pythons):
        report.error(
            "platform",
            f"the lock covers platforms {have[0]} x Pythons {have[1]}; target "
            f"{target.name} needs {want_platforms} x {want_pythons} (re-lock)",
        )
    source = target.pip_source
    _check_pip_options(report, req)
    index = req.index_urls[0] if len(req.index_urls) == 1 else ""
    if index.rstrip("/") != source.url.rstrip("/"):
        report.error(
            "index",
            f"resolved from {index or '?'}, but target {target.name}'s build comes from "
            f"{source.url}",
        )
    pypi = source.kind == "pypi"
    readable = [e for e in req.entries if e.pinned and not (e.marker and marker_problem(e.marker))]
    installed = _installed_per_machine(report, readable, target)
    by_name: dict[str, list] = defaultdict(list)
    for e in readable:
        by_name[e.name].append(e)
    for what, want in (("torch", target.torch), ("torchvision", target.torchvision)):
        for e in by_name.get(what, []):
            check_torch_wheel(report, target, what, e.version, want, pypi)
    check_installed_everywhere(report, target, installed, pypi, by_name)
    runtimes = [(e.name, e.version) for e in readable if is_cuda_runtime_wheel(e.name)]
    check_cuda_runtime(report, target, runtimes, pypi)
    cudnns = [(e.name, e.version) for e in readable if is_cudnn_wheel(e.name)]
    check_cudnn_wheels(report, target, cudnns)
    if target.is_stack:
        versions = {m: {n: e.version for n, e in names.items()} for m, names in installed.items()}
        check_stack_lock(report, target, versions)
    if check_index and index:
        check_index_hashes(
            report, index, [(e.name, e.version, sha256s(e.hashes)) for e in req.entries]
        )


def _installed_per_machine(report: Report, entries, target: Target) -> dict:
    """``{machine: {name: entry}}``: what pip installs on each machine the target promises,
    the entries whose markers hold there. Two entries of one name on one machine, and a
    marker that depends on the Python patch release, are errors."""
    installed: dict = {}
    for machine in target_machines(target):
        chosen: dict[str, Requirement] = {}
        for e in entries:
            holds = marker_holds(e.marker, machine)
            if holds is None:
                report.error(
                    "marker",
                    f"{e.name}: marker {e.marker!r} depends on the Python patch release on "
                    f"{machine}",
                )
            if holds is False:
                continue
            if e.name in chosen:
                report.error(
                    "pin",
                    f"{e.name}: listed twice for {machine} "
                    f"({_shown(chosen[e.name].raw)}; {_shown(e.raw)})",
                )
            chosen[e.name] = e
        installed[machine] = chosen
    return installed


def _check_pip_options(report: Report, req) -> None:
    """pip obeys every option line: the file must name one index and nothing else."""
    for option, value in req.options:
        if option != "--index-url":
            report.error(
                "index",
                f"{option} {value}".strip() + ": lockgen's pip locks name one --index-url and "
                "no other option (pip would obey it: another index, file or requirement)",
            )
    if len(req.index_urls) != 1:
        report.error("index", f"the file must name one --index-url, it names {len(req.index_urls)}")
    elif not req.index_urls[0]:
        report.error("index", "--index-url names no URL")
    recorded = req.meta.get("index-url")
    if recorded and req.index_urls and recorded != req.index_urls[0]:
        report.error(
            "index",
            f"the file says it was resolved from {recorded}, but its --index-url line sends pip "
            f"to {req.index_urls[0]}",
        )


def verify_requirements(
    path: Path, matrix: Matrix, target: Target | None = None, check_index: bool = False
) -> Report:
    path = Path(path)
    req = parse_requirements(read_lock_text(path, "pip requirements file", bom=True))
    name = req.meta.get("target") or path.name.removesuffix(".requirements.txt")
    report = Report(str(path), name)
    if target is None:
        target = resolve_target(matrix, name, report)
        if target is None:
            return report
        check_file_name(report, path, ".requirements.txt", target)
    report.target = target.name
    check_requirements(report, req, target, check_index)
    report.checked = [
        "pins",
        "hashes",
        "markers per platform x python",
        "index",
        "torch build",
        "CUDA",
    ]
    report.checked += ["index hashes"] if check_index else []
    report.checked += [STACK_CHECKED] if target.is_stack else []
    return report

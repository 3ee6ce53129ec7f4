"""pip hash-locks per target: ``envs/<target>.requirements.txt``.

``lockgen lock <target> --flavor pip`` resolves torch, torchvision and the project's needs
(:data:`PIP_PROJECT_REQUIREMENTS`) for the target's platforms and Python, with pip's own
resolver (``pip install --dry-run --report``, wheels only, ``--platform`` tags derived from
the target's ``__glibc``), and writes exact ``==`` pins with the ``--hash`` of every chosen
wheel as the index publishes it. Install with ``pip install --require-hashes -r FILE``.

Where the wheels come from (:func:`wheel_source`): PyPI when its torch *is* the target's
build (PyPI carries one CUDA build per release, ``pypi_default`` in the matrix, and only on
linux x86_64), else the PyTorch wheel index folder of the target (``…/whl/cu121``,
``…/whl/cpu``). The file records the index, so ``verify`` can check it.

The resolver is injectable (``PipResolver(run=...)``); it never touches this environment
(``--dry-run --ignore-installed --isolated``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lockgen.atomic import atomic_write_text
from lockgen.errors import LockgenError
from lockgen.matrix import Target
from lockgen.versions import Version

PIP_PROJECT_REQUIREMENTS = ("numpy",)

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True)


def wheel_source(target: Target) -> tuple[str, str]:
    """(index URL, why) for the target's torch wheels."""
    pypi = target.pip_channel.index_url
    if (
        not target.is_cpu
        and target.cuda == target.release.pypi_default_cuda
        and set(target.platforms) <= {"linux-64"}
    ):
        return pypi, (
            f"PyPI's torch {target.release.torch} for linux x86_64 is the CUDA {target.cuda} build"
        )
    return target.pip_index_url, f"the PyTorch wheel index folder for {target.tag}"


def platform_tags(platform: str, glibc: str = "2.28") -> list[str]:
    """pip ``--platform`` tags a conda platform accepts (newest first)."""
    g = Version.parse(glibc)
    gmin = g.padded(2)[1]
    if platform in ("linux-64", "linux-aarch64"):
        arch = "x86_64" if platform == "linux-64" else "aarch64"
        low = 5 if arch == "x86_64" else 17
        tags = [f"manylinux_2_{m}_{arch}" for m in range(gmin, low - 1, -1)]
        legacy = (
            ["manylinux2014"]
            if arch == "aarch64"
            else ["manylinux2014", "manylinux2010", "manylinux1"]
        )
        return tags + [f"{t}_{arch}" for t in legacy] + [f"linux_{arch}"]
    if platform == "win-64":
        return ["win_amd64"]
    raise LockgenError(f"no pip platform tags for {platform}")


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
class PipResolver:
    """Resolves requirements to wheels with hashes via ``pip install --dry-run --report``.

    ``progress`` (e.g. a line printer) hears what is resolved, from where, how long it has been
    running (every ``tick_s`` seconds) and what came out: a first resolve of CUDA wheels reads
    the metadata of GB-sized wheels and can take minutes."""

    run: Runner = _run
    python: str = sys.executable
    progress: Callable[[str], None] | None = None
    tick_s: float = 15.0

    def resolve(
        self, requirements: Sequence[str], index_url: str, python: Version, tags: Sequence[str]
    ) -> list[Wheel]:
        with tempfile.TemporaryDirectory(prefix="lockgen-pip-") as tmp:
            report = Path(tmp) / "report.json"
            py = python.padded(2)
            argv = [
                self.python,
                "-m",
                "pip",
                "--isolated",
                "install",
                "--dry-run",
                # Older pips (< 24) allow --platform only with --target; nothing is written there.
                "--target",
                str(Path(tmp) / "target"),
                "--ignore-installed",
                "--quiet",
                "--report",
                str(report),
                "--index-url",
                index_url,
                "--only-binary=:all:",
                "--python-version",
                f"{py[0]}.{py[1]}",
                "--implementation",
                "cp",
                "--abi",
                f"cp{py[0]}{py[1]}",
                "--abi",
                "abi3",
                "--abi",
                "none",
            ]
            for t in tags:
                argv += ["--platform", t]
            argv += list(requirements)
            start = time.monotonic()
            if self.progress is None:
                res = self.run(argv)
            else:
                self.progress(
                    f"resolving {' '.join(requirements)} for {tags[0]}, Python {py[0]}.{py[1]}, "
                    f"from {index_url}"
                )
                res = _run_with_progress(self.run, argv, self.progress, self.tick_s)
            if res.returncode != 0 or not report.exists():
                msg = (res.stderr or res.stdout or "").strip()[-3000:]
                raise LockgenError(
                    f"pip could not resolve {' '.join(requirements)} from {index_url}:\n{msg}"
                )
            data = json.loads(report.read_text())
        wheels = []
        for item in data.get("install", []):
            meta, info = item.get("metadata", {}), item.get("download_info", {})
            sha = ((info.get("archive_info") or {}).get("hashes") or {}).get("sha256")
            if not sha:
                raise LockgenError(
                    f"{meta.get('name')} {meta.get('version')}: the index "
                    f"published no sha256 for {info.get('url')}"
                )
            wheels.append(Wheel(meta["name"], meta["version"], sha, info.get("url", "")))
        if not wheels:
            raise LockgenError(f"pip resolved nothing for {' '.join(requirements)}")
        if self.progress is not None:
            self.progress(f"  resolved {len(wheels)} wheels in {time.monotonic() - start:.0f} s")
        return wheels


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


_MARKERS = {
    "linux-64": 'sys_platform == "linux" and platform_machine == "x86_64"',
    "linux-aarch64": 'sys_platform == "linux" and platform_machine == "aarch64"',
    "win-64": 'sys_platform == "win32"',
}


def requirements_text(
    target: Target, index_url: str, why: str, per_platform: dict[str, list[Wheel]]
) -> str:
    """Pins with hashes; a package whose version differs between platforms gets markers."""
    versions: dict[str, dict[str, Wheel]] = {}
    for platform, wheels in per_platform.items():
        for w in wheels:
            versions.setdefault(_canon(w.name), {})[platform] = w
    platforms = list(per_platform)
    lines = [
        f"# Generated by `lockgen lock {target.name} --flavor pip`: exact pins and the sha256",
        f"# of every wheel, as published by {index_url} ({why}).",
        f"# {target.summary()}",
        f"# Install: pip install --require-hashes -r envs/{target.name}.requirements.txt",
        f"# lockgen: target={target.name}",
        f"# lockgen: index-url={index_url}",
        f"# lockgen: platforms={','.join(platforms)} python={target.python}",
        f"--index-url {index_url}",
        "",
    ]
    for name in sorted(versions):
        by_plat = versions[name]
        groups: dict[str, list[str]] = {}
        for platform, w in by_plat.items():
            groups.setdefault(w.version, []).append(platform)
        for version, plats in sorted(groups.items()):
            hashes = sorted({by_plat[p].sha256 for p in plats})
            marker = ""
            if len(plats) < len(platforms):
                marker = " ; " + " or ".join(f"({_MARKERS[p]})" for p in plats)
            lines.append(f"{name}=={version}{marker} \\")
            lines += [
                f"    --hash=sha256:{h}" + (" \\" if i < len(hashes) - 1 else "")
                for i, h in enumerate(hashes)
            ]
    return "\n".join(lines) + "\n"


def lock_pip(
    target: Target,
    envs_dir: Path,
    resolver: PipResolver | None = None,
    index_url: str | None = None,
) -> Path:
    """Resolve and write ``envs/<target>.requirements.txt`` (atomically), then verify it."""
    resolver = resolver or PipResolver()
    url, why = wheel_source(target)
    if index_url:
        url, why = index_url, "index given with --index-url"
    reqs = [*target.pip_requirements, *PIP_PROJECT_REQUIREMENTS]
    per_platform = {}
    for platform in target.platforms:
        glibc = target.virtual_packages.get(platform, {}).get("__glibc", "2.28")
        per_platform[platform] = resolver.resolve(
            reqs, url, target.python, platform_tags(platform, glibc)
        )
    text = requirements_text(target, url, why, per_platform)
    parsed = parse_requirements(text)
    torch = next((e for e in parsed.entries if _canon(e.name) == "torch"), None)
    if torch is None:
        raise LockgenError(f"{target.name}: pip resolved no torch")
    local = Version.parse(torch.version).local
    if local is not None and local != target.tag:
        raise LockgenError(
            f"{target.name}: {url} gave torch {torch.version}, not the "
            f"{target.tag} build; not written"
        )
    path = Path(envs_dir) / f"{target.name}.requirements.txt"
    return atomic_write_text(path, text)


@dataclass
class Requirement:
    raw: str
    name: str
    version: str
    pinned: bool
    hashes: list[str] = field(default_factory=list)


@dataclass
class Requirements:
    meta: dict[str, str]
    entries: list[Requirement]


def parse_requirements(text: str) -> Requirements:
    """Enough of the requirements format for lockgen's own hash-locks."""
    meta: dict[str, str] = {}
    logical: list[str] = []
    buf = ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("# lockgen:"):
            for part in s.removeprefix("# lockgen:").split():
                k, _, v = part.partition("=")
                meta[k] = v
            continue
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        logical.append(buf + s)
        buf = ""
    if buf:
        logical.append(buf)
    entries = []
    for item in logical:
        if item.startswith("-"):
            if item.startswith("--index-url"):
                meta.setdefault("index-url", item.split(None, 1)[1].strip())
            continue
        parts = item.split()
        hashes = [p.split("=", 1)[1] for p in parts if p.startswith("--hash=")]
        spec = parts[0]
        pinned = "==" in spec
        name, _, version = spec.partition("==")
        entries.append(Requirement(item, name, version, pinned, hashes))
    return Requirements(meta, entries)

"""``lockgen refresh-stack``: re-read the LLM stack's PyPI facts and write them for review.

For each package of :data:`PROBES` it reads PyPI's JSON simple index, keeps the newest
``releases`` final releases, reads each release's core metadata (Requires-Python and the
Requires-Dist lines) and, for every Linux wheel that carries compiled code, the CUDA majors
its shared objects link (``DT_NEEDED``, through range requests; bitsandbytes: the CUDA
libraries it bundles, from the member names). The result is the text of ``stack-pypi.toml``;
the CLI writes it beside the committed copy and prints the unified diff. Every fact written
here was read from PyPI, so each is ``verified = true``; what PyPI cannot show stays in the
hand-kept ``stack.toml``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lockgen.pypi import (
    CUDA_LIB,
    File,
    Get,
    PypiError,
    Remote,
    cuda_majors,
    elf_needed,
    file_version,
    index_files,
    members,
    metadata,
)

PROBES: dict[str, str | None] = {
    # package -> the shared object whose DT_NEEDED tells its CUDA major (None: none read)
    "xformers": r"xformers/_C\.so",
    "vllm": r"vllm/cumem_allocator\.abi3\.so",
    "flash-attn": None,
    "bitsandbytes": r"bitsandbytes/libbitsandbytes_cuda(\d+)\.so",
    "torchao": r"torchao/_C[^/]*\.so",
    "torchaudio": r"torchaudio/lib/libtorchaudio(?:\.abi3)?\.so",
    "deepspeed": None,
    "triton": None,
    "liger-kernel": None,
    "transformers": None,
    "peft": None,
    "trl": None,
    "accelerate": None,
}
STACK_NAMES = frozenset({*PROBES, "torch", "torchvision", "kernels", "flashinfer-python"})
PRE = re.compile(r"(?:a|b|rc|dev)\d*", re.IGNORECASE)
Progress = Callable[[str], None]


@dataclass
class Artifact:
    file: File
    cuda: tuple[int, ...] = ()
    probed: str = ""
    needed: tuple[str, ...] = ()


@dataclass
class ReleaseFacts:
    package: str
    version: str
    uploaded: str
    requires_python: str
    requires: tuple[str, ...]
    metadata_from: str
    artifacts: list[Artifact] = field(default_factory=list)


def _final(version: str) -> bool:
    return bool(version) and not PRE.search(version.split("+")[0].split(".post")[0])


def _key(version: str) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in re.split(r"[.]|post", version))


def recent_releases(name: str, files: Iterable[File], count: int) -> dict[str, list[File]]:
    """The newest ``count`` final releases (by version), each with its files."""
    by: dict[str, list[File]] = {}
    for f in files:
        v = file_version(name, f.filename)
        if _final(v):
            by.setdefault(v, []).append(f)
    keep = sorted(by, key=_key, reverse=True)[:count]
    return {v: by[v] for v in keep}


def _metadata_file(files: list[File]) -> File:
    linux = [f for f in files if f.is_wheel and "linux" in f.tags[2] and "x86_64" in f.tags[2]]
    wheels = [f for f in files if f.is_wheel]
    return (linux or wheels or files)[0]


def _stack_requires(requires: Iterable[str]) -> tuple[str, ...]:
    """The Requires-Dist lines that name a package of the stack."""
    out = []
    for r in requires:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", r)
        if m and re.sub(r"[-_.]+", "-", m.group(1)).lower() in STACK_NAMES:
            out.append(r)
    return tuple(out)


def _probe(get: Get, name: str, f: File, pattern: str) -> Artifact:
    remote = Remote(get, f.url, f.size)
    names = members(remote)
    hits = sorted((m for n, m in names.items() if re.fullmatch(pattern, n)), key=lambda m: m.size)
    if not hits:
        return Artifact(f, probed="none found")
    if name == "bitsandbytes":  # one library per CUDA toolkit, named by it
        tk = sorted({int(re.fullmatch(pattern, m.name).group(1)) for m in hits})  # type: ignore[union-attr]
        return Artifact(
            f,
            tuple(sorted({t // 10 for t in tk})),
            "libbitsandbytes_cuda*.so",
            tuple(f"cuda{t}" for t in tk),
        )
    needed = elf_needed(remote, hits[0])
    cuda = tuple(n for n in needed if CUDA_LIB.fullmatch(n) or "cuda" in n)
    return Artifact(f, cuda_majors(needed), hits[0].name, cuda)


def read_release(get: Get, name: str, version: str, files: list[File]) -> ReleaseFacts:
    mf = _metadata_file(files)
    meta, _how = metadata(get, mf)
    rel = ReleaseFacts(
        name,
        version,
        min(f.uploaded for f in files),
        meta.requires_python,
        _stack_requires(meta.requires_dist),
        mf.filename,
    )
    pattern = PROBES.get(name)
    for f in sorted(files, key=lambda f: f.filename):
        if pattern and f.is_wheel and "linux" in f.tags[2]:
            rel.artifacts.append(_probe(get, name, f, pattern))
        else:
            rel.artifacts.append(Artifact(f))
    return rel


def refresh(
    get: Get,
    packages: Iterable[str] = tuple(PROBES),
    releases: int = 8,
    progress: Progress = lambda _: None,
) -> list[ReleaseFacts]:
    out: list[ReleaseFacts] = []
    for name in packages:
        if name not in PROBES:
            raise PypiError(f"unknown package {name!r} (known: {', '.join(PROBES)})")
        picked = recent_releases(name, index_files(get, name), releases)
        for i, (version, files) in enumerate(picked.items(), 1):
            progress(f"{name} {version} ({i}/{len(picked)})")
            out.append(read_release(get, name, version, files))
    return out


# -- TOML -------------------------------------------------------------------------------------


def _s(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _list(items: Iterable[object]) -> str:
    return "[" + ", ".join(_s(i) if isinstance(i, str) else str(i) for i in items) + "]"


def to_toml(facts: Iterable[ReleaseFacts], read_on: str) -> str:
    lines = [
        "# The LLM stack's facts as PyPI serves them: written by `lockgen refresh-stack`,",
        "# reviewed as a diff, never edited by hand. What PyPI cannot show is in stack.toml.",
        "schema = 1",
        "",
        "[sources]",
        f"pypi-index = {_s(f'PyPI JSON simple index (PEP 691) of the package, read {read_on}')}",
        "pypi-metadata = "
        + _s(
            "core metadata of the file named by metadata_from (PEP 658, or its METADATA / "
            f"PKG-INFO read by HTTP range requests), read {read_on}"
        ),
        "pypi-elf = "
        + _s(
            "DT_NEEDED of the shared object named by probed inside that wheel (bitsandbytes: "
            f"its bundled libbitsandbytes_cuda*.so), read by HTTP range requests, {read_on}"
        ),
    ]
    for r in facts:
        lines += [
            "",
            "[[release]]",
            f"package = {_s(r.package)}",
            f"version = {_s(r.version)}",
            f"uploaded = {_s(r.uploaded)}",
            f"requires_python = {_s(r.requires_python)}",
            f"requires = {_list(r.requires)}",
            f"metadata_from = {_s(r.metadata_from)}",
            'source = ["pypi-index", "pypi-metadata"]',
            "verified = true",
        ]
        for a in r.artifacts:
            py, abi, plat = a.file.tags
            lines += [
                "",
                "[[release.artifact]]",
                f"file = {_s(a.file.filename)}",
                f"python = {_s(py)}",
                f"abi = {_s(abi)}",
                f"platform = {_s(plat)}",
                f"size = {a.file.size}",
            ]
            if a.probed:
                lines += [
                    f"probed = {_s(a.probed)}",
                    f"cuda = {_list(a.cuda)}",
                    f"needed = {_list(a.needed)}",
                    'source = ["pypi-index", "pypi-elf"]',
                ]
            else:
                lines.append('source = ["pypi-index"]')
            lines.append("verified = true")
    return "\n".join(lines) + "\n"


def diff_against(current: str, new: str, current_name: str, new_name: str) -> str:
    import difflib

    return "".join(
        difflib.unified_diff(
            current.splitlines(keepends=True),
            new.splitlines(keepends=True),
            current_name,
            new_name,
        )
    )

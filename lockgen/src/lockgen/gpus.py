"""NVIDIA's GPU list: a GPU name as nvidia-smi prints it → its compute capability, and what
the driver must be for it.

The data is ``lockgen/data/gpus.toml`` (loaded by :mod:`lockgen.load`, which validates it); this
module holds the values and the name matching, no I/O.

Public API
----------
``GpuList.find(text) -> Gpu | None``
    Matches ``"NVIDIA H100 80GB HBM3"``, ``"Tesla V100-SXM2-16GB"``, ``"rtx 4090"``: case and
    punctuation do not matter, a leading ``NVIDIA`` / ``GeForce`` / ``Tesla`` is optional,
    trailing words (memory size, form factor, ``Laptop GPU``) are ignored and the longest
    matching name wins. Two equally long matches of different capability raise
    :class:`LockgenError`.
``GpuList.close_names(text)``
    Names that look like ``text``, for an "unknown GPU" error.
``GpuList.architecture(capability) -> Architecture | None``
    The family facts for a capability: ``first_cuda`` (the first toolkit for it) and
    ``last_driver`` (the last driver branch that supports it).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cached_property

from lockgen.errors import LockgenError
from lockgen.provenance import Provenance, Sourced
from lockgen.versions import Capability, Version

SEGMENTS = ("data_center", "workstation", "geforce", "jetson")
# Words nvidia-smi and NVIDIA's table put in front of a name, or leave out, for the same GPU.
_VENDOR_WORDS = frozenset({"nvidia", "geforce", "tesla"})


def name_key(text: str) -> tuple[str, ...]:
    """``"NVIDIA GeForce RTX 3090"`` → ``("rtx", "3090")``: lower case words, vendor words in
    front dropped."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    while words and words[0] in _VENDOR_WORDS:
        words = words[1:]
    return tuple(words)


@dataclass(frozen=True)
class Gpu(Sourced):
    """One GPU of NVIDIA's table."""

    name: str
    capability: Capability
    segment: str
    provenance: Provenance

    @cached_property
    def key(self) -> tuple[str, ...]:
        return name_key(self.name)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.capability.sm})"


@dataclass(frozen=True)
class Architecture(Sourced):
    """A GPU family: the capabilities it spans and the drivers that support it."""

    name: str
    capabilities: tuple[Capability, ...]
    first_cuda: Version | None
    last_driver: Version | None
    provenance: Provenance

    def covers(self, capability: Capability) -> bool:
        return any(c.canonical == capability.canonical for c in self.capabilities)


@dataclass(frozen=True)
class GpuList:
    gpus: tuple[Gpu, ...] = ()
    architectures: tuple[Architecture, ...] = ()

    def find(self, text: str) -> Gpu | None:
        words = name_key(text)
        if not words:
            return None
        hits = [g for g in self.gpus if g.key and words[: len(g.key)] == g.key]
        if not hits:
            return None
        longest = max(len(g.key) for g in hits)
        best = [g for g in hits if len(g.key) == longest]
        if len({g.capability.canonical for g in best}) > 1:
            names = ", ".join(g.label for g in best)
            raise LockgenError(f"GPU {text!r} is ambiguous: {names}; give its compute capability")
        return best[0]

    def close_names(self, text: str, n: int = 5) -> list[str]:
        by_key = {" ".join(g.key): g for g in self.gpus}
        wanted = " ".join(name_key(text))
        keys = difflib.get_close_matches(wanted, list(by_key), n=n, cutoff=0.5)
        # names that contain the words asked for come first
        contains = [k for k in by_key if wanted and wanted in k and k not in keys]
        return [by_key[k].label for k in (contains + keys)[:n]]

    def architecture(self, capability: Capability) -> Architecture | None:
        return next((a for a in self.architectures if a.covers(capability)), None)

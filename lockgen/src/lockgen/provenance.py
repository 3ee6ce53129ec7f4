"""Where a fact comes from: one :class:`Provenance` value (its sources, whether it has been
checked against them, a note) that every sourced fact of the matrix, the GPU list and the Nix
pins carries, and :class:`Sourced`, which reads it through (``fact.verified``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Provenance:
    source: tuple[str, ...]  # names of the file's [sources] entries
    verified: bool  # checked against those sources (else: believed, and said so)
    note: str = ""


class Sourced:
    """A fact with a ``provenance`` field; its parts read as the fact's own attributes."""

    provenance: Provenance

    @property
    def source(self) -> tuple[str, ...]:
        return self.provenance.source

    @property
    def verified(self) -> bool:
        return self.provenance.verified

    @property
    def note(self) -> str:
        return self.provenance.note

"""One module per environment format, each holding that format's constants, rendering,
parsing and verification: :mod:`~lockgen.formats.conda` (conda-lock specs and lockfiles),
:mod:`~lockgen.formats.pip` (hash-pinned requirements), :mod:`~lockgen.formats.uv` (uv projects
and ``uv.lock``), :mod:`~lockgen.formats.nix` (the flake's dev shells). What their
verifications share is in :mod:`~lockgen.formats.locks`; :mod:`lockgen.verify` dispatches a
file to its format."""

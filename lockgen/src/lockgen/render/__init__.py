"""Renderers: turn a target of the matrix into files other tools read (conda-lock input,
pip hash-locks, Nix flakes). One module per output format."""

"""The one exception family lockgen raises for bad input.

Every problem a user can cause (a malformed version, an unknown target, a broken matrix file)
is a :class:`LockgenError` with a message that names the problem. The CLI prints the message
and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class LockgenError(Exception):
    """Bad input: the message says what is wrong and, where it can, what would be right."""


class MatrixError(LockgenError):
    """A malformed or inconsistent facts file (matrix, targets, GPUs, Nix)."""

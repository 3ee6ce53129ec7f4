"""Values the training commands take (``gpufit mnist``, and commands like it): a rule per kind
of value, which refuses absurd input with a message naming the problem.

Each rule is a ``problem(value) -> str | None`` function, used twice: as an argparse type
(``parser(rule, convert)``: a usage error, exit 2) and on a config built in Python (the same
message). Torch-free, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

# torch's generators take 64-bit seeds, and torch's samplers seed each epoch with seed + epoch
SEED_MAX = 2**63 - 1


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def shown(value, limit: int = 40) -> str:
    """A value as a message shows it: at most ``limit`` characters."""
    text = str(value)
    return text if len(text) <= limit else f"{text[: limit - 12]}...({len(text)} characters)"


def whole_number(low: int, high: int | None = None, why: str = "") -> Callable[[object], str]:
    """Rule: an int (not a bool) from ``low`` to ``high``."""

    def problem(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{shown(repr(value))} is not a whole number"
        if value < low:
            return f"{shown(value)} must be at least {low}"
        if high is not None and value > high:
            return f"{shown(value)} must be at most {high:,}{f' ({why})' if why else ''}"
        return None

    return problem


def positive_number(high: float, why: str = "") -> Callable[[object], str]:
    """Rule: a finite float above 0 and at most ``high``."""

    def problem(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{shown(repr(value))} is not a number"
        if not (math.isfinite(value) and value > 0):
            return f"{value} must be a positive number"
        if value > high:
            return f"{value} must be at most {high}{f' ({why})' if why else ''}"
        return None

    return problem


def one_of(choices: tuple[str, ...]) -> Callable[[object], str]:
    def problem(value) -> str | None:
        if value not in choices:
            return f"{shown(repr(value))}: choose one of {', '.join(choices)}"
        return None

    return problem


def parser(rule: Callable[[object], str | None], convert: type) -> Callable[[str], object]:
    """An argparse ``type=`` that converts the text and applies ``rule``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            kind = "whole number" if convert is int else "number"
            raise argparse.ArgumentTypeError(f"{shown(repr(text))} is not a {kind}") from None
        problem = rule(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = convert.__name__  # argparse names the type in some messages
    return parse

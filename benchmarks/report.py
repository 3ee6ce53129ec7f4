"""Where every benchmark's results go: one JSON (written atomically) and one PNG per run."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

from fsatomic import write_atomic


def write(stem: Path, report: dict, plot: Callable[[Path], None]) -> None:
    """Write ``<stem>.json`` (with the machine and gpufit's active backend added) and draw
    ``<stem>.png``; a run that dies half-way leaves no half-written JSON, and runs writing
    the same stem at once never clash (the last one wins)."""
    import gpufit

    report = {**report, "machine": platform.platform(), "gpufit": gpufit.info().as_dict()}
    text = json.dumps(report, indent=2).encode()
    write_atomic(stem.with_suffix(".json"), lambda f: f.write(text))
    plot(stem.with_suffix(".png"))
    print(f"wrote {stem}.json and {stem}.png")

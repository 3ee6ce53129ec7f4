"""Where every benchmark's results go: one JSON (written atomically) and one PNG per run."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path


def write(stem: Path, report: dict, plot: Callable[[Path], None]) -> None:
    """Write ``<stem>.json`` (with the machine and gpufit's active backend added) and draw
    ``<stem>.png``; a run that dies half-way leaves no half-written JSON."""
    import gpufit

    report = {**report, "machine": platform.platform(), "gpufit": gpufit.info().as_dict()}
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(stem.with_suffix(".json"))
    plot(stem.with_suffix(".png"))
    print(f"wrote {stem}.json and {stem}.png")

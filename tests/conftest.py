"""Shared pytest setup: tests marked `cuda` run only where a CUDA GPU is visible; tests marked
`compiled` (the C++ kernels' own guards and memory behaviour) only where gpufit runs compiled
kernels, not on the pure-PyTorch reference backend (GPUFIT_BACKEND=reference)."""

import pytest


def _skip_marked(items, marker: str, reason: str) -> None:
    for item in items:
        if item.get_closest_marker(marker) is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_collection_modifyitems(config, items):
    markers = {m.name for item in items for m in item.iter_markers()}
    if not markers & {"cuda", "compiled"}:
        return  # no torch import for suites without such tests (lockgen's)
    import torch

    if "cuda" in markers and not torch.cuda.is_available():
        _skip_marked(items, "cuda", "needs a CUDA GPU (none visible)")
    if "compiled" in markers:
        from gpufit import ops

        if ops.BACKEND.kind == "reference":
            _skip_marked(items, "compiled", "tests compiled kernels; this run uses the reference")

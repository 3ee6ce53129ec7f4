"""Shared pytest setup: tests marked `cuda` run only where a CUDA GPU is visible."""

import pytest


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return  # no torch import for suites without CUDA tests (lockgen's)
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in marked:
        item.add_marker(skip)

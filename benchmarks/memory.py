"""Peak memory of a call: on CUDA from the allocator's own statistics, on the CPU (where torch
has no max_memory_allocated) from the profiler's allocation records."""

from __future__ import annotations

import os

import torch

# The profiler's C++ side (Kineto) logs its start and stop, and on a machine without a GPU a
# "gpuGetDeviceCount failed" error, to stderr; none of it concerns a CPU memory measure. Level 6
# keeps it quiet (read when the profiler first starts) unless the caller chose a level.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def peak_cpu_bytes(fn, *args) -> int:
    """Peak of the bytes allocated through torch's CPU allocator while fn(*args) runs, from the
    profiler's allocation records (allocations, not time; tensors alive before fn count 0)."""
    from torch.profiler._memory_profiler import Action

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        profile_memory=True,
        record_shapes=True,
        with_stack=True,
    ) as prof:
        fn(*args)
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def peak_bytes(device: str, fn, *args) -> int:
    """Peak bytes allocated beyond those alive before, while fn(*args) runs on ``device``."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*args)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return peak_cpu_bytes(fn, *args)

"""Peak memory of a call on the CPU, where torch has no max_memory_allocated."""

from __future__ import annotations

import torch


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

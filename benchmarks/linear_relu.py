"""Is fused_linear_relu faster than eager `relu(linear(x))` for forward + backward?

    python -m benchmarks.linear_relu [--device cpu|cuda] [--threads 1] [--out out/benchmarks]

Variants alternate within one run (eager, gpufit, eager, ...) so drift hits both alike; the
figure per variant is the median over rounds of the mean step time within a round. Writes
linear_relu_<device>.json and .png and prints eager/gpufit ratios (> 1 means gpufit is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks import report as report_out

# torch and gpufit are imported once the arguments are parsed, so --help answers at once.

# (name, batch, in_features, out_features)
SHAPES = {
    "cpu": [("mnist hidden", 64, 784, 256), ("wide", 1024, 1024, 1024)],
    "cuda": [("mnist hidden", 64, 784, 256), ("wide", 8192, 4096, 4096)],
}
DTYPES = {"cpu": ["float32"], "cuda": ["float32", "bfloat16"]}
VARIANT_NAMES = ("eager", "gpufit")


def variants() -> dict:
    """The compared functions: eager ``relu(linear(x))`` and gpufit's fused op."""
    import torch
    import torch.nn.functional as F

    import gpufit

    def eager(x, w, b):
        return torch.relu(F.linear(x, w, b))

    return {"eager": eager, "gpufit": gpufit.ops.fused_linear_relu}


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(fn, x, w, b, grad, steps: int, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(x, w, b)
        out.backward(grad)
    sync(device)
    return (time.perf_counter() - start) / steps


def peak_memory(fn, x, w, b, grad, device: str) -> int | None:
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(x, w, b).backward(grad)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_case(device, dtype, batch, k, n, rounds, steps):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, k, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype).requires_grad_()
    b = torch.randn(n, generator=g).to(device, dtype).requires_grad_()
    grad = torch.randn(batch, n, generator=g).to(device, dtype)
    fns = variants()
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: allocator, cuBLAS handles, first-call costs
        time_steps(fn, x, w, b, grad, 3, device)
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_steps(fn, x, w, b, grad, steps, device))
    result = {name: statistics.median(t) for name, t in times.items()}
    memory = {name: peak_memory(fn, x, w, b, grad, device) for name, fn in fns.items()}
    return result, memory


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['shape']}\n{r['dtype']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 2.2 * len(rows)), 4))
    width = 0.38
    for i, name in enumerate(VARIANT_NAMES):
        values = [r["step_us"][name] for r in rows]
        xs = [j + (i - 0.5) * width for j in range(len(rows))]
        ax.bar(xs, values, width, label=name)
    for j, r in enumerate(rows):
        ax.annotate(
            f"{r['speedup']:.2f}x", (j, max(r["step_us"].values())), ha="center", va="bottom"
        )
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("forward + backward, µs per step (lower is better)")
    ax.set_title(f"fused_linear_relu vs eager ({rows[0]['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (pinned)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per variant")
    parser.add_argument("--steps", type=int, default=0, help="steps per round (0: by size)")
    parser.add_argument(
        "--out", type=Path, default=Path("out/benchmarks"), help="folder for JSON and PNG"
    )
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in (getattr(torch, name) for name in DTYPES[args.device]):
        for shape, batch, k, n in SHAPES[args.device]:
            flops = 6 * batch * k * n
            steps = args.steps or max(5, min(2000, int(2e10 / flops)))
            times, memory = bench_case(args.device, dtype, batch, k, n, args.rounds, steps)
            row = {
                "device": args.device,
                "dtype": str(dtype).removeprefix("torch."),
                "shape": shape,
                "batch": batch,
                "in_features": k,
                "out_features": n,
                "steps_per_round": steps,
                "step_us": {name: t * 1e6 for name, t in times.items()},
                "peak_bytes": memory,
                "speedup": times["eager"] / times["gpufit"],
            }
            rows.append(row)
            print(
                f"{shape:>13} {row['dtype']:>8} ({batch}x{k}->{n}): eager "
                f"{row['step_us']['eager']:9.1f} µs  gpufit {row['step_us']['gpufit']:9.1f} µs"
                f"  eager/gpufit {row['speedup']:.2f}x",
                flush=True,
            )
    report = {"benchmark": "linear_relu", "threads": args.threads, "rows": rows}
    report_out.write(args.out / f"linear_relu_{args.device}", report, lambda p: plot(rows, p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

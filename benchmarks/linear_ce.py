"""How much memory and time does fused_linear_cross_entropy save over eager PyTorch?

    python -m benchmarks.linear_ce [--device cpu|cuda] [--dtype float32|bfloat16] [--quick]
                                   [--threads 1] [--rounds 3] [--out out/benchmarks]

Forward + backward of ``cross_entropy(x @ W.T + b, target)`` (mean, ignore_index=-100, x, W, b
all requiring grad) at N=4096, H=1024, V=32000 and V=128256 (``--quick``: N=2048, H=512,
V=32000 and V=128256), for:
  eager          F.cross_entropy(F.linear(x, W, b), target)
  torch-chunked  torch.nn.functional.linear_cross_entropy(..., options=LinearCrossEntropyOptions())
  gpufit         gpufit.ops.fused_linear_cross_entropy
  liger          LigerFusedLinearCrossEntropyLoss (CUDA only, when liger_kernel is importable)
Variants alternate within each round. Time: median over rounds of one forward + backward.
Memory: peak bytes allocated above what was allocated before the step (inputs and parameters
excluded; the gradients produced count). CUDA: torch.cuda.max_memory_allocated. CPU: the torch
profiler's allocation records (exact allocation sizes through torch's CPU allocator), measured
in a separate pass so the profiler does not distort the timings.
Writes linear_ce_<device>_<dtype>.json and .png and prints each variant's ratios to eager.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gpufit
from benchmarks import report as report_out
from benchmarks.memory import peak_cpu_bytes

SIZES = {
    False: [(4096, 1024, 32000), (4096, 1024, 128256)],
    True: [(2048, 512, 32000), (2048, 512, 128256)],
}
MIB = 1 << 20


def _variants(device: str) -> dict:
    variants = {
        "eager": lambda x, w, t, b: F.cross_entropy(F.linear(x, w, b), t),
        "torch-chunked": lambda x, w, t, b: F.linear_cross_entropy(
            x,
            w,
            t,
            linear_bias=b,
            ignore_index=-100,
            options=torch.nn.LinearCrossEntropyOptions(),
        ),  # fmt: skip
        "gpufit": lambda x, w, t, b: gpufit.ops.fused_linear_cross_entropy(x, w, t, b),
    }
    if not hasattr(F, "linear_cross_entropy"):  # torch < 2.13 has no native fused version
        print(f"torch {torch.__version__} has no F.linear_cross_entropy: skipping torch-chunked")
        del variants["torch-chunked"]
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            pass
        else:
            liger = LigerFusedLinearCrossEntropyLoss()
            variants["liger"] = lambda x, w, t, b: liger(w, x, t, b)
    return variants


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(fn, x, w, t, b) -> None:
    fn(x, w, t, b).backward()
    for p in (x, w, b):
        p.grad = None


def timed(fn, x, w, t, b, device) -> float:
    sync(device)
    start = time.perf_counter()
    step(fn, x, w, t, b)
    sync(device)
    return time.perf_counter() - start


def peak_bytes(fn, x, w, t, b, device) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(x, w, t, b).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        for p in (x, w, b):
            p.grad = None
        return peak
    peak = peak_cpu_bytes(lambda: fn(x, w, t, b).backward())
    for p in (x, w, b):
        p.grad = None
    return peak


def bench_case(device, dtype, n, h, v, rounds):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, h, generator=g)).to(device, dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    b = torch.zeros(v).to(device, dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::50] = -100
    t = t.to(device)
    variants = _variants(device)
    losses = {}
    with torch.no_grad():
        for name, fn in variants.items():
            losses[name] = float(fn(x, w, t, b).float())
    memory = {name: peak_bytes(fn, x, w, t, b, device) for name, fn in variants.items()}
    for fn in variants.values():  # warm-up (also after the memory pass: allocator caches)
        step(fn, x, w, t, b)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn, x, w, t, b, device))
    return {name: statistics.median(ts) for name, ts in times.items()}, memory, losses


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["seconds"])
    labels = [f"N={r['N']} H={r['H']}\nV={r['V']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 3.5 * len(rows)), 4))
    width = 0.8 / len(names)
    for ax, key, scale, unit in ((axes[0], "peak_bytes", 1 / MIB, "peak extra memory, MiB"),
                                 (axes[1], "seconds", 1e3, "forward + backward, ms")):  # fmt: skip
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [r[key][name] * scale for r in rows], width, label=name)
        ax.set_xticks(range(len(rows)), labels)
        ax.set_ylabel(unit + " (lower is better)")
        ax.legend(fontsize=8)
    fig.suptitle(f"fused linear + cross-entropy, {rows[0]['device']} {rows[0]['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="N=2048, H=512 instead of 4096, 1024")
    parser.add_argument("--vocab", type=int, nargs="*", help="only these vocabulary sizes")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (pinned)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    torch.set_num_threads(args.threads)
    rows = []
    for n, h, v in SIZES[args.quick]:
        if args.vocab and v not in args.vocab:
            continue
        seconds, memory, losses = bench_case(args.device, dtype, n, h, v, args.rounds)
        row = {
            "device": args.device, "dtype": dtype_name, "N": n, "H": h, "V": v,
            "seconds": seconds, "peak_bytes": memory, "loss": losses,
            "memory_vs_eager": {k: memory[k] / memory["eager"] for k in memory},
            "time_vs_eager": {k: seconds[k] / seconds["eager"] for k in seconds},
        }  # fmt: skip
        rows.append(row)
        print(f"N={n} H={h} V={v} {dtype_name} on {args.device}:", flush=True)
        for name in seconds:
            print(
                f"  {name:>13}: {memory[name] / MIB:9.1f} MiB ({row['memory_vs_eager'][name]:5.2f}"
                f" x eager)  {seconds[name] * 1e3:9.1f} ms ({row['time_vs_eager'][name]:5.2f} x "
                f"eager)  loss {losses[name]:.5f}",
                flush=True,
            )
    report = {
        "benchmark": "linear_ce",
        "threads": args.threads,
        "rounds": args.rounds,
        "rows": rows,
    }
    stem = args.out / f"linear_ce_{args.device}_{dtype_name}"
    report_out.write(stem, report, lambda p: plot(rows, p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

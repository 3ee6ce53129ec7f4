"""How much memory and time does fused_linear_cross_entropy save over eager PyTorch?

    python -m benchmarks.linear_ce [--device cpu|cuda] [--dtype float32|bfloat16] [--quick]
                                   [--sizes N,H,V ...] [--threads 1 2 ...] [--busy K]
                                   [--rounds R] [--out out/benchmarks]

Forward + backward of ``cross_entropy(x @ W.T + b, target)`` (mean, ignore_index=-100, x, W, b
all requiring grad) for:
  eager          F.cross_entropy(F.linear(x, W, b), target)
  torch-chunked  torch.nn.functional.linear_cross_entropy(..., options=LinearCrossEntropyOptions())
  gpufit         gpufit.ops.fused_linear_cross_entropy
  cce            Cut Cross-Entropy's linear_cross_entropy (when cut_cross_entropy is importable):
                 its torch_compile implementation on CPU, its CUDA kernel ("cce") on a GPU; it
                 takes no bias, so it gets none (the bias here is zero: the same loss, minus a
                 bias gradient that costs one pass over the logits); not with --quick on
                 the CPU, where its first call compiles for about 2 minutes on 2 cores
  liger          LigerFusedLinearCrossEntropyLoss (CUDA only, when liger_kernel is importable)
and, timed in the same rounds, the GEMM floor: the three GEMMs of the math alone (logits
x @ W.T + b, grad_x = G @ W, grad_W = G.T @ x, on the whole (N, V) matrix, no softmax), the
least any three-GEMM plan can take; each variant's time is also given as a multiple of it.
Sizes (N, H, V): CPU (256, 256, 32000) and (2048, 512, 32000) (--quick: the first); CUDA
(4096, 1024, 32000) and (4096, 1024, 128256) (--quick: N=2048, H=512). On the CPU each size runs
at 1 thread and at all cores (--threads to choose), side by side; --busy K keeps K busy-looping
processes beside the timed runs, as on a shared machine. Variants alternate within each round
(each round starting with the next one); time: the median over rounds of one forward +
backward. Memory: peak bytes allocated above what was allocated before the step (inputs and
parameters excluded; the gradients produced count); CUDA: torch.cuda.max_memory_allocated; CPU:
the torch profiler's allocation records, in a separate pass (benchmarks/memory.py). The load
average before and after is recorded.
Writes linear_ce_<device>_<dtype>.json and .png and prints each variant's ratios to eager.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    ("cpu", False): [(256, 256, 32000), (2048, 512, 32000)],
    ("cpu", True): [(256, 256, 32000)],
    ("cuda", False): [(4096, 1024, 32000), (4096, 1024, 128256)],
    ("cuda", True): [(2048, 512, 32000), (2048, 512, 128256)],
}
MIB = 1 << 20


def _variants(torch, device: str, quick: bool) -> dict:
    import torch.nn.functional as F

    import gpufit

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
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError:
        print("cut_cross_entropy is not installed: skipping cce")
    else:
        if quick and device == "cpu":
            print("--quick: skipping cce (on the CPU, torch.compile builds it on first use: "
                  "about 2 minutes on 2 cores)")  # fmt: skip
        else:
            impl = "cce" if device == "cuda" else "torch_compile"
            variants["cce"] = lambda x, w, t, b: cce(x, w, t, impl=impl)
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            pass
        else:
            liger = LigerFusedLinearCrossEntropyLoss()
            variants["liger"] = lambda x, w, t, b: liger(w, x, t, b)
    return variants


class Case:
    """One size on one device: the inputs, and timed or measured steps of each variant."""

    def __init__(self, torch, device, dtype, n, h, v):
        self.torch, self.device = torch, device
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
        self.w = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_()
        self.b = torch.zeros(v).to(device, dtype).requires_grad_()
        t = torch.randint(0, v, (n,), generator=g)
        t[::50] = -100
        self.t = t.to(device)

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def step(self, fn) -> None:
        fn(self.x, self.w, self.t, self.b).backward()
        self.x.grad = self.w.grad = self.b.grad = None

    def seconds(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        self.step(fn)
        self.sync()
        return time.perf_counter() - start

    def gemms(self) -> None:
        """The three GEMMs of forward + backward, alone (the result of the first stands in for
        the logits' gradient)."""
        with self.torch.no_grad():
            z = self.torch.addmm(self.b, self.x, self.w.t())
            self.torch.mm(z, self.w)
            self.torch.mm(z.t(), self.x)

    def floor_seconds(self, _fn=None) -> float:
        self.sync()
        start = time.perf_counter()
        self.gemms()
        self.sync()
        return time.perf_counter() - start

    def loss(self, fn) -> float:
        with self.torch.no_grad():
            return float(fn(self.x, self.w, self.t, self.b).float())

    def peak_bytes(self, fn) -> int:
        from benchmarks.memory import peak_bytes

        return peak_bytes(self.device, self.step, fn)


class BusyProcesses:
    """K processes that only spin, beside the timed runs (a shared machine); ended on exit."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> BusyProcesses:
        for _ in range(self.count):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


FLOOR = "gemm floor"


def time_case(case: Case, variants: dict, threads: int, rounds: int, progress) -> dict:
    """Median seconds of each variant and of the GEMM floor (FLOOR), alternating."""
    case.torch.set_num_threads(threads)
    for fn in variants.values():  # warm-up at this thread count
        case.step(fn)
    case.gemms()
    times = {name: [] for name in [*variants, FLOOR]}
    names = list(times)
    for r in range(rounds):
        # each round starts with another variant, so that none always runs after the same one
        for name in names[r % len(names) :] + names[: r % len(names)]:
            measure = case.floor_seconds if name == FLOOR else case.seconds
            times[name].append(measure(variants.get(name)))
        progress(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{name} {ts[-1] * 1e3:.0f} ms" for name, ts in times.items()
        ))  # fmt: skip
    return {name: statistics.median(ts) for name, ts in times.items()}


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["peak_bytes"])
    runs = [(r, th) for r in rows for th in r["seconds"]]
    floor_xs = list(range(len(runs)))
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 2.6 * len(runs) + 3), 4.2))
    width = 0.8 / len(names)
    mem_labels = [f"N={r['N']} H={r['H']}\nV={r['V']}" for r in rows]
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
        axes[0].bar(xs, [r["peak_bytes"][name] / MIB for r in rows], width, label=name)
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(runs))]
        axes[1].bar(xs, [r["seconds"][th][name] * 1e3 for r, th in runs], width, label=name)
    floors = [r["seconds"][th][FLOOR] * 1e3 for r, th in runs]
    axes[1].scatter(floor_xs, floors, marker="_", s=900, color="black", label=FLOOR, zorder=3)
    axes[0].set_xticks(range(len(rows)), mem_labels)
    axes[0].set_ylabel("peak extra memory, MiB (lower is better)")
    time_labels = [f"N={r['N']} V={r['V']}\n{th} thread{'s' * (th != '1')}" for r, th in runs]
    axes[1].set_xticks(range(len(runs)), time_labels, fontsize=8)
    axes[1].set_ylabel("forward + backward, ms (lower is better)")
    for ax in axes:
        ax.legend(fontsize=8)
    busy = rows[0]["busy_processes"]
    fig.suptitle(
        f"fused linear + cross-entropy, {rows[0]['device']} {rows[0]['dtype']}"
        + (f", {busy} busy process{'es' * (busy > 1)} beside it" if busy else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _progress(label: str):
    return lambda text: print(f"{label}: {text}", flush=True)


def _size(text: str) -> tuple[int, int, int]:
    try:
        n, h, v = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,H,V (three integers), got {text!r}") from None
    return n, h, v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="the smaller sizes only (on the CPU: without cce)")  # fmt: skip
    parser.add_argument("--sizes", type=_size, nargs="+", metavar="N,H,V",
                        help="these sizes instead")  # fmt: skip
    parser.add_argument("--threads", type=int, nargs="+",
                        help="CPU thread counts (default: 1 and all cores)")  # fmt: skip
    parser.add_argument("--busy", type=int, default=0, metavar="K",
                        help="K busy-looping processes beside the timed runs")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds (default: 5; 3 with --quick)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks"))
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5

    import torch  # after parsing: --help answers without loading torch

    from benchmarks import report as report_out

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    cores = torch.get_num_threads()
    if args.device == "cuda":
        threads = [cores]
    else:
        threads = args.threads or sorted({1, cores})
    sizes = args.sizes or SIZES[args.device, args.quick]
    variants = _variants(torch, args.device, args.quick)
    load_before = os.getloadavg()
    print(f"load average {load_before[0]:.2f}; {len(sizes)} sizes x threads {threads} x "
          f"{len(variants)} variants, {args.rounds} rounds", flush=True)  # fmt: skip
    rows = []
    with BusyProcesses(args.busy):
        for k, (n, h, v) in enumerate(sizes, 1):
            label = f"[{k}/{len(sizes)}] N={n} H={h} V={v} {dtype_name} on {args.device}"
            case = Case(torch, args.device, dtype, n, h, v)
            print(f"{label}: losses and peak memory", flush=True)
            torch.set_num_threads(cores)
            losses = {name: case.loss(fn) for name, fn in variants.items()}
            memory = {name: case.peak_bytes(fn) for name, fn in variants.items()}
            seconds = {}
            for th in threads:
                progress = _progress(f"{label}, {th} thread(s)")
                seconds[str(th)] = time_case(case, variants, th, args.rounds, progress)
            torch.set_num_threads(cores)
            rows.append({
                "device": args.device, "dtype": dtype_name, "N": n, "H": h, "V": v,
                "busy_processes": args.busy, "seconds": seconds, "peak_bytes": memory,
                "loss": losses,
                "memory_vs_eager": {m: memory[m] / memory["eager"] for m in memory},
                "time_vs_eager": {
                    th: {m: s[m] / s["eager"] for m in s} for th, s in seconds.items()
                },
                "time_vs_gemm_floor": {
                    th: {m: s[m] / s[FLOOR] for m in s} for th, s in seconds.items()
                },
            })  # fmt: skip
            del case
    load_after = os.getloadavg()
    for row in rows:
        print(f"N={row['N']} H={row['H']} V={row['V']} {dtype_name} on {args.device}"
              + (f" ({args.busy} busy beside)" if args.busy else "") + ":")  # fmt: skip
        head = "".join(f"  {th:>2} thread(s)            " for th in row["seconds"])
        print(f"  {'':>13}  {'peak memory':>22}{head}")
        for name in row["peak_bytes"]:
            mem = row["peak_bytes"][name]
            cells = "".join(
                f"  {per_variant[name] * 1e3:9.1f} ms ({row['time_vs_eager'][th][name]:5.2f}x)"
                for th, per_variant in row["seconds"].items()
            )
            print(f"  {name:>13}  {mem / MIB:8.1f} MiB ({row['memory_vs_eager'][name]:5.2f}x)"
                  f"{cells}   loss {row['loss'][name]:.5f}")  # fmt: skip
        floor = "".join(
            f"  {per_variant[FLOOR] * 1e3:9.1f} ms ({row['time_vs_eager'][th][FLOOR]:5.2f}x)"
            for th, per_variant in row["seconds"].items()
        )
        print(f"  {FLOOR:>13}  {'3 GEMMs alone':>22}{floor}")
        for th, per_variant in row["seconds"].items():
            ratios = ", ".join(
                f"{name} {row['time_vs_gemm_floor'][th][name]:.2f}x"
                for name in per_variant
                if name != FLOOR
            )
            print(f"  {th} thread(s), time over the GEMM floor: {ratios}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    report = {
        "benchmark": "linear_ce",
        "threads": threads,
        "busy_processes": args.busy,
        "rounds": args.rounds,
        "load_average": {"before": load_before, "after": load_after},
        "rows": rows,
    }
    suffix = f"_busy{args.busy}" if args.busy else ""
    stem = args.out / f"linear_ce_{args.device}_{dtype_name}{suffix}"
    report_out.write(stem, report, lambda p: plot(rows, p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

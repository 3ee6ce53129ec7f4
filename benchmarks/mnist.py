"""How much faster is gpufit's MNIST trainer than the PyTorch tutorial loop, and why?

    python -m benchmarks.mnist [--device cpu|cuda] [--threads 1] [--rounds 3] [--out out/benchmarks]

One epoch of the reference workload (MLP 784-256-10, Adam 1e-3, batch 64) on 60,000 synthetic
samples of MNIST's shape, five ways, alternating within one run (the order rotates per round):

  (a) tutorial    torchvision MNIST + ToTensor + Normalize per sample, DataLoader, eager model,
                  plain Adam: the loop as a PyTorch user writes it
  (b) eager       the same eager model and plain Adam on batches cut from device-resident tensors
  (b') eager-fused-adam
                  (b) with gpufit's optimizer step (fused Adam, the same as (d)): the two differ
                  only in the model's ops
  (c) compile     (b) with ``torch.compile(model)``
  (d) gpufit      gpufit's trainer: fused ops, device-resident data, fused Adam

The synthetic data is written as IDX files and read back through torchvision, so (a) runs the real
tutorial input pipeline. The figure per variant is the median epoch time over rounds. Per-step
times of (b), (c), (d) are also measured in short blocks of steps that alternate between them
(median over blocks), which is robust to load from other processes on a shared machine; the
per-step ratios use those. Goals on CPU: (a)/(d) >= 3 (end to end), (b)/(d) >= 1.4 and
(b')/(d) > 1 per step; on a GPU (b)/(d) >= 3. Writes mnist_<device>.json and mnist_<device>.png.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import report as report_out

# torch, numpy and gpufit are imported once the arguments are parsed, so --help answers at once.

TRAIN_SAMPLES = 60_000
TEST_SAMPLES = 1_000
VARIANTS = ("tutorial", "eager", "eager-fused-adam", "compile", "gpufit")
LABELS = {
    "tutorial": "(a) tutorial loop\nDataLoader+ToTensor",
    "eager": "(b) eager\nresident tensors",
    "eager-fused-adam": "(b') eager\nfused Adam",
    "compile": "(c) torch.compile\nresident tensors",
    "gpufit": "(d) gpufit",
}


def write_synthetic_mnist(root: Path, seed: int = 0):
    """Random MNIST-shaped IDX files under ``root``; returns their MNISTSource."""
    import numpy as np

    from gpufit import data as mnist_data

    rng = np.random.default_rng(seed)
    raw = mnist_data.raw_folder(root)
    for split, n in (("train", TRAIN_SAMPLES), ("test", TEST_SAMPLES)):
        images_name, labels_name = mnist_data.RAW_FILES[split]
        mnist_data.write_idx(raw / images_name, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        mnist_data.write_idx(raw / labels_name, rng.integers(0, 10, n, dtype=np.uint8))
    return mnist_data.resolve_source(root)


class EagerResident:
    """(b): the tutorial's model, loss and optimizer, fed from device-resident tensors."""

    def __init__(self, cfg, source, device, compile_model=False, fused_adam=False):
        import torch
        from torch import nn

        from gpufit import data as mnist_data
        from gpufit.examples import mnist

        train_set, _ = mnist_data.load_datasets(source)
        images, labels = mnist_data.to_tensors(train_set, device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.train_batches = mnist.ResidentBatches(
            images, labels, cfg.batch_size, self.generator, cfg.seed, mnist.Distributed()
        )
        torch.manual_seed(cfg.seed)
        self.model = mnist.MLP().to(device)
        self.train_model = torch.compile(self.model) if compile_model else self.model
        self.loss_fn = nn.CrossEntropyLoss()
        if fused_adam:  # the optimizer step of (d), gpufit's trainer
            self.optimizer = mnist._adam(self.model.parameters(), cfg.lr)
            self.optimizer_step = mnist.LeanAdamStep(self.optimizer)
        else:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
            self.optimizer_step = self.optimizer.step

    def steps_per_epoch(self):
        return len(self.train_batches)

    def batches(self, epoch):
        return self.train_batches.epoch(epoch)

    def train_step(self, X, y):
        loss = self.loss_fn(self.train_model(X), y)
        loss.backward()
        self.optimizer_step()
        self.optimizer.zero_grad()
        return loss


def build(variant, cfg, source, device):
    from gpufit.examples import mnist

    if variant == "tutorial":
        return mnist.TutorialTrainer(cfg, source, device, mnist.Distributed())
    if variant == "gpufit":
        return mnist.GpufitTrainer(cfg, source, device, mnist.Distributed())
    return EagerResident(
        cfg,
        source,
        device,
        compile_model=variant == "compile",
        fused_adam=variant == "eager-fused-adam",
    )


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_epoch(trainer, epoch, device, max_steps=None) -> tuple[float, int]:
    """(seconds, steps) of one training epoch, or of its first max_steps steps."""
    sync(device)
    start = time.perf_counter()
    steps = 0
    for x, y in trainer.batches(epoch):
        trainer.train_step(x, y)
        steps += 1
        if max_steps and steps >= max_steps:
            break
    sync(device)
    return time.perf_counter() - start, steps


def interleaved_step_times(trainers, device, blocks, block_steps) -> dict[str, list[float]]:
    """Per-step seconds of the resident variants, measured in short blocks that alternate
    between them (b, c, d, b, c, d, ...), so that load from other processes hits all alike."""
    names = [v for v in trainers if v != "tutorial"]
    iterators = {v: iter(()) for v in names}
    epochs = dict.fromkeys(names, 100)
    times = {v: [] for v in names}
    for _ in range(blocks):
        for v in names:
            trainer = trainers[v]
            batches = []
            while len(batches) < block_steps:  # fetched beforehand: the block times steps only
                try:
                    batches.append(next(iterators[v]))
                except StopIteration:
                    epochs[v] += 1
                    iterators[v] = iter(trainer.batches(epochs[v]))
            sync(device)
            start = time.perf_counter()
            for x, y in batches:
                trainer.train_step(x, y)
            sync(device)
            times[v].append((time.perf_counter() - start) / block_steps)
    return times


def warm_up(trainer, device, batch_size):
    run_epoch(trainer, 0, device, max_steps=20)
    # the epoch's short last batch is a new shape (torch.compile recompiles for it): meet it now
    last = TRAIN_SAMPLES % batch_size
    if last and hasattr(trainer, "train_batches"):
        images, labels = trainer.train_batches.images, trainer.train_batches.labels
        trainer.train_step(images[:last], labels[:last])
    sync(device)


def plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["variants"]
    names = [v for v in VARIANTS if v in rows]
    values = [rows[v]["epoch_s"] for v in names]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colors = {"tutorial": "#999", "eager": "#6a8", "eager-fused-adam": "#8b6", "compile": "#68a"}
    bars = ax.bar([LABELS[v] for v in names], values, color=[colors.get(v, "#d62") for v in names])
    base = rows[names[0]]["epoch_s"]
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            f"{value:.2f} s\n{base / value:.1f}x vs (a)",
            (bar.get_x() + bar.get_width() / 2, value),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_ylabel("seconds per epoch (lower is better)")
    ax.set_ylim(0, max(values) * 1.25)
    ax.set_title(
        f"MNIST MLP, {report['steps_per_epoch']} steps of batch {report['batch_size']} "
        f"({report['device']}, {report['threads']} thread(s))"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (pinned)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per variant")
    parser.add_argument("--steps", type=int, default=0, help="steps per timed epoch (0: all)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument(
        "--step-blocks", type=int, default=60, help="alternating blocks for per-step times"
    )
    parser.add_argument("--block-steps", type=int, default=25, help="steps per block")
    parser.add_argument(
        "--out", type=Path, default=Path("out/benchmarks"), help="folder for JSON and PNG"
    )
    args = parser.parse_args(argv)
    import torch

    from gpufit.examples import mnist

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = mnist.TrainConfig(batch_size=args.batch_size, seed=0, device=args.device)

    times: dict[str, list[float]] = {v: [] for v in variants}
    setup_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="gpufit-bench-mnist-") as tmp:
        source = write_synthetic_mnist(Path(tmp))
        trainers = {}
        for v in variants:
            start = time.perf_counter()
            trainers[v] = build(v, cfg, source, device)
            warm_up(trainers[v], device, args.batch_size)
            setup_s[v] = time.perf_counter() - start
            print(f"{v:>9}: set up and warmed up in {setup_s[v]:.1f} s", flush=True)
        steps = None
        for r in range(args.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                seconds, steps = run_epoch(trainers[v], r + 1, device, args.steps or None)
                times[v].append(seconds)
            print(
                f"round {r + 1}: " + ", ".join(f"{v} {times[v][-1]:.3f} s" for v in variants),
                flush=True,
            )
        step_times = interleaved_step_times(trainers, device, args.step_blocks, args.block_steps)

    rows = {
        v: {
            "epoch_s": statistics.median(times[v]),
            "step_ms": statistics.median(times[v]) / steps * 1e3,
            "epoch_s_all": times[v],
            "setup_and_warmup_s": setup_s[v],
        }
        for v in variants
    }
    for v, block_times in step_times.items():
        rows[v]["interleaved_step_ms"] = statistics.median(block_times) * 1e3
    ratios = {}
    if "gpufit" in rows:
        g = rows["gpufit"]
        if "tutorial" in rows:
            ratios["tutorial_over_gpufit_end_to_end"] = rows["tutorial"]["epoch_s"] / g["epoch_s"]
        for v in ("eager", "eager-fused-adam", "compile"):
            if v in rows:
                # per step: medians of the alternating blocks (robust to other load)
                ratios[f"{v}_over_gpufit_per_step"] = (
                    rows[v]["interleaved_step_ms"] / g["interleaved_step_ms"]
                )
                ratios[f"{v}_over_gpufit_per_epoch"] = rows[v]["epoch_s"] / g["epoch_s"]
    goals = (
        {
            "tutorial_over_gpufit_end_to_end": 3.0,
            "eager_over_gpufit_per_step": 1.4,
            "eager-fused-adam_over_gpufit_per_step": 1.0,
        }
        if args.device == "cpu"
        else {"eager_over_gpufit_per_step": 3.0}
    )
    report = {
        "benchmark": "mnist",
        "step_blocks": args.step_blocks,
        "block_steps": args.block_steps,
        "device": args.device,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "train_samples": TRAIN_SAMPLES,
        "steps_per_epoch": steps,
        "rounds": args.rounds,
        "variants": rows,
        "ratios": ratios,
        "goals": {k: {"goal": v, "met": ratios.get(k, 0) >= v} for k, v in goals.items()},
        "torch": torch.__version__,
    }
    for v in variants:
        interleaved = rows[v].get("interleaved_step_ms")
        print(
            f"{v:>9}: {rows[v]['epoch_s']:.3f} s/epoch, {rows[v]['step_ms']:.3f} ms/step"
            + (f" ({interleaved:.3f} ms/step in alternating blocks)" if interleaved else "")
        )
    for k, v in ratios.items():
        goal = goals.get(k)
        verdict = "" if goal is None else f"  (goal >= {goal}: {'met' if v >= goal else 'NOT met'})"
        print(f"{k}: {v:.2f}x{verdict}")
    report_out.write(args.out / f"mnist_{args.device}", report, lambda p: plot(report, p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

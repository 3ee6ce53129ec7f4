"""What ``gpufit mnist`` can be asked: the TrainConfig, its command-line flags, and the rule each
value must meet. Torch-free, so ``gpufit mnist --help`` answers at once; the training itself is
in gpufit.examples.mnist.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from gpufit.examples import options

IMPLS = ("torch", "gpufit")
DEVICES = ("auto", "cpu", "cuda")

# One thread: this model's GEMMs (64x784x256) are too small to split well, and a second thread
# stalls whenever another process holds a core. Measured on a shared 2-core machine, 10 epochs,
# 1 vs 2 threads: --impl gpufit 0.22-0.26 vs 1.2-2.8 s/epoch (others' load ~4), 0.58-0.91 vs
# 5.8-6.6 s/epoch with one more busy process beside it; --impl torch 2.4 vs 10.1 and 5.7 vs
# 17.8 s/epoch. --threads N overrides it.
DEFAULT_THREADS = 1


@dataclass
class TrainConfig:
    impl: str = "gpufit"
    epochs: int = 10
    batch_size: int = 64  # global batch: split evenly over the processes under torchrun
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    download: bool = False
    out: str | None = None
    resume: str | None = None
    overwrite: bool = False  # replace another run's checkpoint in --out
    limit_train: int | None = None  # first N samples only (smoke tests)
    limit_test: int | None = None
    threads: int = DEFAULT_THREADS
    quiet: bool = False


# field -> rule its value must meet (None: any value of the field's type)
RULES = {
    "impl": options.one_of(IMPLS),
    "epochs": options.whole_number(1, 100_000),
    "batch_size": options.whole_number(1, 1 << 20),
    "lr": options.positive_number(1.0, "Adam's learning rate; 1e-3 is the reference"),
    "seed": options.whole_number(0, options.SEED_MAX, "torch seeds are 64-bit; each epoch adds 1"),
    "device": options.one_of(DEVICES),
    "limit_train": options.whole_number(1, 10**9),
    "limit_test": options.whole_number(1, 10**9),
    "threads": options.whole_number(1, options.cpu_count(), "the CPUs this process may use"),
}


def config_problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with a config, one message per field ("--epochs 0 must be at least 1")."""
    problems = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        rule = RULES.get(f.name)
        if rule is None or value is None:
            continue
        problem = rule(value)
        if problem:
            problems.append(f"--{f.name.replace('_', '-')}: {problem}")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()

    def value(name, convert, help, **kw):
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=options.parser(RULES[name], convert),
            default=getattr(d, name),
            help=help,
            **kw,
        )

    parser.add_argument(
        "--impl",
        choices=IMPLS,
        default=d.impl,
        help="gpufit: fused ops, data resident on the device; torch: the tutorial loop as "
        "PyTorch users write it (default: %(default)s)",
    )
    value("epochs", int, "epochs to train (default: %(default)s)")
    value(
        "batch_size",
        int,
        "global batch size, split over the processes under torchrun (default: %(default)s)",
    )
    value("lr", float, "Adam's learning rate, at most 1 (default: %(default)s)")
    value("seed", int, "seed of the initial weights and the shuffle order (default: %(default)s)")
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default=d.device,
        help="auto: cuda if a GPU is visible, else cpu (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        help="folder holding MNIST/raw/ with the four IDX files (torchvision's layout); default: "
        "the 5,000-digit MNIST sample shipped with gpufit, or the cache with --download",
    )
    parser.add_argument(
        "--download", action="store_true", help="download MNIST with torchvision if missing"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="folder for metrics.json and checkpoint.pt, written after each epoch (default: "
        "none; with --resume, the checkpoint's folder)",
    )
    parser.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint.pt")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="let --out replace the checkpoint of another run or command there (without it, "
        "such a folder is refused; runs of the same settings share a folder)",
    )
    value("limit_train", int, "use only the first N training samples", metavar="N")
    value("limit_test", int, "use only the first N test samples", metavar="N")
    value(
        "threads",
        int,
        "CPU threads for torch (default: %(default)s, the fastest for this small model, also "
        "when other work shares the cores)",
        metavar="N",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar or epoch lines, only the summary"
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})

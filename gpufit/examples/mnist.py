"""MNIST, the classic tutorial workload, trained twice: as a PyTorch user writes it and with gpufit.

The workload: MLP 784 -> 256 -> 10 with ReLU, cross-entropy, Adam (lr 1e-3), batch 64, 10 epochs,
images normalised with mean 0.5 / std 0.5, test accuracy at the end.

  --impl torch    the tutorial loop as written: torchvision dataset with ToTensor + Normalize per
                  sample, a shuffling DataLoader, nn.Linear/nn.ReLU/nn.CrossEntropyLoss, plain
                  torch.optim.Adam.
  --impl gpufit   the same model and the same batches on gpufit's ops (fused_linear_relu for the
                  hidden layer, fused_linear_cross_entropy for the head and the loss), the whole
                  dataset converted once to tensors that stay on the device, and Adam's fused
                  (or foreach) kernel called without torch.optim's per-step Python overhead.

Both see identical batches in identical order from identical initial weights: the model is built
right after torch.manual_seed(seed), and the gpufit batches follow the permutation that the
tutorial's DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed)) draws
(under torchrun: DistributedSampler(shuffle=True, seed=seed)). So their losses agree step by step
up to fp32 rounding.

Run: ``gpufit mnist --impl gpufit`` or ``python -m gpufit.examples.mnist``; the same command
under ``torchrun --nproc_per_node=N`` trains with DistributedDataParallel (gloo on CPU, nccl on
GPU), ``--batch-size`` then being the global batch, split evenly over the processes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gpufit import data as mnist_data
from gpufit.examples import training
from gpufit.examples.mnist_config import (  # noqa: F401  (TrainConfig, IMPLS: this module's API)
    IMPLS,
    TrainConfig,
    add_arguments,
    config_from_args,
    config_problems,
)
from gpufit.examples.training import (  # noqa: F401  (re-exported for callers of mnist.*)
    Distributed,
    OutputError,
    UsageError,
    example_parser,
    save_checkpoint,
)
from gpufit.nn import FusedLinearReLU, fuse
from gpufit.ops import LinearCEOptions, run_fused_linear_cross_entropy

CHECKPOINT_FORMAT = "gpufit-mnist-checkpoint/1"
# A checkpoint holds the MLP's 203,530 weights and Adam's two moments (2.4 MiB) and a short
# history: anything much larger is not one, and is not read.
MAX_CHECKPOINT_BYTES = 64 * 2**20


# ================================================================ the model


class MLP(nn.Module):
    """784 -> 256 -> 10 with ReLU, as the tutorial writes it."""

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(nn.Linear(28 * 28, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.layers(self.flatten(x))


# The loss's options (the defaults: mean over all rows), validated once and not per step.
_MEAN_LOSS = LinearCEOptions()


class FusedMLP(MLP):
    """The same MLP on gpufit's ops: same parameters, initialisation and state_dict keys.

    ``forward(x)`` returns the logits; ``forward(x, target)`` returns the mean cross-entropy
    through gpufit's fused_linear_cross_entropy (the head's linear and the loss in one op, no
    logits kept for backward), so the whole training step runs inside forward, which
    DistributedDataParallel requires.
    """

    def __init__(self):
        super().__init__()
        fuse(self.layers)  # Linear+ReLU -> FusedLinearReLU; the ReLU's slot becomes Identity
        assert isinstance(self.layers[0], FusedLinearReLU) and isinstance(
            self.layers[1], nn.Identity
        )

    def forward(self, x, target=None):
        hidden = self.layers[0](x.flatten(1))
        head = self.layers[2]
        if target is None:
            return head(hidden)
        return run_fused_linear_cross_entropy(_MEAN_LOSS, hidden, head.weight, target, head.bias)


# ================================================================ the two implementations


class TutorialTrainer:
    """--impl torch: the tutorial loop, as a PyTorch user writes it."""

    name = "torch"

    def __init__(self, cfg: TrainConfig, source, device, dist: Distributed):
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        self.device = device
        training_data, test_data = mnist_data.load_datasets(
            source, transform=mnist_data.tutorial_transform()
        )
        training_data = mnist_data.take_first(training_data, cfg.limit_train)
        test_data = mnist_data.take_first(test_data, cfg.limit_test)
        self.train_size, self.test_size = len(training_data), len(test_data)

        self.generator = torch.Generator().manual_seed(cfg.seed)  # the shuffle order
        batch_size = cfg.batch_size // dist.world_size
        if dist.active:
            self.sampler = DistributedSampler(training_data, shuffle=True, seed=cfg.seed)
            self.train_dataloader = DataLoader(
                training_data, batch_size=batch_size, sampler=self.sampler
            )
        else:
            self.sampler = None
            self.train_dataloader = DataLoader(
                training_data, batch_size=batch_size, shuffle=True, generator=self.generator
            )
        self.test_dataloader = DataLoader(test_data, batch_size=batch_size)

        torch.manual_seed(cfg.seed)
        self.model = MLP().to(device)
        self.train_model = training.wrap_ddp(self.model, device, dist)
        self.loss_fn = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)

    def steps_per_epoch(self) -> int:
        return len(self.train_dataloader)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        for X, y in self.train_dataloader:
            yield X.to(self.device), y.to(self.device)

    def train_step(self, X, y):
        pred = self.train_model(X)
        loss = self.loss_fn(pred, y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss

    def evaluate(self) -> tuple[float, float]:
        """(mean test loss per sample, accuracy), the tutorial's test loop."""
        self.model.eval()
        test_loss, correct = 0.0, 0.0
        with torch.no_grad():
            for X, y in self.test_dataloader:
                X, y = X.to(self.device), y.to(self.device)
                pred = self.model(X)
                test_loss += self.loss_fn(pred, y).item() * len(y)
                correct += (pred.argmax(1) == y).type(torch.float).sum().item()
        self.model.train()
        return test_loss / self.test_size, correct / self.test_size


class ResidentBatches:
    """Mini-batches cut from tensors that stay on the device, in the order torch's samplers give.

    Single process: the order of ``DataLoader(dataset, shuffle=True, generator=g)``. Per epoch that
    loader draws, from ``g``, one int64 (its worker base seed, drawn even with no workers), then
    the permutation, then one more permutation that RandomSampler starts before it finds the
    epoch exhausted; drawing the same keeps ``g`` in lockstep with the tutorial's loader
    (tests/test_mnist.py checks this against DataLoader itself).
    Under torchrun: the order of ``DistributedSampler(dataset, shuffle=True, seed=seed)`` after
    ``set_epoch(epoch)``: a permutation seeded with seed + epoch, padded by wrapping around to a
    multiple of the world size, every world_size-th index from this rank's offset.
    """

    def __init__(self, images, labels, batch_size, generator, seed, dist: Distributed):
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.generator, self.seed, self.dist = generator, seed, dist
        n = len(labels)
        self.per_rank = math.ceil(n / dist.world_size) if dist.active else n

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.labels)
        if not self.dist.active:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            order = torch.randperm(n, generator=self.generator)
            torch.randperm(n, generator=self.generator)
            return order
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=g)
        total = self.per_rank * self.dist.world_size
        if total > n:
            order = order.repeat(math.ceil(total / n))[:total]
        return order[self.dist.rank : total : self.dist.world_size]

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order(epoch).to(self.images.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.images.index_select(0, index), self.labels.index_select(0, index)


def _adam(params, lr):
    """Adam with its fused kernel where this torch has one for the device, else foreach."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr, foreach=True)


class LeanAdamStep:
    """``optimizer.step()`` for a fused ``torch.optim.Adam``, minus its per-step bookkeeping.

    ``Adam(fused=True).step()`` spends about as long in Python (grouping tensors by device and
    dtype, hooks, profiler records) as in its kernel when the model is this small. This makes the
    same two calls that Adam's fused path makes, ``_foreach_add_`` on the step counters and
    ``torch._fused_adam_``, on the optimizer's own state, so results, state_dict and checkpoints
    are those of the torch optimizer (tests/test_mnist.py checks bit equality). Anything outside
    the plain case (several groups, amsgrad, a missing gradient, no state yet, no
    ``torch._fused_adam_`` in this torch) takes ``optimizer.step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        group = optimizer.param_groups[0]
        self.lean = (
            hasattr(torch, "_fused_adam_")
            and type(optimizer) is torch.optim.Adam
            and len(optimizer.param_groups) == 1
            and group.get("fused")
            and not group.get("amsgrad")
            and not group.get("capturable")
            and not group.get("differentiable")
            and not group.get("decoupled_weight_decay")
            and not group.get("maximize")
            and isinstance(group["lr"], float)
        )

    def __call__(self) -> None:
        optimizer = self.optimizer
        params = optimizer.param_groups[0]["params"]
        grads = [p.grad for p in params]
        states = [optimizer.state.get(p) for p in params]
        if not self.lean or any(g is None for g in grads) or any(not s for s in states):
            optimizer.step()
            return
        group = optimizer.param_groups[0]
        steps = [s["step"] for s in states]
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            steps,
            amsgrad=False,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )


class GpufitTrainer:
    """--impl gpufit: the same model and batches on fused ops and device-resident data."""

    name = "gpufit"

    def __init__(self, cfg: TrainConfig, source, device, dist: Distributed):
        self.device = device
        train_set, test_set = mnist_data.load_datasets(source)  # no per-sample transform
        train_set = mnist_data.take_first(train_set, cfg.limit_train)
        test_set = mnist_data.take_first(test_set, cfg.limit_test)
        train_images, train_labels = mnist_data.to_tensors(train_set, device)  # once
        self.test_images, self.test_labels = mnist_data.to_tensors(test_set, device)
        self.train_size, self.test_size = len(train_labels), len(self.test_labels)

        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.train_batches = ResidentBatches(
            train_images,
            train_labels,
            cfg.batch_size // dist.world_size,
            self.generator,
            cfg.seed,
            dist,
        )

        torch.manual_seed(cfg.seed)
        self.model = FusedMLP().to(device)
        self.train_model = training.wrap_ddp(self.model, device, dist)
        self.optimizer = _adam(self.model.parameters(), cfg.lr)
        self.optimizer_step = LeanAdamStep(self.optimizer)

    def steps_per_epoch(self) -> int:
        return len(self.train_batches)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.train_batches.epoch(epoch)

    def train_step(self, x, y):
        loss = self.train_model(x, y)
        loss.backward()
        self.optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def evaluate(self, chunk: int = 8192) -> tuple[float, float]:
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        with torch.inference_mode():
            for start in range(0, self.test_size, chunk):
                x = self.test_images[start : start + chunk]
                y = self.test_labels[start : start + chunk]
                logits = self.model(x)
                loss_sum += F.cross_entropy(logits, y, reduction="sum")
                correct += (logits.argmax(1) == y).sum()
        self.model.train()
        return loss_sum.item() / self.test_size, correct.item() / self.test_size


TRAINERS = {"torch": TutorialTrainer, "gpufit": GpufitTrainer}


# ================================================================ checkpoints

# settings that must match for a resumed run to continue the same run
_RESUME_KEYS = ("impl", "batch_size", "lr", "seed", "train_size", "test_size", "world_size")
# what a resume reads from a checkpoint
_CHECKPOINT_KEYS = ("format", "run", "epoch", "model", "optimizer", "rng", "history")
_HISTORY_KEYS = ("epoch", "steps", "train_loss", "test_loss", "test_accuracy")


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint of ``gpufit mnist``, checked for everything a resume reads before the model
    exists; a UsageError names what is wrong with it. ``resume_problems`` checks the rest."""
    state = training.read_checkpoint(path, max_bytes=MAX_CHECKPOINT_BYTES)
    problems = checkpoint_problems(state)
    if problems:
        raise UsageError(f"--resume {path}: {'; '.join(problems)}")
    return state


def checkpoint_problems(state) -> list[str]:
    """Why ``state`` is not a well-formed checkpoint of this format (empty when it is)."""
    describe = training.describe
    if not isinstance(state, dict):
        return [f"it holds {describe(state)}, not a gpufit MNIST checkpoint"]
    if "format" not in state:
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return [
                "it holds bare model weights (a state_dict), not a gpufit MNIST checkpoint: "
                "there is no optimizer state or epoch to resume from"
            ]
        return ["it is not a gpufit MNIST checkpoint (it has no 'format' entry)"]
    if state["format"] != CHECKPOINT_FORMAT:
        return [f"its format is {describe(state['format'])}; this gpufit reads {CHECKPOINT_FORMAT}"]
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        return [f"it lacks {', '.join(missing)}"]
    problems = []
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        problems.append(f"its epoch is {describe(epoch)}, not a count of finished epochs (>= 1)")
    if not isinstance(state["run"], dict):
        problems.append(f"its run settings are {describe(state['run'])}, not a dict")
    history = state["history"]
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        problems.append(f"its history is {describe(history)}, not a list of per-epoch metrics")
    elif isinstance(epoch, int) and len(history) != epoch:
        problems.append(f"its history has {len(history)} epochs, but its epoch is {epoch}")
    else:
        for number, metrics in enumerate(history, start=1):
            bad = [k for k in _HISTORY_KEYS if not _is_number(metrics.get(k))]
            if bad:
                problems.append(f"epoch {number} of its history lacks numbers for {', '.join(bad)}")
                break
    rng = state["rng"]
    if not isinstance(rng, dict) or not all(
        _is_rng_state(rng.get(k)) for k in ("torch", "shuffle")
    ):
        problems.append("its random number generator state is missing or damaged")
    return problems


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rng_state(value) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dtype == torch.uint8
        and value.shape == torch.get_rng_state().shape
    )


def resume_problems(state: dict, run_id: dict, trainer) -> list[str]:
    """Why a well-formed checkpoint cannot continue this trainer's run (empty when it can)."""
    model = training.model_state_problems(trainer.model, state["model"])
    if model:
        return [f"its model weights do not fit the 784-256-10 MLP: {'; '.join(model)}"]
    return training.adam_state_problems(trainer.optimizer, state["optimizer"])


def _rng_state(trainer, device) -> dict:
    state = {"torch": torch.get_rng_state(), "shuffle": trainer.generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(trainer, device, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    trainer.generator.set_state(state["shuffle"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ================================================================ the run


@dataclass
class RunResult:
    config: dict
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch
    step_losses: list[float] = field(default_factory=list)  # this invocation's steps only
    summary: dict = field(default_factory=dict)
    model: nn.Module | None = None


def _check_config(cfg: TrainConfig, dist: Distributed) -> None:
    problems = config_problems(cfg)
    if problems:
        raise UsageError("; ".join(problems))
    if cfg.batch_size % dist.world_size:
        raise UsageError(
            f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over "
            f"the {dist.world_size} processes"
        )


def train(cfg: TrainConfig) -> RunResult:
    """Train as configured and return the metrics; the CLI is a thin layer over this.

    Everything that can be checked before training is: the config, the output folder (a
    folder, writable, with room), and a checkpoint to resume from (well-formed, and fitting
    this run's model and optimizer). A problem raises UsageError before any epoch runs."""
    dist = Distributed.from_env()
    _check_config(cfg, dist)
    torch.set_num_threads(cfg.threads)
    device = training.pick_device(cfg.device, dist)
    resume_state = load_checkpoint(cfg.resume) if cfg.resume else None
    out = Path(cfg.out) if cfg.out else (Path(cfg.resume).parent if cfg.resume else None)
    if out is not None and dist.writer:
        training.check_output_dir(out, "--out" if cfg.out else "--resume's folder")
    with training.process_group(dist, device):
        return _train(cfg, dist, device, out, resume_state)


def _train(cfg, dist: Distributed, device, out: Path | None, resume_state) -> RunResult:
    progress = training.Progress(cfg.quiet or not dist.writer)
    source = mnist_data.resolve_source(cfg.data_dir, cfg.download)
    trainer = TRAINERS[cfg.impl](cfg, source, device, dist)
    run_id = {
        "impl": cfg.impl,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "train_size": trainer.train_size,
        "test_size": trainer.test_size,
        "world_size": dist.world_size,
    }
    result = RunResult(config={**asdict(cfg), **run_id, "device": str(device)})
    data_line = source.describe(trainer.train_size, trainer.test_size)

    first_epoch = 0
    if resume_state is not None:
        saved = resume_state["run"]
        mismatched = [k for k in _RESUME_KEYS if saved.get(k) != run_id[k]]
        if mismatched:
            detail = ", ".join(
                f"{k}: checkpoint {saved.get(k)} vs now {run_id[k]}" for k in mismatched
            )
            raise UsageError(f"--resume {cfg.resume} is from a different run ({detail})")
        first_epoch = resume_state["epoch"]
        if first_epoch >= cfg.epochs:
            raise UsageError(
                f"--resume {cfg.resume} has already trained {first_epoch} epochs; pass "
                f"--epochs larger than {first_epoch} to train on"
            )
        problems = resume_problems(resume_state, run_id, trainer)
        if problems:
            raise UsageError(f"--resume {cfg.resume}: {'; '.join(problems)}")
        try:
            trainer.model.load_state_dict(resume_state["model"])
            trainer.optimizer.load_state_dict(resume_state["optimizer"])
            _set_rng_state(trainer, device, resume_state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise UsageError(
                f"--resume {cfg.resume}: cannot be loaded ({training.first_line(err)})"
            ) from None
        result.history = list(resume_state["history"])
    claim = None
    if out is not None and dist.writer:
        flag = "--out" if cfg.out else "--resume's folder"
        claim = training.OutputClaim(out, CHECKPOINT_FORMAT, run_id, cfg.overwrite, flag)
        claim.check()
        checkpoint = training.state_bytes(trainer.model.state_dict()) * 3  # weights + 2 moments
        training.check_free_space(out, 2 * checkpoint + 2**20)

    threads = f"{cfg.threads} thread{'s' if cfg.threads > 1 else ''}"
    progress.line(
        f"training --impl {cfg.impl} on {device} ({threads}), {cfg.epochs} epochs of batch "
        f"{cfg.batch_size}: {data_line}"
    )
    steps = trainer.steps_per_epoch()
    for epoch in range(first_epoch, cfg.epochs):
        losses, sizes = [], []
        training.sync(device)
        start = time.perf_counter()
        for step, (x, y) in enumerate(trainer.batches(epoch), start=1):
            loss = trainer.train_step(x, y)
            losses.append(loss.detach())
            sizes.append(len(y))
            progress.update(epoch + 1, cfg.epochs, step, steps, loss, start, cfg.batch_size)
        training.sync(device)
        train_time = time.perf_counter() - start

        step_losses = torch.stack(losses)
        if dist.active:  # the global batch's loss: mean over ranks of equal-sized shares
            import torch.distributed as torch_dist

            torch_dist.all_reduce(step_losses)
            step_losses /= dist.world_size
        weights = torch.tensor(sizes, dtype=step_losses.dtype, device=step_losses.device)
        train_loss = (step_losses * weights).sum().item() / weights.sum().item()
        result.step_losses += step_losses.tolist()

        eval_start = time.perf_counter()
        test_loss, test_accuracy = trainer.evaluate()
        metrics = {
            "epoch": epoch + 1,
            "steps": len(sizes),
            "samples": sum(sizes) * dist.world_size,
            "train_loss": train_loss,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "train_time_s": train_time,
            "eval_time_s": time.perf_counter() - eval_start,
            "steps_per_s": len(sizes) / train_time,
            "samples_per_s": sum(sizes) * dist.world_size / train_time,
        }
        result.history.append(metrics)
        progress.line(epoch_line(metrics))
        result.summary = _summary(result, device, dist, cfg.threads)
        result.summary["data"] = data_line
        if claim is not None:
            claim.recheck()
            state = {
                "format": CHECKPOINT_FORMAT,
                "run": run_id,
                "config": result.config,
                "epoch": epoch + 1,
                "model": trainer.model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "rng": _rng_state(trainer, device),
                "history": result.history,
            }
            training.write_or_explain(out / "checkpoint.pt", lambda f, s=state: torch.save(s, f))
            metrics_doc = {"config": result.config, "epochs": result.history}
            metrics_doc["summary"] = result.summary
            training.write_or_explain(
                out / "metrics.json",
                lambda f, d=metrics_doc: f.write(json.dumps(d, indent=2).encode()),
            )
    result.model = trainer.model
    return result


def epoch_line(m: dict) -> str:
    return (
        f"epoch {m['epoch']}: train loss {m['train_loss']:.4f}, test loss "
        f"{m['test_loss']:.4f}, test accuracy {100 * m['test_accuracy']:.2f}% | "
        f"{m['train_time_s']:.2f} s, {m['steps_per_s']:,.0f} steps/s"
    )


def _summary(result: RunResult, device, dist: Distributed, threads: int) -> dict:
    history = result.history
    timed = [m for m in history if "train_time_s" in m]
    total_steps = sum(m["steps"] for m in timed)
    total_time = sum(m["train_time_s"] for m in timed)
    return {
        "impl": result.config["impl"],
        "epochs": len(history),
        "test_accuracy": history[-1]["test_accuracy"],
        "test_loss": history[-1]["test_loss"],
        "train_loss": history[-1]["train_loss"],
        "time_per_epoch_s": total_time / len(timed),
        "steps_per_s": total_steps / total_time,
        "device": str(device),
        "threads": threads,
        "world_size": dist.world_size,
    }


def summary_line(summary: dict) -> str:
    procs = f" x{summary['world_size']} processes" if summary["world_size"] > 1 else ""
    threads = summary["threads"]
    return (
        f"mnist --impl {summary['impl']}: test accuracy {100 * summary['test_accuracy']:.2f}% "
        f"after {summary['epochs']} epochs | {summary['time_per_epoch_s']:.3f} s/epoch, "
        f"{summary['steps_per_s']:,.0f} steps/s | {summary['device']}, {threads} "
        f"thread{'s' if threads > 1 else ''}{procs} | {summary['data']}"
    )


# ================================================================ command line


def run_cli(args: argparse.Namespace) -> int:
    prog = "gpufit mnist"
    try:
        result = train(config_from_args(args))
    except (UsageError, OutputError, mnist_data.MNISTDataError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except ModuleNotFoundError as err:
        if err.name != "torchvision":
            raise
        print(
            f"{prog}: error: this example loads MNIST with torchvision, which is not installed; "
            "install the torchvision release that matches your torch (pip install torchvision)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    if Distributed.from_env().writer:
        print(summary_line(result.summary), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    return example_parser(
        "python -m gpufit.examples.mnist",
        "MNIST MLP (784-256-10): the PyTorch tutorial loop or gpufit's fused version",
        add_arguments,
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

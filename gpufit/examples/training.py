"""Plumbing every training command needs, whatever it trains: the process group under torchrun,
the device, a progress line, an output folder checked before training starts, and checkpoints
that are written atomically and checked field by field before a resume trusts them.

Errors a user can fix are raised as UsageError (exit 2) or OutputError (exit 1), each with one
line naming the problem; the commands print them without a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fsatomic import write_atomic


def example_parser(prog: str, description: str, add_arguments) -> argparse.ArgumentParser:
    """The command line of one example: its name as ``python -m`` runs it, its one-line
    description and the arguments its config module declares."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return parser


class UsageError(RuntimeError):
    """A request that cannot be run as given (bad device, a malformed checkpoint, ...)."""


class OutputError(RuntimeError):
    """Results could not be written (a full disk mid-run, ...); what was written stays whole."""


# ================================================================ processes and devices


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False  # launched by torchrun (even with a single process)

    @classmethod
    def from_env(cls) -> Distributed:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            return cls(
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                active=True,
            )
        except ValueError as err:
            raise UsageError(f"RANK/WORLD_SIZE/LOCAL_RANK are not whole numbers ({err})") from None

    @property
    def writer(self) -> bool:
        """Whether this process writes results (rank 0 only)."""
        return self.rank == 0


@contextmanager
def process_group(dist: Distributed, device: torch.device) -> Iterator[None]:
    """The torchrun process group (nccl on GPUs, gloo on CPU) for the duration, if launched so."""
    if not dist.active:
        yield
        return
    import torch.distributed as torch_dist

    created = not torch_dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if created and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def wrap_ddp(model: nn.Module, device: torch.device, dist: Distributed) -> nn.Module:
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def pick_device(requested: str, dist: Distributed) -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {requested!r}: choose cpu, cuda or auto")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank if dist.active else torch.cuda.current_device())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ================================================================ progress


class Progress:
    """A one-line progress bar on stderr (only on a terminal), and a line per epoch unless quiet."""

    def __init__(self, quiet: bool, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.bar = not quiet and self.stream.isatty()
        self._last = 0.0

    def line(self, text: str) -> None:
        if self.bar:
            self.stream.write("\r\033[K")
        if not self.quiet:
            self.stream.write(text + "\n")
            self.stream.flush()

    def update(self, epoch, epochs, step, steps, loss, start_time, batch_size):
        if not self.bar:
            return
        now = time.perf_counter()
        if now - self._last < 0.1 and step != steps:
            return
        self._last = now
        elapsed = max(now - start_time, 1e-9)
        width = 24
        filled = int(width * step / steps)
        self.stream.write(
            f"\repoch {epoch}/{epochs} [{'#' * filled}{'.' * (width - filled)}] {step}/{steps} "
            f"loss {loss.item():.4f} | {step / elapsed:,.0f} steps/s "
            f"{step * batch_size / elapsed:,.0f} samples/s"
        )
        self.stream.flush()


# ================================================================ the output folder


def check_output_dir(folder: str | Path, flag: str = "--out") -> Path:
    """Make sure results can be written to ``folder`` before any training: it is (or can be
    made) a folder, and a file can be written, flushed and renamed in it. Raises UsageError
    naming the problem (a file, read-only, full); leaves nothing behind."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a name of its own: runs sharing the folder check it at the same time
        probe = folder / f".gpufit-write-check.{os.getpid()}.{secrets.token_hex(4)}"
        write_atomic(probe, lambda f: f.write(b"\0" * 4096))
        probe.unlink()
    except OSError as err:
        raise UsageError(f"{flag} {folder}: cannot write there ({_reason(err)})") from None
    return folder


@dataclass
class OutputClaim:
    """The files of one run in an output folder: ``checkpoint.pt`` (whose ``format`` names the
    command and whose ``run`` holds the settings that make a run the same job) and
    ``metrics.json``. A run may write there only while the folder holds nothing of another
    command or run: runs of the same job share it (the last writer's files remain), anything
    else is refused unless ``overwrite``.

    ``check()`` before training (UsageError); ``recheck()`` before each write (OutputError: a
    different run started writing there meanwhile)."""

    folder: Path
    format: str
    run: dict
    overwrite: bool = False
    flag: str = "--out"

    def problem(self) -> str | None:
        """Why this run must not write into the folder (None when it may)."""
        checkpoint = self.folder / "checkpoint.pt"
        if not os.path.lexists(checkpoint):
            if os.path.lexists(self.folder / "metrics.json"):
                return "holds a metrics.json but no checkpoint.pt, so not this run's results"
            return None
        try:
            state = read_checkpoint(checkpoint, "", mmap=True)
        except UsageError:
            state = None
        if not isinstance(state, dict) or not isinstance(state.get("format"), str):
            return "holds a checkpoint.pt that is not a gpufit checkpoint"
        if state["format"] != self.format:
            return f"holds the checkpoint of another command ({state['format']})"
        saved = state.get("run")
        if saved != self.run:
            if not isinstance(saved, dict):
                return "holds a checkpoint of another run"
            differ = [k for k in self.run if saved.get(k) != self.run[k]] or sorted(saved)
            detail = ", ".join(
                f"{k}: {saved.get(k)!r} there, {self.run.get(k)!r} now" for k in differ[:3]
            )
            return f"holds the checkpoint of another run ({detail})"
        return None

    def check(self) -> None:
        problem = None if self.overwrite else self.problem()
        if problem:
            raise UsageError(
                f"{self.flag} {self.folder} {problem}; pass --overwrite to replace it, or "
                "choose another folder"
            )

    def recheck(self) -> None:
        problem = None if self.overwrite else self.problem()
        if problem:
            raise OutputError(
                f"{self.flag} {self.folder}: another run wrote there during this one; it "
                f"{problem}. Nothing of this run was written over it"
            )


def check_free_space(folder: Path, need_bytes: int, flag: str = "--out") -> None:
    """Refuse to start when ``folder`` lacks room for what a run will write."""
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise UsageError(
            f"{flag} {folder}: only {free / 2**20:.1f} MiB free, and a run writes about "
            f"{need_bytes / 2**20:.1f} MiB there (a checkpoint and its replacement)"
        )


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def write_or_explain(path: Path, write) -> None:
    """``write_atomic`` for results written during training: an I/O error becomes an
    OutputError saying that the previous version of the file is intact."""
    try:
        write_atomic(path, write)
    except OSError as err:
        raise OutputError(
            f"cannot write {path} ({_reason(err)}); the previous version, if any, is intact"
        ) from None


# ================================================================ input files

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _regular_file_problem(info: os.stat_result, what: str, max_bytes: int | None) -> str | None:
    for is_kind, kind in _KINDS:
        if is_kind(info.st_mode):
            return f"is {kind}, not {what}"
    if not stat.S_ISREG(info.st_mode):
        return f"is not a regular file, so not {what}"
    if max_bytes is not None and info.st_size > max_bytes:
        return f"is {_size(info.st_size)}, more than the {_size(max_bytes)} this command reads"
    return None


def open_regular_file(path: str | Path, flag: str, what: str, max_bytes: int | None = None):
    """``path`` opened for binary reading, if it is a regular file (symlinks followed) of at
    most ``max_bytes``; else a UsageError naming what it is. The check comes before the open,
    and again on the opened file: a FIFO swapped in between cannot block the open (it is
    opened non-blocking) nor be read."""
    where = f"{flag} {path}"
    try:
        problem = _regular_file_problem(os.stat(path), what, max_bytes)
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except OSError as err:  # a symlink loop, a permission denied on the way, ...
        raise UsageError(f"{where}: cannot read it ({_reason(err)})") from None
    if problem:
        raise UsageError(f"{where} {problem}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise UsageError(f"{where}: cannot read it ({_reason(err)})") from None
    try:
        problem = _regular_file_problem(os.fstat(fd), what, max_bytes)
        if problem:
            raise UsageError(f"{where} {problem}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str | Path, flag: str, what: str, max_bytes: int) -> bytes:
    """The bytes of ``path`` (see ``open_regular_file``), never more than ``max_bytes``."""
    with open_regular_file(path, flag, what, max_bytes) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as err:
            raise UsageError(f"{flag} {path}: cannot read it ({_reason(err)})") from None
    if len(data) > max_bytes:  # it grew after the check
        raise UsageError(f"{flag} {path} is more than the {_size(max_bytes)} this command reads")
    return data


# ================================================================ checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    write_atomic(path, lambda f: torch.save(state, f))


def state_bytes(*states) -> int:
    """Bytes of the tensors in (nested) state dicts: what a checkpoint of them takes."""
    total = 0
    for state in states:
        if isinstance(state, torch.Tensor):
            total += state.numel() * state.element_size()
        elif isinstance(state, dict):
            total += state_bytes(*state.values())
        elif isinstance(state, (list, tuple)):
            total += state_bytes(*state)
    return total


def read_checkpoint(
    path: str | Path, flag: str = "--resume", max_bytes: int | None = None, mmap: bool = False
) -> object:
    """What ``torch.load(path, weights_only=True)`` gives, or a UsageError saying why not.
    Only a regular file of at most ``max_bytes`` is read (a FIFO or a device is refused before
    it is opened); ``mmap`` maps the tensors instead of reading them (a cheap look at the
    plain values of a large checkpoint)."""
    path = Path(path)
    where = f"{flag} {path}"
    if not os.path.lexists(path):
        raise UsageError(f"{where}: no such checkpoint file")
    with open_regular_file(path, flag, "a checkpoint file", max_bytes) as f:
        try:
            empty = not f.read(1)
        except OSError as err:
            raise UsageError(f"{where}: cannot read it ({_reason(err)})") from None
        if empty:
            raise UsageError(f"{where} is empty (0 bytes)")
        f.seek(0)
        return _load(f if not mmap else path, where, mmap)


def _load(source, where: str, mmap: bool) -> object:
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise UsageError(
                f"{where} holds Python objects other than tensors and plain values "
                f"({refused.group(1)}); they are not loaded (weights_only), so it cannot be "
                "resumed"
            ) from None
        raise UsageError(f"{where} is truncated or not a torch checkpoint") from None
    except Exception:  # a damaged archive: RuntimeError, EOFError, OSError, ... from torch
        raise UsageError(f"{where} is truncated or not a torch checkpoint") from None


def first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__


def describe(value) -> str:
    """A value's kind as an error message names it: "a dict", "a Tensor", "the int -5"."""
    if isinstance(value, (bool, int, float)) or value is None:
        return f"the {type(value).__name__} {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return f"a {type(value).__name__}"


def model_state_problems(model: nn.Module, state) -> list[str]:
    """Why ``state`` is not a state_dict of ``model``: missing and unexpected keys, other
    shapes or dtypes, non-finite values. Empty when it fits."""
    if not isinstance(state, dict):
        return [f"its model weights are {describe(state)}, not a state_dict"]
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [str(k) for k in state if k not in expected]
    if missing:
        problems.append(f"lacks the weights {', '.join(missing)}")
    if unexpected:
        more = f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else ""
        problems.append(f"has weights this model does not: {', '.join(unexpected[:4])}{more}")
    for key, want in expected.items():
        have = state.get(key)
        if have is None or key in missing:
            continue
        if not isinstance(have, torch.Tensor):
            problems.append(f"{key} is {describe(have)}, not a tensor")
        elif have.shape != want.shape:
            problems.append(f"{key} has shape {tuple(have.shape)}, the model {tuple(want.shape)}")
        elif have.dtype != want.dtype:
            problems.append(f"{key} is {have.dtype}, the model {want.dtype}")
        elif have.is_floating_point() and not torch.isfinite(have).all():
            problems.append(f"{key} holds NaN or infinite values")
    return problems


_ADAM_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "params")
_ADAM_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def adam_state_problems(optimizer: torch.optim.Optimizer, state) -> list[str]:
    """Why ``state`` is not a state_dict of this Adam ``optimizer`` (same parameters, Adam's
    settings and per-parameter moments). Empty when it fits."""
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        return [f"its optimizer state is {describe(state)} without param_groups"]
    if not isinstance(state.get("state"), dict):
        return ["its optimizer state lacks the per-parameter state"]
    groups = state["param_groups"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(groups) != len(optimizer.param_groups) or not all(isinstance(g, dict) for g in groups):
        return [f"its optimizer has {len(groups)} parameter groups, this one 1"]
    problems = []
    for group in groups:
        missing = [k for k in _ADAM_GROUP_KEYS if k not in group]
        if missing:
            others = sorted(k for k in group if k not in _ADAM_GROUP_KEYS)[:4]
            kind = " (SGD's, by its momentum)" if "momentum" in group else ""
            return [
                f"its optimizer state is not Adam's{kind}: its settings lack "
                f"{', '.join(missing)} and have {', '.join(others) or 'nothing else'}"
            ]
        if len(group["params"]) != len(params):
            problems.append(
                f"its optimizer covers {len(group['params'])} parameters, the model {len(params)}"
            )
        lr = group["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            problems.append(f"its optimizer's lr is {describe(lr)}")
    for index, param_state in state["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            problems.append(f"its optimizer state names parameter {index!r}, which is not one")
            continue
        if not isinstance(param_state, dict):
            problems.append(f"its optimizer state of parameter {index} is {describe(param_state)}")
            continue
        missing = [k for k in _ADAM_STATE_KEYS if k not in param_state]
        if missing:
            has = ", ".join(sorted(map(str, param_state))[:3]) or "nothing"
            problems.append(
                f"its optimizer state of parameter {index} lacks Adam's {', '.join(missing)} "
                f"(it has {has})"
            )
            continue
        step = param_state["step"]
        step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step >= 0:
            problems.append(f"its optimizer's step count of parameter {index} is {describe(step)}")
        for key in ("exp_avg", "exp_avg_sq"):
            moment = param_state[key]
            if not isinstance(moment, torch.Tensor) or moment.shape != params[index].shape:
                problems.append(
                    f"its optimizer's {key} of parameter {index} does not match the parameter's "
                    f"shape {tuple(params[index].shape)}"
                )
    return problems

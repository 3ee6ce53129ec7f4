"""`gpufit mnist`: the tutorial loop (--impl torch) and the gpufit trainer agree; resume, atomic
checkpoints, torchrun DDP and bad input. All on the MNIST sample that ships with gpufit, on CPU.

Tolerances (fp32): the two implementations compute the same math in a different order (the
fused kernels add the bias after the GEMM, Adam's fused kernel vs its per-parameter loop), so
per-step losses may differ by rounding that training then carries along. Over the first 200
steps we require |loss_torch - loss_gpufit| <= 1e-5 + 1e-4 * |loss_torch| at every step; we
measure at most 6e-7 on this machine. Resume is exact (bit-equal). DDP over 2 processes vs 1
differs by the order of the gradient reduction: epoch losses within rtol 1e-4, weights within
atol 1e-4.
"""

from __future__ import annotations

import argparse
import copy
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fsatomic as _atomic
from gpufit.examples import mnist, training

pytest.importorskip("torchvision", reason="needs the mnist extra: pip install -e '.[mnist]'")

REPO = Path(__file__).resolve().parent.parent
STEPS_COMPARED = 200


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("GPUFIT_CACHE_DIR")
    os.environ["GPUFIT_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("GPUFIT_CACHE_DIR", None)
    else:
        os.environ["GPUFIT_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def side_by_side(cache_dir):
    """Both implementations, the default run (10 epochs of the reference workload) on the
    shipped sample."""
    runs = {}
    for impl in mnist.IMPLS:
        cfg = mnist.TrainConfig(impl=impl, device="cpu", quiet=True)
        assert cfg.epochs == 10 and cfg.batch_size == 64 and cfg.lr == 1e-3
        runs[impl] = mnist.train(cfg)
    return runs


def test_same_initial_weights():
    torch.manual_seed(3)
    reference = mnist.MLP().state_dict()
    torch.manual_seed(3)
    fused = mnist.FusedMLP().state_dict()
    assert reference.keys() == fused.keys()
    assert all(torch.equal(reference[k], fused[k]) for k in reference)


def test_lean_adam_step_equals_torch_adam_step():
    models, optimizers = [], []
    for _ in range(2):
        torch.manual_seed(1)
        models.append(mnist.FusedMLP())
        optimizers.append(mnist._adam(models[-1].parameters(), 1e-3))
    lean = mnist.LeanAdamStep(optimizers[1])
    assert lean.lean == hasattr(torch, "_fused_adam_")
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        x = torch.randn(64, 784, generator=generator)
        y = torch.randint(0, 10, (64,), generator=generator)
        for model in models:
            model(x, y).backward()
        optimizers[0].step()
        lean()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)
    s0, s1 = optimizers[0].state_dict(), optimizers[1].state_dict()
    assert s0["param_groups"] == s1["param_groups"]
    for a, b in zip(s0["state"].values(), s1["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("n, batch", [(1000, 64), (1024, 64), (130, 7)])
def test_resident_batches_follow_the_tutorial_dataloader(n, batch):
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(5)
    loader = DataLoader(range(n), batch_size=batch, shuffle=True, generator=generator)
    images = torch.arange(n, dtype=torch.float32)[:, None]
    labels = torch.arange(n)
    mine = mnist.ResidentBatches(
        images, labels, batch, torch.Generator().manual_seed(5), 5, mnist.Distributed()
    )
    for epoch in range(3):
        theirs = [b.tolist() for b in loader]
        ours = [y.tolist() for _, y in mine.epoch(epoch)]
        assert ours == theirs
        assert len(mine) == len(loader)
    assert torch.equal(generator.get_state(), mine.generator.get_state())


@pytest.mark.parametrize("n, world, batch", [(100, 2, 8), (101, 2, 8), (7, 4, 2)])
def test_resident_batches_follow_the_distributed_sampler(n, world, batch):
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    labels = torch.arange(n)
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, seed=9)
        loader = DataLoader(range(n), batch_size=batch, sampler=sampler)
        dist = mnist.Distributed(rank=rank, world_size=world, active=True)
        mine = mnist.ResidentBatches(labels[:, None].float(), labels, batch, None, 9, dist)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            assert [y.tolist() for _, y in mine.epoch(epoch)] == [b.tolist() for b in loader]


def test_loss_trajectories_agree_over_200_steps(side_by_side):
    torch_losses = torch.tensor(side_by_side["torch"].step_losses[:STEPS_COMPARED])
    gpufit_losses = torch.tensor(side_by_side["gpufit"].step_losses[:STEPS_COMPARED])
    assert len(torch_losses) == len(gpufit_losses) == STEPS_COMPARED
    torch.testing.assert_close(gpufit_losses, torch_losses, rtol=1e-4, atol=1e-5)
    assert torch_losses[-20:].mean() < 0.6 * torch_losses[:20].mean()  # it does learn


def test_final_accuracy_agrees(side_by_side):
    a = side_by_side["torch"].history[-1]["test_accuracy"]
    b = side_by_side["gpufit"].history[-1]["test_accuracy"]
    assert abs(a - b) <= 0.005


@pytest.mark.parametrize("impl", mnist.IMPLS)
def test_two_epochs_on_the_sample_learn(side_by_side, impl):
    # Measured at epoch 2 on the 4,000/1,000-digit sample: 86.6-88.2 % over seeds 0-5.
    assert side_by_side[impl].history[1]["test_accuracy"] >= 0.85


@pytest.mark.parametrize("impl", mnist.IMPLS)
def test_default_run_on_the_sample_reaches_90_percent(side_by_side, impl):
    # measured after 10 epochs (seed 0): 92.6 % (gpufit), 92.5 % (torch)
    result = side_by_side[impl]
    assert len(result.history) == 10
    assert result.history[-1]["test_accuracy"] >= 0.90


def test_default_run_uses_one_thread_and_says_so(side_by_side):
    summary = side_by_side["gpufit"].summary
    assert summary["threads"] == 1 and torch.get_num_threads() == 1
    assert "cpu, 1 thread |" in mnist.summary_line(summary)


# ---------------------------------------------------------------- checkpoints and resume


def run_cli(*args) -> int:
    return mnist.main(["--device", "cpu", "--threads", "1", "--quiet", *map(str, args)])


@pytest.mark.parametrize("impl", mnist.IMPLS)
def test_resume_equals_uninterrupted(cache_dir, tmp_path, impl):
    common = ["--impl", impl, "--limit-train", 640, "--limit-test", 200, "--seed", 4]
    assert run_cli(*common, "--epochs", 3, "--out", tmp_path / "straight") == 0
    assert run_cli(*common, "--epochs", 1, "--out", tmp_path / "split") == 0
    assert run_cli(*common, "--epochs", 3, "--resume", tmp_path / "split" / "checkpoint.pt") == 0

    def load(folder):
        metrics = json.loads((tmp_path / folder / "metrics.json").read_text())
        state = torch.load(tmp_path / folder / "checkpoint.pt", weights_only=True)
        return metrics, state

    (m1, s1), (m2, s2) = load("straight"), load("split")
    keys = ("epoch", "steps", "train_loss", "test_loss", "test_accuracy")
    assert [[e[k] for k in keys] for e in m1["epochs"]] == [
        [e[k] for k in keys] for e in m2["epochs"]
    ]
    assert s2["epoch"] == 3
    for k, v in s1["model"].items():
        assert torch.equal(v, s2["model"][k]), k
    for p, q in zip(
        s1["optimizer"]["state"].values(), s2["optimizer"]["state"].values(), strict=True
    ):
        assert all(torch.equal(p[k], q[k]) for k in p)
    assert torch.equal(s1["rng"]["shuffle"], s2["rng"]["shuffle"])


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    good = {"epoch": 1, "w": torch.arange(1000.0)}
    mnist.save_checkpoint(path, good)
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        mnist.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1000)})
    monkeypatch.setattr(torch, "save", real_save)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], good["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


KILLED_WRITER = """
import os, signal, sys, torch
from gpufit.examples import mnist
path = sys.argv[1]
mnist.save_checkpoint(path, {"epoch": 1})
def killed_midway(obj, f, *a, **k):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = killed_midway
mnist.save_checkpoint(path, {"epoch": 2})
"""


def test_checkpoint_killed_mid_write_never_replaces_a_good_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert len(list(tmp_path.glob(".checkpoint.pt.*.tmp"))) == 1  # the killed write's leftover
    mnist.save_checkpoint(path, {"epoch": 3})  # the next good write sweeps it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    path = tmp_path / "checkpoint.pt"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = _atomic.temp_name(path).with_name(
            f".checkpoint.pt.{_atomic._HOST}.{other.pid}.0badcafe.tmp"
        )
        theirs.write_bytes(b"another run's checkpoint, half written")
        mnist.save_checkpoint(path, {"epoch": 1})
        assert theirs.exists()  # its writer is still running: not ours to remove
    finally:
        other.kill()
        other.wait()
    mnist.save_checkpoint(path, {"epoch": 2})  # now it is a dead writer's leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


CONCURRENT_WRITER = """
import sys, torch
from gpufit.examples import mnist
for i in range(60):
    mnist.save_checkpoint(sys.argv[1], {"writer": sys.argv[2], "i": i, "w": torch.zeros(5000)})
"""


def test_two_processes_writing_one_checkpoint_both_succeed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WRITER, str(path), name],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    last = torch.load(path, weights_only=True)  # whole: one writer's last checkpoint
    assert last["writer"] in ("a", "b") and last["i"] == 59
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_two_runs_of_one_job_sharing_one_out_folder_both_finish(cache_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    cmd = [sys.executable, "-m", "gpufit", "mnist", "--device", "cpu", "--quiet", "--seed", "1"]
    # one step per epoch: 80 writes each, back to back (before unique temp names, one of the
    # two runs died with FileNotFoundError in 2 of 3 tries). Same settings: the same job, so
    # both may write there (runs of other settings are refused: test_output_folder_owner.py)
    cmd += ["--limit-train", "64", "--limit-test", "64", "--out", str(tmp_path)]
    procs = [
        subprocess.Popen(cmd + ["--epochs", epochs], env=env, stderr=subprocess.PIPE, text=True)
        for epochs in ("40", "39")
    ]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] in (39, 40) and state["run"]["seed"] == 1  # the last writer's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.json"]


def test_output_folder_checks_at_the_same_time_do_not_collide(tmp_path):
    # runs sharing one --out check it at the same moment; each may remove only its own probe
    errors = []

    def check_many():
        try:
            for _ in range(40):
                training.check_output_dir(tmp_path)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=check_many) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_honour_the_umask(cache_dir, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert (
            run_cli("--limit-train", 64, "--limit-test", 64, "--epochs", 1, "--out", tmp_path) == 0
        )
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "metrics.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


# ---------------------------------------------------------------- resuming malformed checkpoints

SMALL_RUN = ["--limit-train", 128, "--limit-test", 64]


@pytest.fixture(scope="module")
def good_checkpoint(cache_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    assert run_cli(*SMALL_RUN, "--epochs", 1, "--out", folder) == 0
    return torch.load(folder / "checkpoint.pt", weights_only=True)


def _other_mlp_weights(state):
    torch.manual_seed(0)
    other = torch.nn.Sequential(
        torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    return {"layers." + k: v for k, v in other.state_dict().items()}


def _sgd_state(state):
    model = mnist.MLP()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model(torch.randn(2, 784)).sum().backward()
    sgd.step()
    return sgd.state_dict()


def _set(key, value):
    def mutate(state):
        state[key] = value(state) if callable(value) else value

    return mutate


def _nan_weight(state):
    state["model"]["layers.0.weight"][0, 0] = float("nan")


def _drop_moment(state):
    del state["optimizer"]["state"][0]["exp_avg"]


def _fewer_parameters(state):
    state["optimizer"]["param_groups"][0]["params"].pop()


# name -> (how to damage a good checkpoint, what the error must say)
MALFORMED = {
    "a missing key": (lambda s: s.pop("optimizer"), "it lacks optimizer"),
    "epoch=-5": (_set("epoch", -5), "its epoch is the int -5"),
    "epoch as text": (_set("epoch", "1"), "its epoch is the string '1'"),
    "epoch as bool": (_set("epoch", True), "its epoch is the bool True"),
    "another format": (_set("format", "gpufit-mnist-checkpoint/9"), "this gpufit reads"),
    "run settings as a list": (_set("run", [1, 2]), "its run settings are a list"),
    "history too short": (_set("history", []), "its history has 0 epochs, but its epoch is 1"),
    "history as text": (_set("history", "abc"), "its history is the string 'abc'"),
    "history without numbers": (
        _set("history", [{"epoch": 1}]),
        "epoch 1 of its history lacks numbers for steps",
    ),
    "damaged rng state": (
        lambda s: s["rng"].update(torch=torch.zeros(3)),
        "random number generator state is missing or damaged",
    ),
    "another model's state_dict": (
        _set("model", _other_mlp_weights),
        "layers.0.weight has shape (128, 784), the model (256, 784)",
    ),
    "another architecture's keys": (
        _set("model", {"conv1.weight": torch.zeros(8, 1, 3, 3)}),
        "lacks the weights layers.0.weight",
    ),
    "model weights as a list": (_set("model", [1, 2]), "its model weights are a list"),
    "NaN weights": (_nan_weight, "layers.0.weight holds NaN or infinite values"),
    "float64 weights": (
        lambda s: s["model"].update({k: v.double() for k, v in s["model"].items()}),
        "layers.0.bias is torch.float64, the model torch.float32",
    ),
    "an SGD optimizer state": (
        _set("optimizer", _sgd_state),
        "its optimizer state is not Adam's (SGD's, by its momentum)",
    ),
    "optimizer state as text": (_set("optimizer", "adam"), "its optimizer state is the string"),
    "a moment missing": (_drop_moment, "parameter 0 lacks Adam's exp_avg"),
    "fewer parameters": (_fewer_parameters, "its optimizer covers 3 parameters, the model 4"),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_resume_from_a_malformed_checkpoint_says_what_is_wrong(
    good_checkpoint, tmp_path, capsys, kind
):
    damage, message = MALFORMED[kind]
    state = copy.deepcopy(good_checkpoint)
    damage(state)
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    before = path.read_bytes()
    assert run_cli(*SMALL_RUN, "--epochs", 2, "--resume", path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpufit mnist: error: --resume {path}") and message in err, err
    assert err.count("\n") == 1  # one line
    assert sorted(tmp_path.iterdir()) == [path] and path.read_bytes() == before


def _weights_only_refuses(path, state):
    torch.save({**state, "extra": argparse.Namespace(a=1)}, path)


UNREADABLE = {
    "no such file": (lambda path, state: None, "no such checkpoint file"),
    "a folder": (lambda path, state: path.mkdir(), "is a folder, not a checkpoint file"),
    "an empty file": (lambda path, state: path.write_bytes(b""), "is empty (0 bytes)"),
    "junk bytes": (
        lambda path, state: path.write_bytes(b"not a checkpoint"),
        "is truncated or not a torch checkpoint",
    ),
    "a truncated file": (
        lambda path, state: (torch.save(state, path), path.write_bytes(path.read_bytes()[:5000])),
        "is truncated or not a torch checkpoint",
    ),
    "a pickled object": (_weights_only_refuses, "holds Python objects other than tensors"),
    "a bare tensor": (lambda path, state: torch.save(torch.zeros(3), path), "it holds a Tensor"),
    "a bare state_dict": (
        lambda path, state: torch.save(state["model"], path),
        "it holds bare model weights (a state_dict)",
    ),
    "a dict of something else": (
        lambda path, state: torch.save({"weights": [1.0]}, path),
        "not a gpufit MNIST checkpoint (it has no 'format' entry)",
    ),
}


@pytest.mark.parametrize("kind", UNREADABLE)
def test_resume_from_an_unreadable_checkpoint_says_why(good_checkpoint, tmp_path, capsys, kind):
    make, message = UNREADABLE[kind]
    path = tmp_path / "checkpoint.pt"
    make(path, good_checkpoint)
    assert run_cli(*SMALL_RUN, "--epochs", 2, "--resume", path) == 2
    err = capsys.readouterr().err
    assert f"--resume {path}" in err and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1


# ---------------------------------------------------------------- the output folder


def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    assert run_cli("--out", target) == 2
    assert "--out " + str(target) + " is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_out_on_a_device_file_is_refused(capsys):
    assert run_cli("--out", "/dev/full") == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def _fail_with(errno_code):
    def fail(*args, **kwargs):
        raise OSError(errno_code, os.strerror(errno_code))

    return fail


@pytest.mark.parametrize(
    "where, errno_code",
    [("open", errno.EROFS), ("open", errno.EACCES), ("fsync", errno.ENOSPC)],
    ids=["read-only filesystem", "no permission", "full disk"],
)
def test_out_that_cannot_be_written_is_refused_before_training(
    tmp_path, capsys, monkeypatch, where, errno_code
):
    out = tmp_path / "out"
    monkeypatch.setattr(_atomic.os, where, _fail_with(errno_code))
    assert run_cli("--out", out) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: cannot write there ({os.strerror(errno_code)})" in err
    assert "epoch" not in err and list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_out_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert run_cli("--out", out) == 2
    finally:
        out.chmod(0o755)
    assert "cannot write there" in capsys.readouterr().err


def test_out_without_room_for_a_checkpoint_is_refused(cache_dir, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(training.shutil, "disk_usage", lambda p: real(p)._replace(free=1_000_000))
    assert run_cli(*SMALL_RUN, "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert "only 1.0 MiB free" in err and "epoch 1" not in err
    assert list(tmp_path.iterdir()) == []


def test_disk_full_mid_run_keeps_the_last_checkpoint(cache_dir, tmp_path, capsys, monkeypatch):
    real = training.write_atomic
    writes = []

    def full_after_the_first_epoch(path, write):
        if Path(path).name == "checkpoint.pt":
            writes.append(path)
            if len(writes) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write)

    monkeypatch.setattr(training, "write_atomic", full_after_the_first_epoch)
    assert run_cli(*SMALL_RUN, "--epochs", 3, "--out", tmp_path) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the previous version, if any, is intact" in err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------- torchrun DDP


def torchrun(nproc: int, out: Path, *args) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "gpufit.examples.mnist", "--device", "cpu", "--threads", "1", "--quiet",
        "--out", str(out), *map(str, args),
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def test_ddp_two_processes_agree_with_one(cache_dir, tmp_path):
    """Global batch 64 either way: 2 ranks x 32 samples sum to the same batch as 1 x 64, because
    DistributedSampler deals a shared permutation out round-robin."""
    args = ["--impl", "gpufit", "--epochs", 2, "--limit-train", 1280, "--limit-test", 500]
    runs = {}
    for nproc in (1, 2):
        proc = torchrun(nproc, tmp_path / f"np{nproc}", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("test accuracy") == 1  # rank 0 alone reports
        metrics = json.loads((tmp_path / f"np{nproc}" / "metrics.json").read_text())
        state = torch.load(tmp_path / f"np{nproc}" / "checkpoint.pt", weights_only=True)
        runs[nproc] = metrics, state
    (m1, s1), (m2, s2) = runs[1], runs[2]
    assert m2["summary"]["world_size"] == 2
    for e1, e2 in zip(m1["epochs"], m2["epochs"], strict=True):
        assert e1["steps"] == e2["steps"] == 20
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-4)
        assert abs(e1["test_accuracy"] - e2["test_accuracy"]) <= 0.004
    for k, v in s1["model"].items():
        torch.testing.assert_close(s2["model"][k], v, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "must be at least 1"),
        (["--batch-size", "many"], "is not a whole number"),
        (["--lr", "-1"], "must be a positive number"),
        (["--impl", "jax"], "invalid choice"),
        (["--device", "tpu"], "invalid choice"),
        (["--seed", str(2**64)], "must be at most 9,223,372,036,854,775,807"),
        (["--seed", "-1"], "must be at least 0"),
        (["--seed", "9" * 5000], "is not a whole number"),
        (["--lr", "1e308"], "must be at most 1.0"),
        (["--lr", "nan"], "must be a positive number"),
        (["--lr", "inf"], "must be a positive number"),
        (["--lr", "0"], "must be a positive number"),
        (["--epochs", "1" * 30], "must be at most 100,000"),
        (["--batch-size", "1e3"], "is not a whole number"),
        (["--threads", "100000"], "the CPUs this process may use"),
        (["--limit-train", "0"], "must be at least 1"),
    ],
)
def test_bad_flags_exit_with_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mnist.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("seed", 2**64, "--seed: 18446744073709551616 must be at most"),
        ("lr", 1e308, "--lr: 1e+308 must be at most 1.0"),
        ("epochs", 2.5, "--epochs: 2.5 is not a whole number"),
        ("threads", 0, "--threads: 0 must be at least 1"),
        ("impl", "jax", "--impl: 'jax': choose one of torch, gpufit"),
    ],
)
def test_bad_config_in_python_is_refused_before_training(field, value, message):
    cfg = mnist.TrainConfig(device="cpu", quiet=True, **{field: value})
    with pytest.raises(mnist.UsageError, match="^" + message.replace("+", "\\+")):
        mnist.train(cfg)


def test_bad_data_dir_is_a_one_line_error(tmp_path, capsys):
    assert run_cli("--data-dir", tmp_path / "nowhere") == 1
    err = capsys.readouterr().err
    assert err.startswith("gpufit mnist: error: data folder") and "--download" in err


def test_failed_download_exits_nonzero(tmp_path, monkeypatch, capsys):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    assert run_cli("--download", "--data-dir", tmp_path / "dl") == 1
    assert "could not download MNIST" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_a_usage_error(cache_dir, capsys):
    assert mnist.main(["--device", "cuda", "--quiet"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_resume_from_another_run_is_refused(cache_dir, tmp_path, capsys):
    common = ["--limit-train", 128, "--limit-test", 64, "--epochs", 1]
    assert run_cli("--impl", "gpufit", *common, "--out", tmp_path) == 0
    checkpoint = tmp_path / "checkpoint.pt"
    assert run_cli("--impl", "torch", *common[:-1], 2, "--resume", checkpoint) == 2
    assert "different run (impl: checkpoint gpufit vs now torch)" in capsys.readouterr().err
    assert run_cli("--impl", "gpufit", *common, "--resume", checkpoint) == 2
    assert "already trained 1 epochs" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert run_cli("--resume", tmp_path / "junk.pt") == 2


def test_console_command_reports_corrupt_idx_without_traceback(cache_dir, tmp_path):
    from gpufit import data

    root = data.prepare_sample(tmp_path / "copy")
    images = data.raw_folder(root) / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "gpufit", "mnist", "--data-dir", str(root), "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "corrupt or truncated" in proc.stderr


# ---------------------------------------------------------------- benchmark


def test_benchmark_runs_and_writes_json_and_png(tmp_path):
    pytest.importorskip("matplotlib", reason="needs the bench extra: pip install -e '.[bench]'")
    from benchmarks import mnist as bench

    argv = ["--rounds", "1", "--steps", "5", "--variants", "tutorial,eager,gpufit"]
    argv += ["--step-blocks", "2", "--block-steps", "3"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "mnist_cpu.json").read_text())
    assert set(report["variants"]) == {"tutorial", "eager", "gpufit"}
    assert report["steps_per_epoch"] == 5 and report["train_samples"] == 60_000
    assert set(report["ratios"]) == {
        "tutorial_over_gpufit_end_to_end",
        "eager_over_gpufit_per_step",
        "eager_over_gpufit_per_epoch",
    }
    assert (tmp_path / "mnist_cpu.png").stat().st_size > 10_000

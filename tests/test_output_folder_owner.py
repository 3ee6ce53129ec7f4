"""A training run writes into an `--out` folder only while that folder holds nothing of another
command or another run: `gpufit mnist` must not replace `gpufit lm`'s checkpoint (or a run with
other settings), unless `--overwrite` says so. Runs of the same job share a folder (the last
writer's files remain), and a resume writes into its own folder."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gpufit.__main__ import main
from gpufit.examples import mnist, training

pytest.importorskip("torchvision", reason="needs the mnist extra: pip install -e '.[mnist]'")

MNIST_SMALL = ["--limit-train", "128", "--limit-test", "64", "--epochs", "1", "--quiet"]
MNIST_SMALL += ["--device", "cpu"]
LM_SMALL = ["--steps", "2", "--seq-len", "16", "--batch-size", "2", "--quiet", "--device", "cpu"]
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 20


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFIT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return str(path)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([*map(str, argv)])
    return code, capsys.readouterr().err


def _refused(capsys, *argv) -> str:
    code, err = _run(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _needs_lm():
    for module in ("transformers", "sentencepiece", "mistral_common"):
        pytest.importorskip(module, reason="needs gpufit[lm]: pip install -e '.[lm]'")


def test_mnist_refuses_a_folder_holding_an_lm_checkpoint(tmp_path, capsys, text):
    _needs_lm()
    out = tmp_path / "run"
    assert _run(capsys, "lm", "--text", text, *LM_SMALL, "--out", out)[0] == 0
    before = _snapshot(out)
    err = _refused(capsys, "mnist", *MNIST_SMALL, "--out", out)
    assert f"--out {out}" in err and "another command" in err and "--overwrite" in err
    assert _snapshot(out) == before  # nothing written, not even metrics.json

    assert _run(capsys, "mnist", *MNIST_SMALL, "--out", out, "--overwrite")[0] == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["format"] == mnist.CHECKPOINT_FORMAT


def test_lm_refuses_a_folder_holding_an_mnist_checkpoint(tmp_path, capsys, text):
    _needs_lm()
    out = tmp_path / "run"
    assert _run(capsys, "mnist", *MNIST_SMALL, "--out", out)[0] == 0
    before = _snapshot(out)
    err = _refused(capsys, "lm", "--text", text, *LM_SMALL, "--out", out)
    assert "another command" in err and mnist.CHECKPOINT_FORMAT in err
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    "other, named",
    [
        (["--seed", "7"], "seed"),
        (["--lr", "0.01"], "lr"),
        (["--impl", "torch"], "impl"),
        (["--limit-train", "192"], "train_size"),
    ],
)
def test_mnist_refuses_another_runs_checkpoint(tmp_path, capsys, other, named):
    out = tmp_path / "run"
    assert _run(capsys, "mnist", *MNIST_SMALL, "--out", out)[0] == 0
    before = _snapshot(out)
    err = _refused(capsys, "mnist", *MNIST_SMALL, *other, "--out", out)
    assert "another run" in err and named in err
    assert _snapshot(out) == before


def test_lm_refuses_another_runs_checkpoint_and_overwrite_replaces_it(tmp_path, capsys, text):
    _needs_lm()
    out = tmp_path / "run"
    assert _run(capsys, "lm", "--text", text, *LM_SMALL, "--out", out)[0] == 0
    before = _snapshot(out)
    err = _refused(capsys, "lm", "--text", text, *LM_SMALL, "--lr", "0.001", "--out", out)
    assert "another run" in err and "lr" in err
    assert _snapshot(out) == before
    other_text = tmp_path / "other.txt"
    other_text.write_text(TEXT.upper())
    err = _refused(capsys, "lm", "--text", other_text, *LM_SMALL, "--out", out)
    assert "text_sha256" in err
    code, _ = _run(capsys, "lm", "--text", text, *LM_SMALL, "--lr", "0.001", "--out", out,
                   "--overwrite")  # fmt: skip
    assert code == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["run"]["lr"] == 0.001


def test_the_same_job_may_write_again_last_writer_wins(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(capsys, "mnist", *MNIST_SMALL, "--out", out)[0] == 0
    assert _run(capsys, "mnist", *MNIST_SMALL[:-5], "--epochs", "2", "--quiet", "--device",
                "cpu", "--out", out)[0] == 0  # fmt: skip
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert _run(capsys, "mnist", *MNIST_SMALL, "--out", out)[0] == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize(
    "plant, message",
    [
        (lambda out: (out / "checkpoint.pt").write_bytes(b"my own notes"), "not a gpufit"),
        (lambda out: torch.save({"weight": torch.zeros(2)}, out / "checkpoint.pt"), "not a gpufit"),
        (lambda out: torch.save({"format": "x/1"}, out / "checkpoint.pt"), "another command"),
        (lambda out: (out / "metrics.json").write_text("{}"), "metrics.json"),
        (
            lambda out: torch.save(
                {"format": mnist.CHECKPOINT_FORMAT, "run": "?"}, out / "checkpoint.pt"
            ),
            "another run",
        ),
    ],
    ids=["junk", "a state_dict", "other format", "metrics only", "run not a dict"],
)
def test_a_folder_with_foreign_files_is_refused(tmp_path, capsys, plant, message):
    out = tmp_path / "run"
    out.mkdir()
    plant(out)
    before = _snapshot(out)
    err = _refused(capsys, "mnist", *MNIST_SMALL, "--out", out)
    assert message in err
    assert _snapshot(out) == before


def test_resume_with_out_holding_another_run_is_refused(tmp_path, capsys):
    first, other = tmp_path / "a", tmp_path / "b"
    assert _run(capsys, "mnist", *MNIST_SMALL, "--out", first)[0] == 0
    assert _run(capsys, "mnist", *MNIST_SMALL, "--seed", "5", "--out", other)[0] == 0
    before = _snapshot(other)
    resume = ["--resume", first / "checkpoint.pt"]
    err = _refused(capsys, "mnist", *MNIST_SMALL[:-5], "--epochs", "2", "--quiet", "--device",
                   "cpu", *resume, "--out", other)  # fmt: skip
    assert "another run" in err
    assert _snapshot(other) == before
    # into its own folder (the default) it continues
    code, err = _run(capsys, "mnist", *MNIST_SMALL[:-5], "--epochs", "2", "--quiet",
                     "--device", "cpu", *resume)  # fmt: skip
    assert code == 0, err


def test_a_different_run_writing_meanwhile_is_not_overwritten(tmp_path, capsys, monkeypatch):
    """Two different jobs started into one empty folder: the second to write finds the first
    one's checkpoint and stops with one line instead of replacing it."""
    out = tmp_path / "run"
    foreign = {"format": mnist.CHECKPOINT_FORMAT, "run": {"seed": 99}, "epoch": 1}
    real_line = mnist.epoch_line

    def another_run_writes_first(metrics):
        training.save_checkpoint(out / "checkpoint.pt", foreign)
        return real_line(metrics)

    monkeypatch.setattr(mnist, "epoch_line", another_run_writes_first)
    code, err = _run(capsys, "mnist", *MNIST_SMALL, "--out", out)
    assert code == 1 and err.count("\n") == 1, err
    assert "another run wrote there" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["run"] == {"seed": 99}
    assert not (out / "metrics.json").exists()


def test_overwrite_is_in_help(capsys):
    for command in ("mnist", "lm"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--overwrite" in capsys.readouterr().out


def test_metrics_of_the_same_job_are_replaced(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(capsys, "mnist", *MNIST_SMALL, "--out", out)[0] == 0
    first = json.loads((out / "metrics.json").read_text())
    os.utime(out / "metrics.json", (0, 0))
    assert _run(capsys, "mnist", *MNIST_SMALL, "--out", out)[0] == 0
    again = json.loads((out / "metrics.json").read_text())
    assert (out / "metrics.json").stat().st_mtime > 0
    assert again["config"]["seed"] == first["config"]["seed"]

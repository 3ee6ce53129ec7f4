"""Files the training commands read (`--text`, `--resume`) must be regular files of sane size,
checked before they are opened: a FIFO would block the open (a hang), /dev/zero or /dev/urandom
would be read until memory runs out. Each is one line, exit 2, at once."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from gpufit.__main__ import main
from gpufit.examples import lm, mnist, training

pytest.importorskip("torchvision", reason="needs the mnist extra: pip install -e '.[mnist]'")

LM_SMALL = ["--steps", "2", "--seq-len", "16", "--batch-size", "2", "--quiet", "--device", "cpu"]
MNIST_SMALL = ["--limit-train", "128", "--limit-test", "64", "--epochs", "2", "--quiet"]


@pytest.fixture(autouse=True)
def _no_hang_and_private_cache(tmp_path, monkeypatch):
    """A blocked open() of a FIFO is interrupted by the alarm: the test fails instead of
    hanging."""
    monkeypatch.setenv("GPUFIT_CACHE_DIR", str(tmp_path / "cache"))

    def hung(signum, frame):
        raise TimeoutError("the command hung on its input")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path, "named pipe (FIFO)"


def _socket(tmp_path):
    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    _SOCKETS.append(server)
    return path, "socket"


_SOCKETS: list[socket.socket] = []


def _symlink_to_zero(tmp_path):
    path = tmp_path / "looks-like-a-file.txt"
    path.symlink_to("/dev/zero")
    return path, "character device"


def _symlink_loop(tmp_path):
    path = tmp_path / "loop"
    path.symlink_to(path)
    return path, "cannot read it"


def _folder(tmp_path):
    path = tmp_path / "folder"
    path.mkdir()
    return path, "is a folder"


NOT_REGULAR = {
    "a FIFO": _fifo,
    "/dev/zero": lambda tmp_path: ("/dev/zero", "character device"),
    "/dev/urandom": lambda tmp_path: ("/dev/urandom", "character device"),
    "a symlink to /dev/zero": _symlink_to_zero,
    "a socket": _socket,
    "a folder": _folder,
    "a symlink loop": _symlink_loop,
}


@pytest.fixture(autouse=True)
def _close_sockets():
    yield
    while _SOCKETS:
        _SOCKETS.pop().close()


def _one_line_error(capsys, *argv) -> str:
    code = main([*map(str, argv)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("It was the best of times, it was the worst of times. " * 40)
    return path


def _needs_lm():
    for module in ("transformers", "sentencepiece", "mistral_common"):
        pytest.importorskip(module, reason="needs gpufit[lm]: pip install -e '.[lm]'")


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_lm_text_must_be_a_regular_file(tmp_path, capsys, kind):
    _needs_lm()
    path, what = NOT_REGULAR[kind](tmp_path)
    err = _one_line_error(capsys, "lm", "--text", path, *LM_SMALL)
    assert f"--text {path}" in err and what in err


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_lm_resume_must_be_a_regular_file(tmp_path, capsys, text, kind):
    _needs_lm()
    path, what = NOT_REGULAR[kind](tmp_path)
    err = _one_line_error(capsys, "lm", "--text", text, "--resume", path, *LM_SMALL)
    assert f"--resume {path}" in err and what in err


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_mnist_resume_must_be_a_regular_file(tmp_path, capsys, kind):
    path, what = NOT_REGULAR[kind](tmp_path)
    err = _one_line_error(capsys, "mnist", *MNIST_SMALL, "--resume", path)
    assert f"--resume {path}" in err and what in err


def test_lm_text_larger_than_the_cap_is_refused_unread(tmp_path, capsys):
    _needs_lm()
    path = tmp_path / "huge.txt"
    with path.open("wb") as f:  # sparse: no disk used, nothing to read if it is refused
        f.truncate(lm.MAX_TEXT_BYTES + 1)
    err = _one_line_error(capsys, "lm", "--text", path, *LM_SMALL)
    assert "64.0 MiB" in err


def test_mnist_checkpoint_larger_than_the_cap_is_refused_unread(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    with path.open("wb") as f:
        f.truncate(mnist.MAX_CHECKPOINT_BYTES + 1)
    err = _one_line_error(capsys, "mnist", *MNIST_SMALL, "--resume", path)
    assert f"--resume {path}" in err and "64.0 MiB" in err


def test_a_file_swapped_for_a_fifo_after_the_check_does_not_block(tmp_path, monkeypatch):
    """stat says regular, then a FIFO takes the name before the open: the open is
    non-blocking and the opened file is checked again."""
    regular, fifo = tmp_path / "a.txt", tmp_path / "fifo"
    regular.write_text("text")
    os.mkfifo(fifo)
    real_stat = os.stat
    monkeypatch.setattr(
        training.os, "stat", lambda p, *a, **k: real_stat(regular if p == fifo else p, *a, **k)
    )
    with pytest.raises(training.UsageError, match=r"named pipe \(FIFO\)"):
        training.read_regular_file(fifo, "--text", "a text file", 2**20)


def test_regular_files_still_read(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"hello")
    link = tmp_path / "link.txt"
    link.symlink_to(path)
    assert training.read_regular_file(link, "--text", "a text file", 2**20) == b"hello"


@pytest.mark.parametrize("kind", ["a FIFO", "/dev/zero", "a socket"])
def test_lm_tokenizer_must_be_a_regular_file(tmp_path, capsys, text, kind):
    _needs_lm()
    path, what = NOT_REGULAR[kind](tmp_path)
    err = _one_line_error(capsys, "lm", "--text", text, "--tokenizer", path, *LM_SMALL)
    assert f"--tokenizer {path}" in err and what in err


@pytest.mark.parametrize("kind", ["a FIFO", "a symlink to /dev/zero", "a socket"])
def test_lm_model_folder_files_must_be_regular_files(tmp_path, capsys, text, kind):
    _needs_lm()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    if kind == "a symlink to /dev/zero":
        weights.symlink_to("/dev/zero")
        what = "character device"
    else:
        path, what = NOT_REGULAR[kind](tmp_path)
        os.rename(path, weights)
    err = _one_line_error(capsys, "lm", "--text", text, "--model", folder, *LM_SMALL)
    assert f"--model {weights}" in err and what in err

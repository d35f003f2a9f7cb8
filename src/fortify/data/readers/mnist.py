"""MNIST and Fashion-MNIST from IDX files (gzipped or not), parsed here without torchvision."""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fortify.data.base import ImageSet
from fortify.data.readers._common import (
    candidate_dirs,
    download_root,
    first_existing,
    missing,
    reshape_set,
)
from fortify.data.registry import ReaderResult, register_reader
from fortify.errors import DataError

log = logging.getLogger(__name__)

# IDX type codes -> numpy dtype (big-endian).
_IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse one IDX file (``.gz`` is decompressed) into a numpy array of its declared shape.

    Format: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions ``d``,
    ``d`` big-endian uint32 sizes, then the data in row-major order.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(
            f"{path}: not a readable (gzipped) IDX file ({type(e).__name__}: {e}); the file is "
            "corrupt or truncated — download it again"
        ) from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        head = raw[:4].hex() if raw else "empty file"
        raise DataError(
            f"{path}: bad IDX magic number ({head}); expected 00 00 <type> <ndim> with type one "
            f"of {', '.join(f'{t:#04x}' for t in _IDX_TYPES)}"
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX data has {len(raw) - header} bytes but the header declares shape "
            f"{dims} ({expected} bytes); the file is truncated or corrupt — re-download it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find_all(dirs: list[Path]) -> tuple[dict[str, Path] | None, list[str]]:
    """The four IDX files from the first directory holding all of them (gzipped or not).

    Returns (files or None, the files missing from the most complete directory).
    """
    best: list[str] = [stem + "[.gz]" for stem in FILES.values()]
    for d in dirs:
        found = {k: first_existing([d], [stem + ".gz", stem]) for k, stem in FILES.items()}
        if None not in found.values():
            return found, []  # type: ignore[return-value]
        lacking = [FILES[k] + "[.gz]" for k, v in found.items() if v is None]
        if len(lacking) < len(best):
            best = lacking
    return None, best


def _read_split(images_path: Path, labels_path: Path, num_classes: int) -> ImageSet:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} "
            f"{images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{labels_path}: labels must lie in [0, {num_classes - 1}], found "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    x = torch.from_numpy(images.copy())[:, None]  # (N, 1, H, W)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageSet(x, y)


def _download(name: str, root: str | None) -> None:
    import torchvision

    datasets = torchvision.datasets
    cls = datasets.FashionMNIST if name == "fashion-mnist" else datasets.MNIST
    target = download_root(root)
    log.info("downloading %s to %s", name, target)
    try:
        for train in (True, False):
            cls(str(target), train=train, download=True)
    except Exception as e:  # network errors come in many types
        raise DataError(f"{name}: download into {target} failed: {e}") from e


def _read(name: str, root: str | None, download: bool) -> tuple[ImageSet, ImageSet]:
    tv_dir = "FashionMNIST" if name == "fashion-mnist" else "MNIST"
    extra = [DEBIAN_FASHION] if name == "fashion-mnist" else []
    dirs = candidate_dirs(root, [name, f"{tv_dir}/raw"], extra)
    found, lacking = _find_all(dirs)
    if found is None and download:
        _download(name, root)
        found, lacking = _find_all(dirs)
    if found is None:
        how = f"load_dataset(..., download=True) (torchvision downloads it into root/{tv_dir}/raw)"
        if name == "fashion-mnist":
            how += " or `apt install dataset-fashion-mnist` (Debian/Ubuntu)"
        raise missing(name, dirs, ", ".join(lacking), how)
    log.debug("%s files: %s", name, found)
    train = _read_split(found["train_images"], found["train_labels"], 10)
    test = _read_split(found["test_images"], found["test_labels"], 10)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"{name}: train images are {tuple(train.images.shape[2:])} but test images are "
            f"{tuple(test.images.shape[2:])}"
        )
    return train, test


def _reshaped(
    name: str, root: str | None, download: bool, image_size: int | None, channels: int | None
) -> tuple[ImageSet, ImageSet]:
    train, test = _read(name, root, download)
    if image_size is None and channels is None:
        return train, test
    return (
        reshape_set(train, name, image_size, channels),
        reshape_set(test, name, image_size, channels),
    )


@register_reader("fashion-mnist")
def read_fashion_mnist(
    root: str | None = None,
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
) -> ReaderResult:
    """Fashion-MNIST: 60k/10k grey 28×28 images, 10 classes; ε = 0.1, no augmentation.

    ``image_size``: resize to that square side (bilinear); ``channels=3``: grey copied to RGB.
    """
    train, test = _reshaped("fashion-mnist", root, download, image_size, channels)
    return train, test, 10, list(FASHION_CLASSES), 0.1, "none"


@register_reader("mnist")
def read_mnist(
    root: str | None = None,
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
) -> ReaderResult:
    """MNIST: 60k/10k grey 28×28 digits, 10 classes; ε = 0.3, no augmentation.

    ``image_size``: resize to that square side (bilinear; the FPD release used 64);
    ``channels=3``: grey copied to three channels (as the FPD release).
    """
    train, test = _reshaped("mnist", root, download, image_size, channels)
    return train, test, 10, [str(i) for i in range(10)], 0.3, "none"

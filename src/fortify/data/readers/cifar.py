"""CIFAR-10 / CIFAR-100 from the "python version" pickle batches, read with a restricted unpickler.

The pickles are never unpickled with the stock unpickler: :class:`_NumpyOnlyUnpickler` resolves
only the few globals numpy needs to rebuild arrays, so a crafted file cannot run code.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fortify.data.base import ImageSet
from fortify.data.readers._common import candidate_dirs, download_root, missing
from fortify.data.registry import ReaderResult, register_reader
from fortify.errors import DataError

log = logging.getLogger(__name__)

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]

# (module, name) pairs a CIFAR pickle may reference: numpy array/dtype reconstruction (numpy 1.x
# and 2.x module paths) and codecs.encode, which Python 3 uses for bytes in protocol-2 pickles.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that only resolves numpy array-reconstruction globals."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DataError(
                f"refusing to unpickle global {module}.{name}: CIFAR batches may only contain "
                f"numpy arrays, lists, numbers and strings"
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = module.replace("numpy.core.", "numpy._core.", 1)  # avoid the numpy 2 shim
        return super().find_class(module, name)


def safe_load_pickle(path: Path) -> Any:
    """Unpickle ``path`` (Python 2 or 3 pickle, byte-string keys) allowing only numpy globals."""
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except DataError as e:
        raise DataError(f"{path}: {e}") from e
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
        MemoryError,
    ) as e:
        raise DataError(
            f"{path}: not a valid CIFAR pickle batch (truncated or corrupt?): {e}"
        ) from e


def _get(d: Any, key: str, path: Path) -> Any:
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict batch, got {type(d).__name__}")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path}: batch has no {key!r} entry (keys: {sorted(map(str, d))})")


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = safe_load_pickle(path)
    data = np.asarray(_get(d, "data", path))
    labels = np.asarray(_get(d, label_key, path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: labels must lie in [0, {num_classes - 1}], found "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _to_set(parts: list[tuple[np.ndarray, np.ndarray]]) -> ImageSet:
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return ImageSet(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))


def _locate(name: str, root: str | None, folder: str, files: list[str]) -> Path | None:
    for d in candidate_dirs(root, [folder, f"{name}/{folder}"]):
        if all((d / f).is_file() for f in files):
            return d
    return None


def _read(name: str, root: str | None, download: bool) -> tuple[ImageSet, ImageSet, int, list[str]]:
    if name == "cifar10":
        folder, label_key, k = "cifar-10-batches-py", "labels", 10
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta_file, names_key = "test_batch", "batches.meta", "label_names"
    else:
        folder, label_key, k = "cifar-100-python", "fine_labels", 100
        train_files, test_file, meta_file, names_key = ["train"], "test", "meta", "fine_label_names"
    files = [*train_files, test_file]
    d = _locate(name, root, folder, files)
    if d is None and download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        target = download_root(root)
        log.info("downloading %s to %s", name, target)
        try:
            cls(str(target), train=True, download=True)
        except Exception as e:
            raise DataError(f"{name}: download into {target} failed: {e}") from e
        d = _locate(name, root, folder, files)
    if d is None:
        looked = candidate_dirs(root, [folder, f"{name}/{folder}"])
        raise missing(
            name,
            looked,
            f"the python batches ({', '.join(files)})",
            f"load_dataset(..., download=True), or download and untar the 'python version' "
            f"from https://www.cs.toronto.edu/~kriz/cifar.html to get {folder}/",
        )
    train = _to_set([_read_batch(d / f, label_key, k) for f in train_files])
    test = _to_set([_read_batch(d / test_file, label_key, k)])
    classes = CIFAR10_CLASSES if name == "cifar10" else [str(i) for i in range(k)]
    if (d / meta_file).is_file():
        names = _get(safe_load_pickle(d / meta_file), names_key, d / meta_file)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        if len(names) == k:
            classes = names
        else:
            log.warning("%s lists %d class names, expected %d; ignoring", meta_file, len(names), k)
    return train, test, k, list(classes)


@register_reader("cifar10")
def read_cifar10(root: str | None = None, download: bool = False) -> ReaderResult:
    """CIFAR-10: 50k/10k RGB 32×32 images, 10 classes; ε = 8/255, crop-flip augmentation."""
    train, test, k, classes = _read("cifar10", root, download)
    return train, test, k, classes, 8 / 255, "crop-flip"


@register_reader("cifar100")
def read_cifar100(root: str | None = None, download: bool = False) -> ReaderResult:
    """CIFAR-100 (fine labels): 50k/10k RGB 32×32 images, 100 classes; ε = 8/255, crop-flip."""
    train, test, k, classes = _read("cifar100", root, download)
    return train, test, k, classes, 8 / 255, "crop-flip"

"""SVHN (cropped digits, format 2) from train_32x32.mat / test_32x32.mat."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fortify.data.base import ImageSet
from fortify.data.readers._common import candidate_dirs, download_root, missing, reshape_set
from fortify.data.registry import ReaderResult, register_reader
from fortify.errors import DataError

log = logging.getLogger(__name__)

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_svhn_mat(path: Path) -> ImageSet:
    """Read one SVHN ``.mat``: ``X`` uint8 (H, W, C, N) and ``y`` (N, 1) with 10 meaning digit 0."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as e:  # scipy raises ValueError/TypeError/... on corrupt files
        raise DataError(f"{path}: not a readable SVHN .mat file: {e}") from e
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: expected variables 'X' and 'y', found {sorted(mat)}")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3:
        raise DataError(f"{path}: X must be (H, W, 3, N), got shape {x.shape}")
    if x.shape[3] != len(y):
        raise DataError(f"{path}: X holds {x.shape[3]} images but y has {len(y)} labels")
    if x.dtype != np.uint8:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{path}: X values must lie in [0, 255], got dtype {x.dtype}")
        x = x.astype(np.uint8)
    y = y.astype(np.int64)
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise DataError(
            f"{path}: SVHN labels must lie in [1, 10] (10 = digit 0), found "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    y = np.where(y == 10, 0, y)
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    return ImageSet(images, torch.from_numpy(y))


def _locate(root: str | None) -> Path | None:
    for d in candidate_dirs(root, ["svhn", "SVHN"]):
        if all((d / f).is_file() for f in FILES.values()):
            return d
    return None


@register_reader("svhn")
def read_svhn(
    root: str | None = None, download: bool = False, image_size: int | None = None
) -> ReaderResult:
    """SVHN: 73,257/26,032 RGB 32×32 digits (the ``extra`` set is not used); ε = 8/255, no aug.

    ``image_size``: resize to that square side (bilinear; the FPD release used 64).
    """
    d = _locate(root)
    if d is None and download:
        import torchvision

        target = download_root(root)
        log.info("downloading svhn to %s", target)
        try:
            for split in FILES:
                torchvision.datasets.SVHN(str(target), split=split, download=True)
        except Exception as e:
            raise DataError(f"svhn: download into {target} failed: {e}") from e
        d = _locate(root)
    if d is None:
        raise missing(
            "svhn",
            candidate_dirs(root, ["svhn", "SVHN"]),
            ", ".join(FILES.values()),
            "load_dataset(..., download=True), or download them from "
            "http://ufldl.stanford.edu/housenumbers/",
        )
    train, test = read_svhn_mat(d / FILES["train"]), read_svhn_mat(d / FILES["test"])
    if image_size is not None:
        train, test = reshape_set(train, "svhn", image_size), reshape_set(test, "svhn", image_size)
    return train, test, 10, [str(i) for i in range(10)], 8 / 255, "none"

"""Readers of the published corruption benchmarks.

* CIFAR-10-C / CIFAR-100-C: one ``<corruption>.npy`` of 5 severities × 10,000 uint8 HWC images,
  severity-major, plus ``labels.npy``;
* Tiny-ImageNet-C: ``<corruption>/<severity>/<wnid>/*.JPEG`` folders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fortify.data.base import ImageSet
from fortify.errors import ConfigError, DataError

SEVERITIES = (1, 2, 3, 4, 5)


# The 15 corruptions of the benchmark (the paper's mean is over these).
BENCHMARK_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)


EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")


def list_cifar_c(root: str | os.PathLike[str]) -> list[str]:
    """Corruption names available in a CIFAR-10-C / CIFAR-100-C folder (benchmark ones first)."""
    d = Path(root)
    if not d.is_dir():
        raise DataError(f"corrupted-set folder {str(d)!r} does not exist")
    names = sorted(p.stem for p in d.glob("*.npy") if p.stem != "labels")
    return [n for n in BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS if n in names] + [
        n for n in names if n not in BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
    ]


def read_cifar_c(
    root: str | os.PathLike[str],
    corruption: str,
    *,
    per_severity: int = 10_000,
    severities: Sequence[int] = SEVERITIES,
    limit: int | None = None,
) -> dict[int, ImageSet]:
    """Read ``<root>/<corruption>.npy`` and ``<root>/labels.npy`` → {severity: ImageSet}.

    Args:
        per_severity: images per severity (10,000 for the published sets); the files must hold
            exactly ``5 × per_severity`` rows.
        limit: keep only the first ``limit`` images of each severity.

    Returns:
        uint8 images (n, C, H, W) and int64 labels per requested severity.
    """
    d = Path(root)
    path, lpath = d / f"{corruption}.npy", d / "labels.npy"
    if not path.is_file():
        have = list_cifar_c(d) if d.is_dir() else []
        raise DataError(
            f"corruption file {str(path)!r} not found; available in {str(d)!r}: "
            f"{', '.join(have) or 'none'}"
        )
    if not lpath.is_file():
        raise DataError(f"labels file {str(lpath)!r} not found next to the corruption files")
    expected = len(SEVERITIES) * per_severity
    images = np.load(path, mmap_mode="r")
    labels = np.load(lpath, mmap_mode="r")
    if labels.ndim != 1:
        raise DataError(
            f"{str(lpath)!r} must hold one integer label per row (shape (N,)), got shape "
            f"{tuple(labels.shape)}"
        )
    for what, arr in ((path, images), (lpath, labels)):
        if arr.shape[0] != expected:
            raise DataError(
                f"{str(what)!r} has {arr.shape[0]} rows; expected {expected} "
                f"(5 severities × {per_severity} images, severity-major)"
            )
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise DataError(
            f"{str(path)!r} must hold uint8 images (N, H, W, C) with C = 1 or 3, got shape "
            f"{tuple(images.shape)} of dtype {images.dtype}"
        )
    out = {}
    n = per_severity if limit is None else min(limit, per_severity)
    for s in severities:
        if s not in SEVERITIES:
            raise ConfigError(f"severity must be one of {list(SEVERITIES)}, got {s!r}")
        lo = (s - 1) * per_severity
        x = torch.from_numpy(np.array(images[lo : lo + n])).permute(0, 3, 1, 2)
        y = torch.from_numpy(np.asarray(labels[lo : lo + n]).astype(np.int64))
        out[s] = ImageSet(x.to(torch.uint8).contiguous(), y)
    return out


TINY_IMAGENET_C_READER_VERSION = 1


def read_tiny_imagenet_c(
    root: str | os.PathLike[str],
    corruption: str,
    severity: int,
    classes: Sequence[str],
    *,
    limit: int | None = None,
    cache_dir: Any = None,
) -> ImageSet:
    """Read ``<root>/<corruption>/<severity>/<wnid>/*`` images; labels follow ``classes`` order.

    Decoded images go through the dataset cache (:mod:`fortify.data.cache`; ``cache_dir`` as
    the readers' option: None = ``$FORTIFY_CACHE_DIR`` or the default, ``"off"`` disables), so
    a second evaluation does not decode the 10,000 JPEGs of each (corruption, severity) again.
    ``limit`` keeps a fixed, seeded subset of that many images (in folder order); only those
    are decoded and cached.
    """
    from fortify.data.readers._common import decode_splits

    d = Path(root) / corruption / str(severity)
    if not d.is_dir():
        raise DataError(
            f"Tiny-ImageNet-C folder {str(d)!r} not found "
            "(expected <root>/<corruption>/<1..5>/<wnid>/)"
        )
    index = {w: i for i, w in enumerate(classes)}
    items: list[tuple[Path, int]] = []
    for cls_dir in sorted(p for p in d.iterdir() if p.is_dir()):
        if cls_dir.name not in index:
            raise DataError(
                f"{str(cls_dir)!r}: class {cls_dir.name!r} is not one of the model's classes"
            )
        items += [
            (f, index[cls_dir.name])
            for f in sorted(cls_dir.iterdir())
            if f.suffix.lower() in (".jpeg", ".jpg", ".png")
        ]
    if not items:
        raise DataError(f"no images found under {str(d)!r}")
    if limit is not None and limit < len(items):  # a fixed, class-balanced-ish subset
        order = np.sort(np.random.default_rng(0).permutation(len(items))[:limit])
        items = [items[i] for i in order]
    split = f"{corruption}-{severity}"
    return decode_splits(
        "tiny-imagenet-c",
        TINY_IMAGENET_C_READER_VERSION,
        d,
        {split: items},
        None,
        "RGB",
        {"classes": list(classes), "limit": limit},
        cache_dir,
    )[split]

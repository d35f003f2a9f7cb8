"""Caltech-101 and Caltech-256 from their category folders, with a fixed per-class test split.

Neither dataset has an official test split. Each class's image files are sorted by name and
permuted with a generator seeded by ``(SPLIT_SEED, class index)``; the first 10 % (Caltech-101)
or 5 % (Caltech-256) — rounded, at least one image per class — form the test split. Images are
converted to RGB, their shorter side resized to ``image_size`` and the centre square kept.
Decoded splits are cached (see :mod:`fortify.data.cache`; reader option ``cache_dir``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fortify.data.base import ImageSet
from fortify.data.cache import CacheDirOption
from fortify.data.readers._common import (
    candidate_dirs,
    check_image_size,
    decode_splits,
    download_root,
    list_images,
    missing,
    per_class_split,
)
from fortify.data.registry import ReaderResult, register_reader
from fortify.errors import DataError

log = logging.getLogger(__name__)

SPLIT_SEED = 20240101  # fixed: the test split never changes with any experiment seed
READER_VERSION = 1  # bump when the output for the same files changes (invalidates caches)


def _find(dirs: list[Path], folder: str) -> Path | None:
    return next((d / folder for d in dirs if (d / folder).is_dir()), None)


def _read(
    name: str,
    root: str | None,
    download: bool,
    folder: str,
    skip: set[str],
    test_fraction: float,
    image_size: int,
    how: str,
    cache_dir: CacheDirOption,
) -> tuple[ImageSet, ImageSet, list[str]]:
    check_image_size(image_size, name)
    dirs = candidate_dirs(root, [name])
    base = _find(dirs, folder)
    if base is None and download:
        import torchvision

        cls = (
            torchvision.datasets.Caltech101
            if name == "caltech101"
            else (torchvision.datasets.Caltech256)
        )
        target = download_root(root)
        log.info("downloading %s to %s", name, target / name)
        try:
            cls(str(target), download=True)
        except Exception as e:
            raise DataError(f"{name}: download into {target} failed: {e}") from e
        base = _find(dirs, folder)
    if base is None:
        raise missing(name, dirs, f"{folder}/ (one sub-folder per class)", how)
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and p.name not in skip)
    if not class_dirs:
        raise DataError(f"{name}: {base} has no class folders")
    files = [list_images(c) for c in class_dirs]
    empty = [c.name for c, f in zip(class_dirs, files) if not f]
    if empty:
        raise DataError(f"{name}: class folder(s) without images in {base}: {', '.join(empty)}")
    train_items, test_items = per_class_split(files, test_fraction, SPLIT_SEED)
    rules = {"split_seed": SPLIT_SEED, "test_fraction": test_fraction, "skip": sorted(skip)}
    sets = decode_splits(
        name,
        READER_VERSION,
        base,
        {"train": train_items, "test": test_items},
        image_size,
        "RGB",
        rules,
        cache_dir,
    )
    return sets["train"], sets["test"], [c.name for c in class_dirs]


@register_reader("caltech101")
def read_caltech101(
    root: str | None = None,
    download: bool = False,
    image_size: int = 64,
    cache_dir: CacheDirOption = None,
) -> ReaderResult:
    """Caltech-101: 101 classes (BACKGROUND_Google skipped), 90/10 per-class split, RGB
    ``image_size``² images; ε = 8/255, crop-flip. ``cache_dir``: see
    :func:`fortify.data.cache.resolve_cache_dir`."""
    train, test, classes = _read(
        "caltech101",
        root,
        download,
        "101_ObjectCategories",
        {"BACKGROUND_Google"},
        0.10,
        image_size,
        "load_dataset(..., download=True) or download and extract "
        "101_ObjectCategories from https://data.caltech.edu/records/mzrjq-6wc02",
        cache_dir,
    )
    return train, test, len(classes), classes, 8 / 255, "crop-flip"


@register_reader("caltech256")
def read_caltech256(
    root: str | None = None,
    download: bool = False,
    image_size: int = 64,
    cache_dir: CacheDirOption = None,
) -> ReaderResult:
    """Caltech-256: 256 classes (257.clutter skipped), 95/5 per-class split, RGB
    ``image_size``² images; ε = 8/255, crop-flip. Class names drop the ``NNN.`` prefix.
    ``cache_dir``: see :func:`fortify.data.cache.resolve_cache_dir`."""
    train, test, folders = _read(
        "caltech256",
        root,
        download,
        "256_ObjectCategories",
        {"257.clutter"},
        0.05,
        image_size,
        "load_dataset(..., download=True) or download and extract "
        "256_ObjectCategories from https://data.caltech.edu/records/nyy15-4j048",
        cache_dir,
    )
    classes = [re.sub(r"^\d+\.", "", f) for f in folders]
    return train, test, len(classes), classes, 8 / 255, "crop-flip"

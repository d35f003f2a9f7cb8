"""Tiny-ImageNet-200 from the extracted ``tiny-imagenet-200`` folder tree.

The official test images are unlabelled, so the test split is the labelled validation set
(10,000 images, 50 per class), regrouped by class from ``val/val_annotations.txt``. Decoded
splits are cached (see :mod:`fortify.data.cache`; reader option ``cache_dir``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fortify.data.cache import CacheDirOption
from fortify.data.readers._common import (
    candidate_dirs,
    check_image_size,
    decode_splits,
    list_images,
    missing,
)
from fortify.data.registry import ReaderResult, register_reader
from fortify.errors import DataError

log = logging.getLogger(__name__)

FOLDER = "tiny-imagenet-200"
CLASS_ORDERS = ("wnids", "sorted")
READER_VERSION = 1  # bump when the output for the same files changes (invalidates caches)


def _locate(root: str | None) -> tuple[Path | None, list[Path]]:
    dirs = candidate_dirs(root, [FOLDER])
    for d in dirs:
        if (d / "wnids.txt").is_file() and (d / "train").is_dir() and (d / "val").is_dir():
            return d, dirs
    return None, dirs


def read_val_annotations(path: Path, wnid_index: dict[str, int]) -> list[tuple[str, int]]:
    """(file name, label) pairs from ``val_annotations.txt`` (``name<TAB>wnid<TAB>bbox...``)."""
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(f"{path}:{lineno}: expected '<file>\\t<wnid>\\t...', got {line!r}")
        fname, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in wnid_index:
            raise DataError(
                f"{path}:{lineno}: class {wnid!r} is not listed in wnids.txt "
                f"({len(wnid_index)} classes)"
            )
        items.append((fname, wnid_index[wnid]))
    return items


@register_reader("tiny-imagenet")
def read_tiny_imagenet(
    root: str | None = None,
    download: bool = False,
    image_size: int | None = None,
    cache_dir: CacheDirOption = None,
    class_order: str = "wnids",
) -> ReaderResult:
    """Tiny-ImageNet: 100k/10k RGB 64×64 images, 200 classes; ε = 8/255, crop-flip.

    ``image_size``: resize (shorter side + centre crop) to this size; None keeps 64×64.
    Classes are the WordNet ids in ``wnids.txt`` order, or with ``class_order="sorted"`` in
    sorted order — torchvision ``ImageFolder``'s order, which releases trained through it use
    (e.g. RiFT's Tiny-ImageNet checkpoints). ``cache_dir``: see
    :func:`fortify.data.cache.resolve_cache_dir`.
    """
    check_image_size(image_size, "tiny-imagenet", allow_none=True)
    if class_order not in CLASS_ORDERS:
        raise DataError(
            f"tiny-imagenet class_order {class_order!r} is not one of {list(CLASS_ORDERS)}"
        )
    d, looked = _locate(root)
    if d is None:
        raise missing(
            "tiny-imagenet",
            looked,
            f"{FOLDER}/ with wnids.txt, train/ and val/",
            "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into root "
            "(no automatic download)" + (" — download=True is not supported" if download else ""),
        )
    wnids = [w.strip() for w in (d / "wnids.txt").read_text().splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{d / 'wnids.txt'}: expected unique class ids, one per line")
    if class_order == "sorted":
        wnids = sorted(wnids)
    index = {w: i for i, w in enumerate(wnids)}
    train_items: list[tuple[Path, int]] = []
    for w, label in index.items():
        folder = d / "train" / w / "images"
        if not folder.is_dir():
            raise DataError(f"tiny-imagenet: missing training folder {folder} for class {w}")
        train_items.extend((p, label) for p in list_images(folder))
    ann = d / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataError(f"tiny-imagenet: missing {ann} (labels of the validation images)")
    val_dir = d / "val" / "images"
    test_items = []
    for fname, label in read_val_annotations(ann, index):
        p = val_dir / fname
        if not p.is_file():
            raise DataError(f"tiny-imagenet: {ann} lists {fname} but {p} does not exist")
        test_items.append((p, label))
    test_items.sort(key=lambda t: (t[1], t[0].name))  # regroup by class
    sets = decode_splits(
        "tiny-imagenet",
        READER_VERSION,
        d,
        {"train": train_items, "test": test_items},
        image_size,
        "RGB",
        # the split rules are in the items: which files, their labels and order
        {} if class_order == "wnids" else {"class_order": class_order},
        cache_dir,
    )
    train, test = sets["train"], sets["test"]
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"tiny-imagenet: train images are {tuple(train.images.shape[2:])}, test images "
            f"{tuple(test.images.shape[2:])}; pass image_size=N to resize both"
        )
    return train, test, len(wnids), wnids, 8 / 255, "crop-flip"

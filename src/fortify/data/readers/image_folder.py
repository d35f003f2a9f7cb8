"""A generic labelled image folder: ``root/train/<class>/*`` and ``root/test/<class>/*``.

Decoded splits are cached (see :mod:`fortify.data.cache`; reader option ``cache_dir``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fortify.data.cache import CacheDirOption
from fortify.data.readers._common import (
    check_image_size,
    decode_splits,
    list_images,
    missing,
)
from fortify.data.registry import ReaderResult, register_reader
from fortify.errors import DataError

log = logging.getLogger(__name__)

_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
READER_VERSION = 1  # bump when the output for the same files changes (invalidates caches)


def _class_dirs(split_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(split_dir.iterdir()) if p.is_dir()}


def _is_grey(paths: list[Path]) -> bool:
    """True when every image is single-channel (reads only the file headers)."""
    from PIL import Image, UnidentifiedImageError

    for p in paths:
        try:
            with Image.open(p) as im:
                if im.mode not in _GREY_MODES:
                    return False
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot read image {p}: {e}") from e
        except Image.DecompressionBombError as e:
            raise DataError(f"refusing image {p}: {e} (a decompression bomb?)") from e
        except Exception as e:  # noqa: BLE001 - PIL reports broken files with many error types
            raise DataError(f"cannot read image {p}: {type(e).__name__}: {e}") from e
    return True


@register_reader("image-folder")
def read_image_folder(
    root: str | None = None,
    download: bool = False,
    image_size: int | None = 64,
    grayscale: bool | None = None,
    cache_dir: CacheDirOption = None,
) -> ReaderResult:
    """Any PIL-readable images in ``root/train/<class>/`` and ``root/test/<class>/``.

    Classes are the sorted sub-folder names of ``train/``; ``test/`` may only use those.
    ``image_size``: resize (shorter side + centre crop) to ``image_size``²; None keeps the
    original size, which must then be the same for every image. ``grayscale``: force 1 (True)
    or 3 (False) channels; None: 1 channel when every image is greyscale, else RGB.
    ``cache_dir``: see :func:`fortify.data.cache.resolve_cache_dir`. ε = 8/255, crop-flip
    augmentation.
    """
    check_image_size(image_size, "image-folder", allow_none=True)
    if grayscale is not None and not isinstance(grayscale, bool):
        raise DataError(f"image-folder: grayscale must be None, True or False, got {grayscale!r}")
    if root is None:
        raise DataError("image-folder needs root=<folder with train/ and test/ sub-folders>")
    base = Path(root).expanduser()
    lacking = [s for s in ("train", "test") if not (base / s).is_dir()]
    if lacking:
        raise missing(
            "image-folder",
            [base],
            " and ".join(f"{s}/" for s in lacking) + " (one sub-folder per class)",
            "arrange the images as root/train/<class>/<image> and root/test/<class>/<image>",
        )
    train_dirs, test_dirs = _class_dirs(base / "train"), _class_dirs(base / "test")
    if not train_dirs:
        raise DataError(f"image-folder: {base / 'train'} has no class sub-folders")
    unknown = sorted(set(test_dirs) - set(train_dirs))
    if unknown:
        raise DataError(
            f"image-folder: test classes {', '.join(unknown)} do not appear in train/ "
            f"(train classes: {', '.join(train_dirs)})"
        )
    classes = list(train_dirs)
    index = {c: i for i, c in enumerate(classes)}

    def items(dirs: dict[str, Path]) -> list[tuple[Path, int]]:
        return [(p, index[c]) for c, d in dirs.items() for p in list_images(d)]

    train_items, test_items = items(train_dirs), items(test_dirs)
    if not train_items or not test_items:
        which = "train" if not train_items else "test"
        raise DataError(f"image-folder: no images found under {base / which}")

    def mode() -> str:  # only needed when something is decoded (reads every file's header)
        grey = grayscale
        if grey is None:
            grey = _is_grey([p for p, _ in train_items + test_items])
        return "L" if grey else "RGB"

    sets = decode_splits(
        "image-folder",
        READER_VERSION,
        base,
        {"train": train_items, "test": test_items},
        image_size,
        mode,
        {"grayscale": grayscale},
        cache_dir,
    )
    train, test = sets["train"], sets["test"]
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"image-folder: train images are {tuple(train.images.shape[2:])}, test images "
            f"{tuple(test.images.shape[2:])}; pass image_size=N to resize both"
        )
    return train, test, len(classes), classes, 8 / 255, "crop-flip"

"""Helpers shared by the readers: where to look for files, error messages, image decoding."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fortify.data.base import ImageSet
from fortify.data.cache import CacheDirOption, cached_imagesets
from fortify.errors import DataError

log = logging.getLogger(__name__)

DATA_ENV = "FORTIFY_DATA"
# Bump when _decode's output for the same file and settings changes (invalidates caches).
DECODE_VERSION = 1
DEFAULT_ROOT = "data"
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)


def base_roots(root: str | os.PathLike[str] | None) -> list[Path]:
    """The base directories searched for a dataset.

    ``root`` when given (a :class:`DataError` if it is a file); otherwise ``$FORTIFY_DATA``
    (if set) and ``./data``.
    """
    if root is not None:
        path = Path(root).expanduser()
        if path.exists() and not path.is_dir():
            raise DataError(f"data root {str(path)!r} is a file; give the folder holding the data")
        return [path]
    roots = []
    if os.environ.get(DATA_ENV):
        roots.append(Path(os.environ[DATA_ENV]).expanduser())
    roots.append(Path(DEFAULT_ROOT))
    return roots


def download_root(root: str | os.PathLike[str] | None) -> Path:
    """Where downloads go: ``root``, else ``$FORTIFY_DATA``, else ``./data``."""
    return base_roots(root)[0]


def candidate_dirs(
    root: str | os.PathLike[str] | None, subdirs: Sequence[str] = (), extra: Iterable[str] = ()
) -> list[Path]:
    """``base`` and ``base/<sub>`` for every base root, then ``extra`` (system locations).

    An explicit ``root`` that does not exist gets no ``extra`` locations: a mistyped root is
    reported (or downloaded into), never silently replaced by a system copy.
    """
    out: list[Path] = []
    bases = base_roots(root)
    for base in bases:
        out.append(base)
        out.extend(base / s for s in subdirs)
    if root is None or bases[0].is_dir():
        out.extend(Path(e) for e in extra)
    return list(dict.fromkeys(out))  # first occurrence of each folder, in order


def missing(dataset: str, looked: Sequence[Path], need: str, how: str) -> DataError:
    """A DataError for a dataset whose files were not found anywhere."""
    where = (
        "\n  ".join(f"{d.absolute()}{'' if d.exists() else ' (does not exist)'}" for d in looked)
        if looked
        else "(nowhere)"
    )
    return DataError(
        f"{dataset}: could not find {need}. Looked in:\n  {where}\n"
        f"To obtain it: {how} (pass root=... / data.root, or set ${DATA_ENV})."
    )


def first_existing(dirs: Sequence[Path], names: Sequence[str]) -> Path | None:
    """The first ``dir/name`` (in ``dirs`` order, then ``names`` order) that is a file."""
    for d in dirs:
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def check_image_size(image_size: int | None, dataset: str, allow_none: bool = False) -> None:
    """Raise unless ``image_size`` is a positive int (or None when allowed)."""
    if image_size is None and allow_none:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        allowed = "None or an integer >= 1" if allow_none else "an integer >= 1"
        raise DataError(f"{dataset}: image_size must be {allowed}, got {image_size!r}")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (by extension, case-insensitive), sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _decode(path: Path, image_size: int | None, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if image_size is not None and im.size != (image_size, image_size):
                # Resize the shorter side to image_size, then centre-crop a square.
                w, h = im.size
                s = image_size / min(w, h)
                nw, nh = max(image_size, round(w * s)), max(image_size, round(h * s))
                im = im.resize((nw, nh), Image.Resampling.BILINEAR)
                left, top = (nw - image_size) // 2, (nh - image_size) // 2
                im = im.crop((left, top, left + image_size, top + image_size))
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    except Image.DecompressionBombError as e:
        raise DataError(
            f"refusing image {path}: {e} (a decompression bomb, or a huge image: fortify "
            "decodes at most PIL.Image.MAX_IMAGE_PIXELS pixels per file)"
        ) from e
    except Exception as e:  # noqa: BLE001 - PIL reports broken files with many error types
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return arr[:, :, None] if arr.ndim == 2 else arr


def load_images(
    paths: Sequence[Path], image_size: int | None, mode: str = "RGB", workers: int | None = None
) -> torch.Tensor:
    """Decode image files to one uint8 tensor (N, C, H, W).

    ``mode`` is the PIL mode (``"RGB"`` → C=3, ``"L"`` → C=1). With ``image_size`` each image's
    shorter side is resized to ``image_size`` and the centre square is kept; with None every
    image must already have the same size.
    """
    if not paths:
        channels = 1 if mode == "L" else 3
        size = image_size or 1
        return torch.zeros(0, channels, size, size, dtype=torch.uint8)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        arrays = list(pool.map(lambda p: _decode(p, image_size, mode), paths))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        examples: dict[tuple[int, ...], Path] = {}
        for p, a in zip(paths, arrays):
            examples.setdefault(a.shape[:2], p)
        listing = ", ".join(f"{p.name}: {s[1]}x{s[0]}" for s, p in list(examples.items())[:4])
        raise DataError(
            f"images have different sizes ({listing}); pass image_size=N to resize them to NxN"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def per_class_split(
    files_by_class: Sequence[Sequence[Path]], test_fraction: float, seed: int
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Deterministic per-class train/test split of file lists.

    Each class's files are sorted by name, permuted by a generator seeded with ``(seed, class
    index)``, and the first ``round(test_fraction * n)`` (at least 1 when the class has >= 2
    files) go to test. Returns (train, test) lists of (path, label), each sorted by label then
    name.
    """
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for label, files in enumerate(files_by_class):
        files = sorted(files, key=lambda p: p.name)
        n = len(files)
        n_test = max(1, round(test_fraction * n)) if n >= 2 else 0
        perm = np.random.default_rng([seed, label]).permutation(n)
        test_idx = set(perm[:n_test].tolist())
        for i, f in enumerate(files):
            (test if i in test_idx else train).append((f, label))
    return train, test


def imageset_from_files(
    items: Sequence[tuple[Path, int]], image_size: int | None, mode: str = "RGB"
) -> ImageSet:
    """Decode ``(path, label)`` items into an :class:`ImageSet`."""
    images = load_images([p for p, _ in items], image_size, mode)
    labels = torch.tensor([lab for _, lab in items], dtype=torch.int64)
    return ImageSet(images, labels)


def decode_splits(
    dataset: str,
    reader_version: int,
    source_root: Path,
    splits: Mapping[str, Sequence[tuple[Path, int]]],
    image_size: int | None,
    mode: str | Callable[[], str],
    settings: Mapping[str, Any],
    cache_dir: CacheDirOption = None,
) -> dict[str, ImageSet]:
    """Decode each split's ``(path, label)`` items with :func:`load_images`, through the cache.

    Args:
        dataset: registry name, for file names and log lines.
        reader_version: the reader's version constant; bump it when the reader's output for the
            same files changes (part of the cache key).
        source_root: the folder holding the image files.
        splits: split name → items in dataset order.
        image_size: side in pixels after resize + centre crop; None keeps the original size.
        mode: PIL mode (``"RGB"``/``"L"``, part of the key), or a function computing it, called
            at most once and only when some split has to be decoded (e.g. a scan of every file's
            header); then ``settings`` must hold the option it is derived from.
        settings: the reader's other result-determining settings (colour option, split rules),
            JSON-serialisable; part of the cache key.
        cache_dir: reader option ``cache_dir`` (see :func:`fortify.data.cache.resolve_cache_dir`).
    Returns:
        split name → :class:`ImageSet` (uint8 (N, C, H, W), int64 labels (N,)).
    """
    from PIL import __version__ as pillow_version

    resolved: list[str] = [] if callable(mode) else [mode]

    def decode(split: str, items: Sequence[tuple[Path, int]]) -> ImageSet:
        if not resolved:
            resolved.append(mode())  # type: ignore[operator]
        log.info("%s: decoding %d %s images", dataset, len(items), split)
        return imageset_from_files(items, image_size, resolved[0])

    key_settings = {"image_size": image_size, **settings}
    if not callable(mode):
        key_settings["mode"] = mode
    versions = {"reader": reader_version, "decode": DECODE_VERSION, "pillow": pillow_version}
    return cached_imagesets(
        dataset, source_root, splits, key_settings, versions, decode, cache_dir=cache_dir
    )


def reshape_set(
    images: ImageSet, dataset: str, image_size: int | None = None, channels: int | None = None
) -> ImageSet:
    """Resize ``images`` to ``image_size``² (bilinear, as torchvision's ``Resize`` of the FPD
    release) and/or repeat a grey channel to ``channels`` (1 or 3), in chunks; uint8 out.

    Args:
        images: uint8 (N, C, H, W). image_size: side of the square output, None: unchanged.
        channels: None (unchanged), 1, or 3 (only from 1 channel: the grey copied three times).
    """
    check_image_size(image_size, dataset, allow_none=True)
    c = images.images.shape[1]
    if channels is not None and (
        isinstance(channels, bool) or channels not in (1, 3) or (channels != c and c != 1)
    ):
        raise DataError(
            f"{dataset}: channels must be None, {c} or (from grey images) 3, got {channels!r}"
        )
    out = images.images
    if image_size is not None and tuple(out.shape[-2:]) != (image_size, image_size):
        parts = []
        for chunk in torch.split(out, 4096):
            r = torch.nn.functional.interpolate(
                chunk.float(), size=(image_size, image_size), mode="bilinear", antialias=True
            )
            parts.append(r.round_().clamp_(0, 255).to(torch.uint8))
        out = torch.cat(parts)
    if channels is not None and channels != out.shape[1]:
        out = out.expand(-1, channels, -1, -1).contiguous()
    return ImageSet(out, images.labels)

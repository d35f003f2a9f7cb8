"""On-disk cache of decoded image-file datasets, so that only the first run decodes the files.

Readers of datasets stored as one image file per sample (Caltech-101/256, Tiny-ImageNet, image
folders) decode and resize every file with PIL, which takes minutes for Caltech-256's 30k JPEGs.
:func:`cached_imagesets` keeps each decoded split as uint8 arrays and reads them back on the next
run when nothing that could change them has changed.

Where: the reader option ``cache_dir`` when given, else ``$FORTIFY_CACHE_DIR``, else
``~/.cache/fortify/datasets``. ``off``, ``none``, ``false`` or ``0`` (either place, any case) or
``cache_dir=False`` disable the cache: nothing is read or written. A cache directory inside the
dataset's own folder is refused (with a warning), so the data root is never written to.

Files, one pair per (dataset, split, data folder, resize/crop settings)::

    <dataset>-<split>-<where>.safetensors   "images" uint8 (N, C, H, W), "labels" int64 (N,)
    <dataset>-<split>-<where>.json          sidecar {"format_version", "key", "sha256",
                                            "size_bytes", "num_images", "image_shape", ...}

``<where>`` is a digest of the data folder's absolute path and the settings, so a rebuild after a
change replaces the previous pair instead of adding one. ``key`` is the SHA-256 of: the cache
format version, the dataset name, the reader's and the decoder's version constants, the Pillow
version, the data folder, the settings (image size, colour mode, split rules), the split name and
a digest of every source file of every split as (relative path, label, size in bytes, mtime in
ns). A cache is used only when its sidecar holds the expected key and the data file's SHA-256
equals the one recorded; otherwise it is ignored with a warning and rebuilt. Changing a file's
content without changing its size or mtime (e.g. ``touch -r``) is not detected: delete the cache
files or disable the cache in that case.

Writes go through :mod:`fortify.utils.atomic` (temporary file, fsync, rename): data file first,
then sidecar. An interrupted write leaves the previous pair, or a new data file next to the old
sidecar, which the hash check rejects. Concurrent writers (e.g. DDP ranks, which each load the
dataset) each write complete files atomically under the same names; all of them decode the same
bytes for the same key, and any mixed pair fails the hash check, so no rank coordination is
needed. A failed write (read-only or full disk) logs a warning and the decoded data is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fortify.data.base import ImageSet
from fortify.errors import DataError
from fortify.utils.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

CACHE_ENV = "FORTIFY_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/fortify/datasets")
FORMAT_VERSION = 1
OFF_VALUES = ("off", "none", "false", "0")
DATA_SUFFIX = ".safetensors"

# The ``cache_dir`` reader option: None (environment / default), a directory, True (same as
# None) or False / "off" / "none" (disabled).
CacheDirOption = str | os.PathLike[str] | bool | None
Items = Sequence[tuple[Path, int]]


def resolve_cache_dir(cache_dir: CacheDirOption = None) -> Path | None:
    """The cache directory to use, or None when caching is disabled.

    Args:
        cache_dir: None or True: ``$FORTIFY_CACHE_DIR`` when set and not empty, else
            ``~/.cache/fortify/datasets``; False or one of ``off, none, false, 0`` (any case):
            disabled; any other string or path: that directory (``~`` expanded).
    Raises:
        DataError: ``cache_dir`` is of another type.
    """
    if cache_dir is None or cache_dir is True:
        env = os.environ.get(CACHE_ENV, "").strip()
        if not env:
            return DEFAULT_CACHE_DIR.expanduser()
        cache_dir = env
    if cache_dir is False:
        return None
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise DataError(
            f"cache_dir must be None (${CACHE_ENV} or {DEFAULT_CACHE_DIR}), a directory path, "
            f"True, or False / {'/'.join(repr(v) for v in OFF_VALUES)} to disable the dataset "
            f"cache; got {cache_dir!r} of type {type(cache_dir).__name__}"
        )
    text = os.fspath(cache_dir)
    if text.strip().lower() in OFF_VALUES:
        return None
    return Path(text).expanduser()


def _sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _relative(path: Path, prefix: str) -> str:
    """``path`` relative to the folder ``prefix`` (ending in a separator), else absolute.
    String slicing: ``Path.relative_to`` costs ~10 µs a file, noticeable for 100k files."""
    text = str(path)
    return text[len(prefix) :] if text.startswith(prefix) else str(path.absolute())


def sources_digest(splits: Mapping[str, Items], root: Path) -> tuple[str, int]:
    """SHA-256 over every (split, path relative to ``root``, label, size, mtime_ns) and the count.

    Raises:
        DataError: a listed file cannot be stat'ed (e.g. deleted while listing).
    """
    h = hashlib.sha256()
    n = 0
    prefix = os.path.join(str(root), "")
    for split in sorted(splits):
        for path, label in splits[split]:
            try:
                st = path.stat()
            except OSError as e:
                raise DataError(f"cannot read image {path}: {e}") from e
            row = [split, _relative(path, prefix), int(label), st.st_size, st.st_mtime_ns]
            h.update(json.dumps(row).encode("utf-8") + b"\n")
            n += 1
    return h.hexdigest(), n


def cached_imagesets(
    dataset: str,
    source_root: Path,
    splits: Mapping[str, Items],
    settings: Mapping[str, Any],
    versions: Mapping[str, Any],
    decode: Callable[[str, Items], ImageSet],
    cache_dir: CacheDirOption = None,
) -> dict[str, ImageSet]:
    """Each split's decoded images, read from the cache when valid, else decoded and cached.

    Args:
        dataset: the registry name (first part of the file names).
        source_root: the folder holding the image files (hashed with relative paths).
        splits: split name → (image file, label) items in dataset order.
        settings: everything else that determines the arrays (image size, colour mode, split
            rules); JSON-serialisable. Part of the file name and of the key.
        versions: version constants of the reader, decoder and image library; part of the key
            only, so bumping one replaces the old files.
        decode: ``decode(split, items) -> ImageSet`` (uint8 (N, C, H, W), labels (N,)); called
            only for splits without a valid cache.
        cache_dir: see :func:`resolve_cache_dir`.
    Returns:
        split name → :class:`ImageSet`, identical to ``decode``'s result.
    """
    directory = resolve_cache_dir(cache_dir)
    root = Path(source_root).absolute()
    if directory is not None and directory.resolve().is_relative_to(root.resolve()):
        log.warning(
            "%s: dataset cache directory %s lies inside the data folder %s; the cache never "
            "writes into a data folder, so it is off for this load (choose another cache_dir / "
            "$%s)",
            dataset,
            directory,
            root,
            CACHE_ENV,
        )
        directory = None
    if directory is None:
        log.debug("%s: dataset cache disabled", dataset)
        return {split: decode(split, items) for split, items in splits.items()}
    sources, n_files = sources_digest(splits, Path(source_root))
    where = _sha256_json({"root": str(root), "settings": settings})[:16]
    out = {}
    for split, items in splits.items():
        key_parts = {
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            "split": split,
            "root": str(root),
            "settings": dict(settings),
            "versions": dict(versions),
            "sources_sha256": sources,
            "num_files": n_files,
        }
        key = _sha256_json(key_parts)
        data_path = directory / f"{dataset}-{split}-{where}{DATA_SUFFIX}"
        labels = torch.tensor([int(lab) for _, lab in items], dtype=torch.int64)
        cached = _read(data_path, key, labels)
        if cached is not None:
            log.info(
                "%s %s: loaded %d images from cache %s", dataset, split, len(cached), data_path
            )
            out[split] = cached
            continue
        decoded = decode(split, items)
        _write(data_path, key, key_parts, decoded)
        out[split] = decoded
    return out


def sidecar_of(data_path: Path) -> Path:
    """The JSON sidecar next to a cache data file."""
    return data_path.with_suffix(".json")


def _ignore(data_path: Path, why: str) -> None:
    log.warning("ignoring dataset cache %s: %s; decoding the images again", data_path, why)


def _read(data_path: Path, key: str, labels: torch.Tensor) -> ImageSet | None:
    """The cached set at ``data_path`` if its sidecar has ``key`` and its hash matches, else
    None (a warning says why unless there is no cache at all)."""
    side = sidecar_of(data_path)
    if not side.exists() and not data_path.exists():
        log.debug("no dataset cache at %s", data_path)
        return None
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        _ignore(data_path, f"its sidecar {side.name} is missing or unreadable ({e})")
        return None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        version = record.get("format_version") if isinstance(record, dict) else None
        _ignore(data_path, f"sidecar format_version {version!r}, expected {FORMAT_VERSION}")
        return None
    if record.get("key") != key:
        _ignore(
            data_path,
            "it is stale (source files, settings or versions changed since it was written)",
        )
        return None
    try:
        data = data_path.read_bytes()
    except OSError as e:
        _ignore(data_path, f"cannot read it ({e})")
        return None
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.get("sha256"):
        _ignore(
            data_path,
            f"its SHA-256 {digest[:12]}… differs from the sidecar's "
            f"{str(record.get('sha256'))[:12]}… (corrupt or truncated file, or an interrupted "
            "write)",
        )
        return None
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for malformed files
        _ignore(data_path, f"not a readable safetensors file ({e})")
        return None
    images, got = tensors.get("images"), tensors.get("labels")
    if (
        set(tensors) != {"images", "labels"}
        or images is None
        or images.dtype != torch.uint8
        or images.dim() != 4
        or got is None
        or not torch.equal(got, labels)
        or len(images) != len(labels)
    ):
        _ignore(data_path, "its tensors are not uint8 images with the expected labels")
        return None
    return ImageSet(images, got)


def _write(data_path: Path, key: str, key_parts: Mapping[str, Any], data: ImageSet) -> None:
    """Atomically write ``data`` and its sidecar; a failure only logs a warning."""
    blob = st_save({"images": data.images.contiguous(), "labels": data.labels.contiguous()})
    record = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "size_bytes": len(blob),
        "num_images": len(data),
        "image_shape": list(data.images.shape[1:]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "key_parts": dict(key_parts),
    }
    try:
        atomic_write_bytes(data_path, blob)
        atomic_write_text(sidecar_of(data_path), json.dumps(record, indent=2, default=str) + "\n")
    except OSError as e:
        log.warning("could not write dataset cache %s (%s); continuing without it", data_path, e)
        return
    log.info("cached %d images in %s", len(data), data_path)

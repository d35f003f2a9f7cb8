"""Dataset registry: ``load_dataset(name, ...)`` → :class:`~fortify.data.base.DataSplits`."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from fortify.data.base import DataSplits, ImageSet, check_labels, split_validation
from fortify.errors import ConfigError, DataError
from fortify.registry import Registry
from fortify.utils.runtime import check_seed

log = logging.getLogger(__name__)

# A reader returns (train_full, test, num_classes, classes, default_eps, default_augment).
ReaderResult = tuple[ImageSet, ImageSet, int, list[str], float, str]
Reader = Callable[..., ReaderResult]
#: Every dataset reader; the modules of :mod:`fortify.data.readers` register at import.
READERS: Registry[Reader] = Registry("dataset")


def register_reader(name: str) -> Callable[[Reader], Reader]:
    """Register ``reader(root: str | None, download: bool, **options) -> (...)`` under ``name``.

    Reader-specific options (e.g. ``image_size``) are keyword parameters with defaults; they are
    reached through ``load_dataset(name, ..., **options)``.
    """

    def deco(fn: Reader) -> Reader:
        return READERS.register(name, fn)

    return deco


def available() -> list[str]:
    """Names of every registered dataset."""
    return READERS.available()


def load_dataset(
    name: str,
    root: str | None = None,
    *,
    val_size: int = 5000,
    split_seed: int = 0,
    download: bool = False,
    train_subset: int | None = None,
    test_subset: int | None = None,
    **options: Any,
) -> DataSplits:
    """Load dataset ``name`` with a validation split of ``val_size`` training images.

    ``val_size`` is capped at a fifth of the training set for small datasets (e.g. digits).
    ``options`` are passed to the dataset's reader (see :func:`reader_options`), e.g.
    ``image_size=64`` for ``caltech101``; an option the reader does not know raises
    :class:`~fortify.errors.DataError`.
    """
    reader = READERS.get(name)
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
        raise DataError(f"val_size must be an integer >= 0, got {val_size!r}")
    for what, n in (("train_subset", train_subset), ("test_subset", test_subset)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise DataError(f"{what} must be None (all) or an integer >= 1, got {n!r}")
    check_seed(split_seed, "split_seed")
    if not isinstance(download, bool):
        raise DataError(f"download must be True or False, got {download!r}")
    allowed = reader_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise DataError(
            f"dataset {name!r} does not accept option(s) {', '.join(unknown)}; "
            f"accepted options: {accepted}"
        )
    result = reader(root, download, **options)
    train_full, test, num_classes, classes, eps, augment = result
    check_labels(train_full.labels, num_classes, f"{name} training labels")
    check_labels(test.labels, num_classes, f"{name} test labels")
    if val_size > len(train_full) // 5:
        log.info(
            "%s: val_size %d capped at %d (a fifth of %d training images)",
            name,
            val_size,
            len(train_full) // 5,
            len(train_full),
        )
        val_size = len(train_full) // 5
    train, val = split_validation(train_full, val_size, split_seed)
    return DataSplits(
        name=name,
        train=train.head(train_subset),
        val=val,
        test=test.head(test_subset),
        num_classes=num_classes,
        classes=classes,
        default_eps=eps,
        default_augment=augment,
    )


def reader_options(name: str) -> dict[str, Any]:
    """The reader-specific options of dataset ``name`` and their defaults."""
    params = list(inspect.signature(READERS.get(name)).parameters.values())[2:]
    return {
        p.name: p.default for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def load_from_config(
    data_cfg: object, root: str | None = None, *, subsets: bool = True
) -> DataSplits:
    """Load the dataset described by a :class:`fortify.config.DataConfig` (or its dict form).

    Args:
        data_cfg: the ``data`` section (dataclass or the dict stored in a checkpoint sidecar).
        root: overrides ``data_cfg.root`` when given (e.g. ``--data-root``).
        subsets: apply ``train_subset``/``test_subset`` (evaluation of a saved run passes False
            to see the whole test split).
    """
    from fortify.config import DataConfig, from_dict

    if isinstance(data_cfg, DataConfig):
        cfg = data_cfg
    elif isinstance(data_cfg, Mapping):
        cfg = from_dict(DataConfig, dict(data_cfg))
    else:
        raise ConfigError(f"data config must be a DataConfig or a mapping, got {data_cfg!r}")
    return load_dataset(
        cfg.name,
        root or cfg.root,
        val_size=cfg.val_size,
        split_seed=cfg.split_seed,
        download=cfg.download,
        train_subset=cfg.train_subset if subsets else None,
        test_subset=cfg.test_subset if subsets else None,
        **cfg.options,
    )

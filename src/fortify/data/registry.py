"""Dataset registry: ``load_dataset(name, ...)`` → :class:`~fortify.data.base.DataSplits`."""

from __future__ import annotations

from collections.abc import Callable

from fortify.data.base import DataSplits, ImageSet, check_labels, split_validation
from fortify.errors import unknown_name

# A reader returns (train_full, test, num_classes, classes, default_eps, default_augment).
Reader = Callable[..., tuple[ImageSet, ImageSet, int, list[str], float, str]]
_READERS: dict[str, Reader] = {}


def register_reader(name: str) -> Callable[[Reader], Reader]:
    """Register ``reader(root: str | None, download: bool) -> (...)`` under ``name``."""

    def deco(fn: Reader) -> Reader:
        _READERS[name] = fn
        return fn

    return deco


def available() -> list[str]:
    _ensure_loaded()
    return sorted(_READERS)


def load_dataset(
    name: str,
    root: str | None = None,
    *,
    val_size: int = 5000,
    split_seed: int = 0,
    download: bool = False,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> DataSplits:
    """Load dataset ``name`` with a validation split of ``val_size`` training images.

    ``val_size`` is capped at a fifth of the training set for small datasets (e.g. digits).
    """
    _ensure_loaded()
    if name not in _READERS:
        raise unknown_name("dataset", name, _READERS)
    train_full, test, num_classes, classes, eps, augment = _READERS[name](root, download)
    check_labels(train_full.labels, num_classes, f"{name} training labels")
    check_labels(test.labels, num_classes, f"{name} test labels")
    val_size = min(val_size, len(train_full) // 5)
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


def _ensure_loaded() -> None:
    from fortify.data import readers  # noqa: F401  (registers every reader)

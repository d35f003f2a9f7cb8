"""Datasets as in-memory uint8 tensors with train / validation / test splits.

``load_dataset(name, root=None, val_size=..., split_seed=0)`` returns :class:`DataSplits`;
:class:`TensorLoader` batches an :class:`ImageSet` on a device with batched augmentation.
"""

from fortify.data.augment import augment_batch
from fortify.data.base import DataSplits, ImageSet, split_validation
from fortify.data.loader import TensorLoader
from fortify.data.registry import available, load_dataset, load_from_config

# Importing the readers registers every dataset.
from fortify.data import readers  # noqa: E402,F401  isort: skip

__all__ = [
    "DataSplits",
    "ImageSet",
    "TensorLoader",
    "augment_batch",
    "available",
    "load_dataset",
    "load_from_config",
    "split_validation",
]

"""Datasets as in-memory uint8 tensors with train / validation / test splits.

``load_dataset(name, root=None, val_size=..., split_seed=0)`` returns :class:`DataSplits`.
"""

from fortify.data.base import DataSplits, ImageSet, split_validation
from fortify.data.registry import available, load_dataset

__all__ = ["DataSplits", "ImageSet", "available", "load_dataset", "split_validation"]

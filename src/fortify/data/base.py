"""In-memory image datasets: uint8 tensors (N, C, H, W) plus int64 labels, and their splits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fortify.errors import DataError
from fortify.utils.shapes import as_chw


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W) in [0, 255] and labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        for what, t in (("images", self.images), ("labels", self.labels)):
            if not isinstance(t, torch.Tensor):
                raise DataError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"images must be a uint8 tensor (N, C, H, W); got {self.images.dtype} "
                f"with shape {tuple(self.images.shape)}"
            )
        if self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise DataError(
                f"labels must be 1-D with one entry per image ({len(self.images)}), "
                f"got shape {tuple(self.labels.shape)}"
            )
        lab = self.labels
        if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
            raise DataError(f"labels must hold integer class indices (int64), got {lab.dtype}")
        if len(lab) and int(lab.min()) < 0:
            raise DataError(f"labels must be class indices >= 0, got {int(lab.min())}")
        self.labels = lab.long()

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor | slice) -> ImageSet:
        """A new set with the selected rows (shares no storage with a slice)."""
        return ImageSet(self.images[index], self.labels[index])

    def head(self, n: int | None) -> ImageSet:
        """The first ``n`` items (all when ``n`` is None); :class:`DataError` unless ``n`` is
        None or an integer >= 0."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise DataError(f"the number of items must be None (all) or an integer >= 0, got {n!r}")
        return self if n is None or n >= len(self) else self.subset(slice(0, n))

    def floats(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as float32 in [0, 1] and the labels, on ``device``."""
        x = self.images.to(device).float().div_(255.0)
        return x, self.labels.to(device)


@dataclass
class DataSplits:
    """A dataset's train / validation / test splits and its facts.

    The validation split is carved from the training data with a fixed seed; model selection
    (best epoch, RiFT's α, ...) uses it and never the test split.
    """

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    classes: list[str] = field(default_factory=list)
    default_eps: float = 8 / 255  # standard L∞ budget in pixel units (see docs/evaluation)
    default_augment: str = "none"  # "crop-flip" for CIFAR-like data

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return as_chw(self.train.images.shape[1:])

    @property
    def in_channels(self) -> int:
        return self.image_shape[0]


def split_validation(full: ImageSet, val_size: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split ``full`` into (train, val) with a seeded permutation; ``val_size`` images go to val."""
    if not 0 <= val_size < len(full):
        raise DataError(
            f"val_size must be in [0, {len(full) - 1}] for a training set of {len(full)} images, "
            f"got {val_size}"
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(full), generator=g)
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return full.subset(train_idx), full.subset(val_idx)


def check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    """Raise if any label is outside [0, num_classes)."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{what}: labels must lie in [0, {num_classes - 1}], found range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )

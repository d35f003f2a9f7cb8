"""A batched loader over an in-memory :class:`~fortify.data.base.ImageSet`.

The uint8 images are copied to the target device once; each batch is gathered there, augmented
on the device (see :mod:`fortify.data.augment`) and converted to float32 in [0, 1]. There are no
worker processes and no per-image Python work.

Randomness is a pure function of ``(seed, epoch)``: the epoch's permutation and the
augmentation draws for every position in it are generated from two independent CPU generators
seeded from ``(seed, epoch)``. Resuming at epoch ``e`` therefore only needs ``set_epoch(e)``;
the loader has no other state. Augmentation draws belong to positions of the global
permutation, so a sample is augmented identically whatever ``world_size`` is.

Distributed sharding (``world_size > 1``): all ranks compute the same permutation; when its
length is not a multiple of ``world_size`` it is **padded** by repeating its first items (like
``torch.utils.data.DistributedSampler``) so every rank gets ``ceil(N / world_size)`` samples and
the same number of batches; rank ``r`` takes positions ``r, r + world_size, ...``. Shards are
disjoint apart from those at most ``world_size - 1`` repeated samples, and together cover every
sample. ``drop_last`` then applies to each rank's last incomplete batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from fortify.data.augment import (
    AugmentParams,
    apply_augment,
    check_augment,
    sample_augment_params,
)
from fortify.data.base import ImageSet
from fortify.errors import DataError
from fortify.utils.runtime import resolve_device
from fortify.utils.shapes import as_hw

log = logging.getLogger(__name__)

_PERM_STREAM, _AUG_STREAM = 0, 1


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator seeded by a well-mixed hash of ``(seed, epoch, stream)``."""
    state = np.random.SeedSequence([seed % 2**63, epoch % 2**63, stream]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _not_int(value: object) -> bool:
    """True unless ``value`` is an int (a bool is not a count)."""
    return isinstance(value, bool) or not isinstance(value, int)


class TensorLoader:
    """Iterate an :class:`ImageSet` in batches of float32 images on ``device``.

    Args:
        data: the images (uint8 N, C, H, W) and int64 labels.
        batch_size: images per batch (per rank).
        shuffle: draw a fresh permutation each epoch (else the data order).
        drop_last: drop this rank's last batch when it has fewer than ``batch_size`` images.
        augment: ``"none"``, ``"crop-flip"``, ``"crop"`` or ``"flip"``.
        crop_padding: padding in pixels for random crops.
        pad_mode: ``"zeros"`` or ``"reflect"`` padding for crops.
        device: where the images are cached and batches are produced (None: CPU).
        seed: base seed; shuffling and augmentation depend only on ``(seed, epoch)``.
        rank, world_size: this process's shard of each epoch (see the module docstring).

    Iterating yields ``(x, y)``: ``x`` float32 (B, C, H, W) in [0, 1] and ``y`` int64 (B,), both
    on ``device``.
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool = False,
        augment: str = "none",
        crop_padding: int = 4,
        pad_mode: str = "zeros",
        device: torch.device | str | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(data, ImageSet):
            raise DataError(f"TensorLoader needs an ImageSet, got {type(data).__name__}")
        if _not_int(batch_size) or batch_size < 1:
            raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if _not_int(world_size) or world_size < 1:
            raise DataError(f"world_size must be an integer >= 1, got {world_size!r}")
        if _not_int(rank) or not 0 <= rank < world_size:
            raise DataError(f"rank must be an integer in [0, {world_size - 1}], got {rank!r}")
        for what, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise DataError(f"{what} must be True or False, got {flag!r}")
        if _not_int(seed):
            raise DataError(f"seed must be an integer, got {seed!r}")
        if len(data) == 0:
            raise DataError("TensorLoader got an empty ImageSet (0 images)")
        check_augment(augment, crop_padding, pad_mode, as_hw(data.images.shape[2:]))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.crop_padding = crop_padding
        self.pad_mode = pad_mode
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.device = resolve_device(device) if device is not None else torch.device("cpu")
        self.epoch = 0
        # The one device copy (uint8, 4x smaller than float); batches are gathered from it.
        self.images = data.images.to(self.device).contiguous()
        self.labels = data.labels.to(self.device)
        self.dataset_size = len(data)
        self.num_samples = -(-self.dataset_size // world_size)  # per rank, after padding
        if drop_last and self.num_samples < batch_size:
            log.warning(
                "drop_last with %d samples per rank and batch_size %d yields no batches",
                self.num_samples,
                batch_size,
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation draws the next iteration uses."""
        if _not_int(epoch) or epoch < 0:
            raise DataError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        """Number of batches this rank yields per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def epoch_plan(self, epoch: int | None = None) -> tuple[torch.Tensor, AugmentParams | None]:
        """This rank's sample indices (int64, CPU) and augmentation draws for ``epoch``.

        Exposed for tests and for inspecting exactly what an epoch will contain.
        """
        epoch = self.epoch if epoch is None else epoch
        n = self.dataset_size
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, epoch, _PERM_STREAM))
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # pad by wrapping around so every rank has the same count
            order = torch.cat([order, order[: total - n]])
        params = None
        if self.augment != "none":
            g = _generator(self.seed, epoch, _AUG_STREAM)
            params = sample_augment_params(total, self.augment, self.crop_padding, g)
            params = params[slice(self.rank, total, self.world_size)]
        return order[self.rank : total : self.world_size], params

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index, params = self.epoch_plan()
        index = index.to(self.device)
        if params is not None:
            params = params.to(self.device)
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = index[sl]
            x = self.images.index_select(0, idx)
            if params is not None:
                x = apply_augment(x, params[sl], self.crop_padding, self.pad_mode)
            yield x.float().div_(255.0), self.labels.index_select(0, idx)

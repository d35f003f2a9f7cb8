"""Image shapes as fixed-length tuples (``(C, H, W)`` and ``(H, W)``), checked."""

from __future__ import annotations

from collections.abc import Iterable

from fortify.errors import ConfigError


def as_chw(shape: Iterable[int]) -> tuple[int, int, int]:
    """``shape`` (e.g. ``tensor.shape[1:]`` of an (N, C, H, W) batch) as ``(C, H, W)`` ints.

    Raises:
        ConfigError: when ``shape`` does not have exactly three positive entries.
    """
    values = tuple(int(v) for v in shape)
    if len(values) != 3 or min(values) < 1:
        raise ConfigError(f"an image shape must be (C, H, W) with positive sizes, got {values}")
    return values[0], values[1], values[2]


def as_hw(shape: Iterable[int]) -> tuple[int, int]:
    """``shape`` (e.g. ``tensor.shape[2:]`` of an (N, C, H, W) batch) as ``(H, W)`` ints."""
    values = tuple(int(v) for v in shape)
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"an image size must be (H, W) with positive sizes, got {values}")
    return values[0], values[1]

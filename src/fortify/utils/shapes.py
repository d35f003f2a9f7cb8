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


def check_chw(shape: object, what: str = "input_shape") -> tuple[int, int, int]:
    """``shape`` as ``(C, H, W)`` if it is a tuple, list or ``torch.Size`` of three integers
    >= 1 (not bools, not floats such as 32.0), else a :class:`ConfigError` naming ``what``: the
    check of a shape a caller passes, where :func:`as_chw` converts a shape read from a
    tensor."""
    if isinstance(shape, (tuple, list)) and len(shape) == 3:
        c, h, w = shape
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (c, h, w)):
            return c, h, w
    raise ConfigError(
        f"{what} must be (C, H, W) with three integers >= 1 (one image's channels, height and "
        f"width), got {shape!r}"
    )


def as_hw(shape: Iterable[int]) -> tuple[int, int]:
    """``shape`` (e.g. ``tensor.shape[2:]`` of an (N, C, H, W) batch) as ``(H, W)`` ints."""
    values = tuple(int(v) for v in shape)
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"an image size must be (H, W) with positive sizes, got {values}")
    return values[0], values[1]

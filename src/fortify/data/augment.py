"""Batched, device-side data augmentation: random crop with padding and horizontal flip.

Everything is index arithmetic on whole batches (no per-image Python loops). The random draws
are separated from their application: :func:`sample_augment_params` draws one offset pair and one
flip bit per image from an explicit generator, :func:`apply_augment` applies them with a single
``gather``. This lets :class:`~fortify.data.loader.TensorLoader` draw the parameters of a whole
epoch from ``(seed, epoch)`` so that augmentation is reproducible and independent of the number
of ranks.

A crop with padding ``p`` of an ``H × W`` image pads it by ``p`` pixels on every side and cuts an
``H × W`` window at a uniformly random offset ``(dy, dx) ∈ [0, 2p]²``; the padded pixels are zeros
(``pad_mode="zeros"``) or the mirror image of the border (``pad_mode="reflect"``, without
repeating the edge pixel, like :func:`torch.nn.functional.pad`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fortify.errors import DataError

AUGMENT_MODES = ("none", "crop-flip", "crop", "flip")
PAD_MODES = ("zeros", "reflect")


@dataclass
class AugmentParams:
    """Per-image augmentation draws for ``N`` images.

    ``dy``, ``dx``: int64 (N,) crop offsets in padded-image pixels, in ``[0, 2 * padding]``
    (``padding`` means no shift). ``flip``: bool (N,), True to mirror horizontally.
    """

    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor

    def to(self, device: torch.device | str | None) -> AugmentParams:
        return AugmentParams(self.dy.to(device), self.dx.to(device), self.flip.to(device))

    def __getitem__(self, index: torch.Tensor | slice) -> AugmentParams:
        return AugmentParams(self.dy[index], self.dx[index], self.flip[index])

    def __len__(self) -> int:
        return len(self.dy)


def check_augment(mode: str, padding: int, pad_mode: str, image_hw: tuple[int, int]) -> None:
    """Raise :class:`DataError` unless the augmentation settings are valid for ``image_hw``."""
    if mode not in AUGMENT_MODES:
        raise DataError(f"augment must be one of {', '.join(AUGMENT_MODES)}; got {mode!r}")
    if pad_mode not in PAD_MODES:
        raise DataError(f"pad_mode must be one of {', '.join(PAD_MODES)}; got {pad_mode!r}")
    if not isinstance(padding, int) or padding < 0:
        raise DataError(f"crop_padding must be an integer >= 0, got {padding!r}")
    if pad_mode == "reflect" and "crop" in mode and padding >= min(image_hw):
        raise DataError(
            f"crop_padding={padding} with pad_mode='reflect' needs images larger than the "
            f"padding; images are {image_hw[0]}x{image_hw[1]} (use padding < {min(image_hw)} "
            f"or pad_mode='zeros')"
        )


def sample_augment_params(
    n: int, mode: str, padding: int, generator: torch.Generator | None = None
) -> AugmentParams:
    """Draw crop offsets and flip bits for ``n`` images on the CPU (``None``: global generator).

    Images without a crop (mode ``"flip"``/``"none"``) get the identity offset ``padding``;
    images without a flip (mode ``"crop"``/``"none"``) get ``flip=False``. The generator is
    always advanced by the same amount for a given ``n``, whatever the mode.
    """
    if mode not in AUGMENT_MODES:
        raise DataError(f"augment must be one of {', '.join(AUGMENT_MODES)}; got {mode!r}")
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    if "crop" not in mode:
        offsets.fill_(padding)
    if "flip" not in mode:
        flip.zero_()
    return AugmentParams(offsets[0].clone(), offsets[1].clone(), flip)


def _source_index(
    pos: torch.Tensor, size: int, pad_mode: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map padded coordinates shifted back by the padding (may be <0 or >=size) to source rows.

    Returns the clamped/reflected index and, for ``zeros``, a validity mask (None for reflect).
    """
    if pad_mode == "reflect":
        pos = pos.abs()  # -k -> k
        pos = torch.where(pos >= size, 2 * (size - 1) - pos, pos)
        return pos, None
    valid = (pos >= 0) & (pos < size)
    return pos.clamp(0, size - 1), valid


def apply_augment(
    x: torch.Tensor, params: AugmentParams, padding: int, pad_mode: str = "zeros"
) -> torch.Tensor:
    """Crop-with-padding and flip a batch according to ``params``.

    Args:
        x: images (B, C, H, W) of any dtype (uint8 or float), on any device.
        params: draws for the ``B`` images, on ``x``'s device.
        padding: crop padding in pixels (the same value the params were drawn with).
        pad_mode: ``"zeros"`` or ``"reflect"``.

    Returns:
        A new tensor with ``x``'s shape, dtype and device. Output pixel ``(i, j)`` of image ``b``
        is padded-image pixel ``(dy_b + i, dx_b + j')`` with ``j' = W-1-j`` if flipped else ``j``.
    """
    b, c, h, w = x.shape
    if len(params) != b:
        raise DataError(f"augment params are for {len(params)} images, the batch has {b}")
    dev = x.device
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    cols = torch.where(params.flip[:, None], (w - 1) - ar_w, ar_w)  # (B, W) flip via where
    rows_src, row_ok = _source_index(params.dy[:, None] - padding + ar_h, h, pad_mode)  # (B, H)
    cols_src, col_ok = _source_index(params.dx[:, None] - padding + cols, w, pad_mode)  # (B, W)
    lin = (rows_src[:, :, None] * w + cols_src[:, None, :]).view(b, 1, h * w)
    out = torch.gather(x.reshape(b, c, h * w), 2, lin.expand(b, c, h * w)).view(b, c, h, w)
    if row_ok is not None and col_ok is not None and padding > 0:
        mask = (row_ok[:, :, None] & col_ok[:, None, :])[:, None]  # (B, 1, H, W)
        out = torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=dev))
    return out


def augment_batch(
    x: torch.Tensor,
    mode: str,
    *,
    padding: int = 4,
    pad_mode: str = "zeros",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment a batch (B, C, H, W) with fresh draws from ``generator`` (a CPU generator).

    Convenience wrapper around :func:`sample_augment_params` + :func:`apply_augment` (``None``:
    torch's global CPU generator); returns ``x`` itself for ``mode="none"``.
    """
    check_augment(mode, padding, pad_mode, (x.shape[2], x.shape[3]))
    if mode == "none":
        return x
    params = sample_augment_params(len(x), mode, padding, generator).to(x.device)
    return apply_augment(x, params, padding, pad_mode)

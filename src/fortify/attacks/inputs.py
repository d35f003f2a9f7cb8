"""Validation of an attack's inputs: images, labels, targets and options, in one pass each."""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch

from fortify.attacks.options import FGSMOptions, PGDOptions, check_loss, check_norm, check_number
from fortify.errors import ConfigError, DataError

#: The options dataclasses of the functional attacks (a new attack adds its options class here).
Opts = TypeVar("Opts", PGDOptions, FGSMOptions)


def check_labels(t: object, n: int, what: str) -> tuple[torch.Tensor, int]:
    """``t`` as int64 (N,) and its largest value; raise :class:`DataError` for anything else."""
    if not isinstance(t, torch.Tensor) or t.shape != (n,):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise DataError(f"{what} must be an int64 tensor of shape ({n},), got {got}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise DataError(
            f"{what} must hold integer class indices (int64), got dtype {t.dtype}; convert with "
            ".long() only if the values are whole class numbers"
        )
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < 0:
        raise DataError(f"{what} must be class indices in [0, K), got a negative value {lo}")
    return t.long(), hi


def prepared(
    cls: type[Opts],
    options: Opts | None,
    settings: dict[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
) -> tuple[Opts, torch.Tensor, torch.Tensor | None, int]:
    """The attack's options (``options`` with ``settings`` replacing fields, validated) and the
    checked labels/targets on ``x``'s device with the largest class index."""
    opts = cls.build(options, **settings)
    norm = getattr(opts, "norm", "linf")
    y, target, max_label = check_common(
        x, y, opts.eps, norm, opts.loss, opts.targeted, target, opts.kappa
    )
    opts.validate()
    target = target.to(x.device) if target is not None else None
    return opts, y.to(x.device), target, max_label


def check_common(
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str,
    loss: str,
    targeted: bool,
    target: torch.Tensor | None,
    kappa: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Validate the arguments shared by every attack (one pass over ``x``, one over ``y``).

    Returns ``(y, target, largest class index)`` with labels as int64; the index is checked
    against the model's number of logits at the first forward pass.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"x must be a tensor (N, C, H, W) of images in [0, 1], got {got}")
    if not torch.is_floating_point(x):
        raise DataError(f"x must be a float tensor in [0, 1], got dtype {x.dtype}")
    if x.shape[0] == 0 or x.numel() == 0:
        raise DataError(f"x holds no pixels (shape {tuple(x.shape)}); pass at least one image")
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (lo >= 0.0 and hi <= 1.0):  # also False for NaN
        if math.isnan(lo) or math.isnan(hi):
            raise DataError("x holds NaN pixels; attacks need finite images in [0, 1]")
        raise DataError(
            f"x must hold pixel values in [0, 1] (fortify models normalise inside), got values "
            f"in [{lo:g}, {hi:g}]; divide uint8 images by 255 and do not pre-normalise"
        )
    y, y_max = check_labels(y, x.shape[0], "y")
    check_norm(norm)
    # L∞: a change of at most 1 per pixel already spans [0, 1]; L2: the cube's diameter.
    top = 1.0 if norm == "linf" else math.sqrt(x[0].numel())
    check_number(eps, f"eps ({norm}, pixel units)", 0.0, top, open_low=True)
    check_loss(loss, kappa)
    if targeted:
        if target is None:
            raise ConfigError(
                "targeted=True needs target= (int64 tensor of target classes, one per point)"
            )
        target, t_max = check_labels(target, x.shape[0], "target")
        y_max = max(y_max, t_max)
    elif target is not None:
        target, t_max = check_labels(target, x.shape[0], "target")
        y_max = max(y_max, t_max)
    return y, target, y_max

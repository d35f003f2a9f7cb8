"""Validation of an attack's inputs: images, labels, targets and options, in one pass each."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from fortify.attacks.options import FGSMOptions, PGDOptions, check_loss, check_norm, check_number
from fortify.errors import ConfigError, DataError, EvaluationError, FortifyError

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


def check_logit_values(
    out: torch.Tensor,
    device: torch.device | None,
    what: str = "the model",
    use: str = "an attack",
) -> None:
    """For logits ``out`` (N, K) of images on ``device``: raise :class:`EvaluationError` unless
    they are on ``device`` (when given), have K >= 2 classes, are float and are finite — what
    the attacks and the evaluation both need; ``use`` names what non-finite logits would spoil."""
    if device is not None and out.device != device:
        raise EvaluationError(
            f"{what} returned logits on device {out.device} for images on {device}; move the "
            "model and the images to the same device"
        )
    if out.shape[1] < 2:
        raise EvaluationError(
            f"{what} returned {out.shape[1]} logit(s) per image; attacks need logits (N, K) "
            "with K >= 2 classes"
        )
    if not out.is_floating_point():
        raise EvaluationError(
            f"{what} returned logits of dtype {out.dtype}; attacks need float logits (N, K) to "
            "take gradients (do not round or argmax inside forward)"
        )
    bad = int((~torch.isfinite(out.detach())).any(1).sum())
    if bad:
        raise EvaluationError(
            f"{what} returned NaN or Inf logits for {bad} of {len(out)} images; {use} on "
            "non-finite outputs is meaningless"
        )


_CONVERT = {
    torch.float32: "x.float()",
    torch.float64: "x.double()",
    torch.float16: "x.half()",
    torch.bfloat16: "x.bfloat16()",
}


def check_images(x: object) -> None:
    """Raise :class:`DataError` unless ``x`` is a float tensor (N, C, H, W), N >= 1, with
    every value finite and in [0, 1] (one pass over ``x``)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(
            f"x must be a tensor (N, C, H, W) of images in [0, 1], got {got}; add a batch dim "
            "with x.unsqueeze(0) for one image"
        )
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


def check_dtype(model: nn.Module, x: torch.Tensor) -> None:
    """Raise :class:`DataError` when ``x``'s dtype is not one of the dtypes of the model's
    floating parameters (a model without floating parameters takes any float ``x``)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes and x.dtype not in dtypes:
        want = sorted(dtypes, key=str)[0]
        convert = _CONVERT.get(want, f"x.to({want})")
        raise DataError(
            f"x has dtype {x.dtype} but the model's parameters are {want}; convert the images "
            f"to the model's dtype, e.g. {convert}"
        )


def check_model(model: object, x: torch.Tensor) -> None:
    """Raise :class:`ConfigError` unless ``model`` can be called (an ``nn.Module`` or a function
    of images), and :class:`DataError` when its parameters' dtype differs from ``x``'s."""
    if not callable(model):
        raise ConfigError(
            f"model must be an nn.Module (or a callable mapping images to logits), got "
            f"{type(model).__name__}"
        )
    if isinstance(model, nn.Module):
        check_dtype(model, x)


def first_forward(model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """``model(x)`` for the first pass over a batch: an error of the model becomes a
    :class:`DataError` when the images do not fit it (a shape or size error) and an
    :class:`EvaluationError` otherwise, naming the input shape and the model's message."""
    try:
        return model(x)
    except FortifyError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of third-party model code
        msg = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, RuntimeError) and any(w in msg for w in ("shape", "size", "channels")):
            raise DataError(
                f"the model cannot take images of shape (N, C, H, W) = {tuple(x.shape)}: {msg}. "
                "Give it images with the channel count and size it was built for"
            ) from exc
        raise EvaluationError(
            f"the model failed on inputs of shape (N, C, H, W) = {tuple(x.shape)}: "
            f"{type(exc).__name__}: {msg}"
        ) from exc


def prepared(
    cls: type[Opts],
    model: object,
    options: Opts | None,
    settings: dict[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
) -> tuple[Opts, torch.Tensor, torch.Tensor | None, int]:
    """The attack's options (``options`` with ``settings`` replacing fields, validated) and the
    checked labels/targets on ``x``'s device with the largest class index; ``x`` and the model
    are checked first."""
    opts = cls.build(options, **settings)
    check_images(x)
    check_model(model, x)
    opts.validate()
    norm = getattr(opts, "norm", "linf")
    y, target, max_label = check_common(
        x, y, opts.eps, norm, opts.loss, opts.targeted, target, opts.kappa
    )
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
    """Validate the arguments shared by every attack on checked images ``x``
    (:func:`check_images`): labels, budget, loss and targets (one pass over ``y``).

    Returns ``(y, target, largest class index)`` with labels as int64; the index is checked
    against the model's number of logits at the first forward pass.
    """
    y, y_max = check_labels(y, x.shape[0], "y")
    check_norm(norm)
    # L∞: a change of at most 1 per pixel already spans [0, 1]; L2: the cube's diameter.
    top = 1.0 if norm == "linf" else math.sqrt(x[0].numel())
    check_number(eps, f"eps ({norm}, pixel units)", 0.0, top, open_low=True)
    check_loss(loss, kappa)
    if not targeted:
        if target is not None:
            raise ConfigError(
                "target= was given but targeted=False, so it would be ignored; pass "
                "targeted=True to attack towards target, or drop target"
            )
        return y, None, y_max
    if target is None:
        raise ConfigError(
            "targeted=True needs target= (int64 tensor of target classes, one per point)"
        )
    target, t_max = check_labels(target, x.shape[0], "target")
    return y, target, max(y_max, t_max)

"""Input validation for evaluations: images, labels, budgets and the model's outputs."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from fortify.attacks.inputs import check_dtype, check_logit_values
from fortify.errors import ConfigError, DataError, EvaluationError, check_positive_int
from fortify.utils.runtime import check_seed

log = logging.getLogger(__name__)


def check_model(model: object, x: torch.Tensor) -> None:
    """Raise :class:`ConfigError` unless ``model`` is an ``nn.Module`` with real tensors (not on
    the ``meta`` device), and :class:`DataError` when the dtype of ``x`` differs from its
    parameters' (as the attacks do)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be an nn.Module mapping images (N, C, H, W) to logits, got "
            f"{type(model).__name__}"
        )
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ConfigError(
            "the model has tensors on the 'meta' device (no data); load its weights, e.g. "
            "model.to_empty(device='cpu') then load_state_dict(...), before evaluating it"
        )
    check_dtype(model, x)


def check_run_options(
    *,
    batch_size: object,
    seed: object,
    checks: object,
    check_points: object,
    square_queries: object,
) -> None:
    """Raise :class:`ConfigError` for a batch size, ``check_points`` (when the checks run) or
    ``square_queries`` that is not an integer >= 1, a seed outside [0, 2**63 - 1] or a
    ``checks`` flag that is not a bool."""
    check_positive_int(batch_size, "batch_size")
    check_seed(seed)
    if not isinstance(checks, bool):
        raise ConfigError(f"checks must be True or False, got {checks!r}")
    if checks:
        check_positive_int(check_points, "check_points (points the gradient-masking checks run on)")
    check_positive_int(square_queries, "square_queries (query budget of the Square check)")


def check_extra_settings(settings: object, reserved: tuple[str, ...]) -> dict[str, object]:
    """``settings`` (None or a dict of extra report entries with str keys) as a dict; a key
    the evaluation records itself (``reserved``) is a :class:`ConfigError`."""
    if settings is None:
        return {}
    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
        raise ConfigError(
            f"settings must be a dict of extra report entries with str keys (e.g. "
            f"{{'dataset': 'cifar10'}}), got {settings!r}"
        )
    taken = sorted(k for k in settings if k in reserved)
    if taken:
        raise ConfigError(
            f"settings may not replace what the evaluation records itself: {taken}; reserved "
            f"keys: {', '.join(reserved)}"
        )
    return dict(settings)


def check_images_labels(x: torch.Tensor, y: torch.Tensor) -> None:
    """Raise :class:`DataError` unless ``x`` is float (N, C, H, W) in [0, 1] and ``y`` int (N,)."""
    if not isinstance(x, torch.Tensor):
        raise DataError(
            f"x must be a torch.Tensor of images (N, C, H, W) in [0, 1], got {type(x).__name__}"
        )
    if x.dim() != 4:
        raise DataError(
            f"x must have 4 dims (N, C, H, W), got shape {tuple(x.shape)}; "
            "add a channel dim with x.unsqueeze(1) for grey images or a batch dim with "
            "x.unsqueeze(0)"
        )
    if not torch.is_floating_point(x):
        raise DataError(
            f"x must be a float tensor in [0, 1], got dtype {x.dtype}; convert uint8 images with "
            "x.float() / 255"
        )
    if x.numel() == 0:
        raise DataError(
            f"x is empty (shape {tuple(x.shape)}): need at least one image with C, H, W >= 1"
        )
    x = x.detach()  # only read here; a tensor that requires grad is fine
    if not bool(torch.isfinite(x).all()):
        n = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise DataError(
            f"x contains NaN or Inf values in {n} image(s); images must be finite in [0, 1]"
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"images must lie in [0, 1] (normalisation belongs inside the model), got range "
            f"[{lo:.4g}, {hi:.4g}]"
        )
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or len(y) != len(x):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise DataError(f"y must be a 1-D tensor of {len(x)} integer labels, got {shape}")
    if torch.is_floating_point(y) or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"y must hold integer class labels (int64), got dtype {y.dtype}")


def check_eps(eps: float, norm: str, image_shape: tuple[int, ...]) -> None:
    """Raise :class:`ConfigError` for ε ≤ 0 or absurd budgets (> 1 for L∞, > sqrt(d) for L2)."""
    if norm not in ("linf", "l2"):
        raise ConfigError(f"unknown norm {norm!r}; allowed: linf, l2")
    if (
        not isinstance(eps, (int, float))
        or isinstance(eps, bool)
        or not math.isfinite(eps)
        or eps <= 0
    ):
        raise ConfigError(
            f"eps must be a positive number in pixel units ([0, 1] scale), got {eps!r}"
        )
    d = math.prod(image_shape)
    if norm == "linf" and eps > 1:
        raise ConfigError(
            f"L∞ eps={eps} is larger than the whole [0, 1] pixel range; eps is in pixel units "
            "(e.g. 8/255 ≈ 0.0314, not 8)"
        )
    if norm == "l2" and eps > math.sqrt(d):
        raise ConfigError(
            f"L2 eps={eps} exceeds sqrt(d) = {math.sqrt(d):.3g}, the diameter of the [0, 1] "
            "image cube "
            f"for {d} values; eps is in pixel units (e.g. 0.5 for CIFAR)"
        )


def check_logits(
    out: object, n: int, what: str = "the model", device: torch.device | None = None
) -> torch.Tensor:
    """Raise :class:`EvaluationError` unless ``out`` is finite float logits (n, K), K >= 2, not
    probabilities (and on ``device`` when given)."""
    if isinstance(out, (tuple, list, dict)):
        raise EvaluationError(
            f"{what} returned a {type(out).__name__}; fortify evaluates models whose forward(x) "
            "returns "
            "logits (N, K) only. Wrap it, e.g. forward = lambda x: model(x)[0]"
        )
    if not isinstance(out, torch.Tensor):
        raise EvaluationError(
            f"{what} returned {type(out).__name__}; expected a logits tensor (N, K)"
        )
    if out.dim() != 2 or out.shape[0] != n:
        raise EvaluationError(f"{what} returned shape {tuple(out.shape)}; expected logits ({n}, K)")
    check_logit_values(out, device, what, "an evaluation")
    o = out.detach().float()
    if bool((o >= 0).all()) and bool(((o.sum(1) - 1).abs() < 1e-4).all()):
        raise EvaluationError(
            f"{what} seems to return probabilities (non-negative rows summing to 1); attacks need "
            "logits (remove the final softmax): gradients of a saturated softmax vanish and mask "
            "the model's real robustness"
        )
    return out


def check_labels_range(y: torch.Tensor, k: int) -> None:
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
        raise DataError(
            f"labels must lie in [0, {k - 1}] for a model with {k} outputs, found range "
            f"[{int(y.min())}, {int(y.max())}]"
        )


def check_deterministic(model: nn.Module, xb: torch.Tensor, first: torch.Tensor) -> None:
    """Refuse stochastic models: a second forward on the same batch must reproduce ``first``."""
    with torch.no_grad():
        second = model(xb)
    if not isinstance(second, torch.Tensor) or second.shape != first.shape:
        raise EvaluationError("the model returned outputs of different shapes on the same batch")
    if not torch.allclose(first.float(), second.float(), rtol=1e-4, atol=1e-5):
        diff = float((first.float() - second.float()).abs().max())
        raise EvaluationError(
            f"the model is stochastic: two forward passes on the same batch (eval mode) differ "
            "by up "
            f"to {diff:.3g}. fortify requires a deterministic mode for evaluation (e.g. fix the "
            "noise "
            "or the mask at test time), or an attack with expectation over transformation (EOT)"
        )

"""Per-sample attack objectives (to be *maximised* by the attacker).

Every loss maps logits (N, K) and labels (N,) to a tensor (N,) of per-sample values; attacks
sum them before differentiating, so each sample's gradient is independent of the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fortify.errors import ConfigError

LOSSES = ("ce", "cw", "dlr")


def _other_max(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """max_{j != cls} z_j, shape (N,)."""
    masked = logits.scatter(1, cls.view(-1, 1), float("-inf"))
    return masked.amax(dim=1)


def ce_loss(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Cross-entropy (untargeted: CE(y); targeted: −CE(target)), shape (N,)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    return -ce if targeted else ce


def cw_loss(logits: torch.Tensor, y: torch.Tensor, targeted: bool, kappa: float) -> torch.Tensor:
    """C&W margin loss with confidence κ, as in the FSR release, shape (N,).

    Untargeted: ``−max(z_y − max_{j≠y} z_j + κ, 0)``; targeted (y = target):
    ``−max(max_{j≠t} z_j − z_t + κ, 0)``. Its gradient vanishes once the margin exceeds κ.
    """
    z_cls = logits.gather(1, y.view(-1, 1)).squeeze(1)
    z_other = _other_max(logits, y)
    margin = z_other - z_cls if targeted else z_cls - z_other
    return -torch.clamp(margin + kappa, min=0.0)


def dlr_loss(
    logits: torch.Tensor, y: torch.Tensor, targeted: bool, true_y: torch.Tensor
) -> torch.Tensor:
    """Difference-of-logits-ratio loss (Croce & Hein 2020), shape (N,).

    Untargeted: ``−(z_y − max_{j≠y} z_j) / (z_π1 − z_π3 + 1e-12)``; targeted:
    ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12)`` with π the descending logit order.
    """
    k = logits.shape[1]
    if k < (4 if targeted else 3):
        raise ConfigError(
            f"the DLR loss needs at least {4 if targeted else 3} classes "
            f"({'targeted' if targeted else 'untargeted'}), the model has {k}; use loss='ce' or "
            "'cw'"
        )
    srt = logits.sort(dim=1, descending=True).values
    z_true = logits.gather(1, true_y.view(-1, 1)).squeeze(1)
    if targeted:
        z_t = logits.gather(1, y.view(-1, 1)).squeeze(1)
        return -(z_true - z_t) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)
    return -(z_true - _other_max(logits, true_y)) / (srt[:, 0] - srt[:, 2] + 1e-12)


def attack_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    *,
    loss: str,
    targeted: bool,
    kappa: float,
) -> torch.Tensor:
    """Per-sample objective (N,) to maximise; ``target`` is used when ``targeted``."""
    logits = logits.float()  # autocast-neutral: compute the loss in fp32
    if targeted and target is None:
        raise ConfigError("a targeted attack loss needs target classes (got target=None)")
    cls = target if targeted and target is not None else y
    if loss == "ce":
        return ce_loss(logits, cls, targeted)
    if loss == "cw":
        return cw_loss(logits, cls, targeted, kappa)
    if loss == "dlr":
        return dlr_loss(logits, cls, targeted, y)
    raise ConfigError(f"unknown attack loss {loss!r}; allowed: {', '.join(LOSSES)}")

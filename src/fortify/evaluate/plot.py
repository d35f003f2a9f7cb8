"""Robust accuracy vs ε curves (PNG via matplotlib's Agg backend)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from fortify.attacks import pgd_attack
from fortify.errors import ConfigError
from fortify.evaluate.core import _eval_mode, _model_device
from fortify.evaluate.validation import check_eps, check_images_labels
from fortify.utils.atomic import atomic_write_with

log = logging.getLogger("fortify.evaluate.plot")


def eps_curve(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_values: Sequence[float],
    *,
    norm: str = "linf",
    steps: int = 20,
    batch_size: int = 256,
    mode: str = "final",
) -> list[tuple[float, float]]:
    """Robust accuracy (%) of PGD-``steps`` (CE, step 2.5ε/steps, no random start) per ε.

    ``x`` float (N, C, H, W) in [0, 1]; ε in pixel units; the model is run in eval mode.
    """
    check_images_labels(x, y)
    if mode not in ("final", "best"):
        raise ConfigError(f"eps_curve mode must be 'final' or 'best', got {mode!r}")
    if not eps_values:
        raise ConfigError("eps_values must contain at least one ε")
    dev = _model_device(model)
    out = []
    with _eval_mode(model):
        for e in eps_values:
            check_eps(e, norm, tuple(x.shape[1:]))
            correct = 0
            for i in range(0, len(x), batch_size):
                xb, yb = x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev)
                r = pgd_attack(
                    model, xb, yb, eps=e, steps=steps, norm=norm, random_start=False, mode=mode
                )
                correct += int((~r.success).sum())
            out.append((float(e), 100.0 * correct / len(x)))
            log.info("ε=%.4g: %.2f%%", e, out[-1][1])
    return out


def plot_eps_curve(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    norm: str = "linf",
    title: str | None = None,
    mark_eps: float | None = None,
) -> Path:
    """Plot ``{label: [(ε, accuracy %), ...]}`` to a PNG at ``path`` (written atomically).

    Use :func:`eps_curve` to compute a model's curve, or ``report.extras["eps_sweep"]["curve"]``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not curves:
        raise ConfigError("plot_eps_curve needs at least one curve")
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for label, pts in curves.items():
        pts = sorted(pts)
        ax.plot(
            [p[0] * (255 if norm == "linf" else 1) for p in pts],
            [p[1] for p in pts],
            marker="o",
            label=label,
        )
    if mark_eps is not None:
        ax.axvline(
            mark_eps * (255 if norm == "linf" else 1), color="grey", linestyle=":", linewidth=1
        )
    ax.set_xlabel("ε (×1/255, L∞)" if norm == "linf" else "ε (L2)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png")

    try:
        atomic_write_with(path, write)
    finally:
        plt.close(fig)
    return path


def default_eps_values(eps: float, norm: str, d: int) -> list[float]:
    """A small ε grid around ``eps``: 0, ε/4 ... 4ε (capped at 1 for L∞ / sqrt(d) for L2)."""
    cap = 1.0 if norm == "linf" else math.sqrt(d)
    return sorted({min(f * eps, cap) for f in (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)})

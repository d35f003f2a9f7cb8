"""Robust accuracy vs ε curves (PNG via matplotlib's Agg backend)."""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fortify.attacks import pgd_attack
from fortify.errors import ConfigError
from fortify.evaluate.driver import eval_mode, model_device
from fortify.evaluate.validation import check_eps, check_images_labels
from fortify.utils.atomic import atomic_write_with

log = logging.getLogger(__name__)


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
    step_fraction: float | None = None,
) -> list[tuple[float, float]]:
    """Robust accuracy (%) of PGD-``steps`` (CE, no random start) per ε.

    The step is ``step_fraction * ε`` (default ``2.5 / steps``; the paper suite's PGD-20 uses
    0.1). ``x`` float (N, C, H, W) in [0, 1]; ε in pixel units; the model is run in eval mode.
    """
    frac = 2.5 / steps if step_fraction is None else step_fraction
    if not 0 < frac <= 4:
        raise ConfigError(f"step_fraction must be in (0, 4] (step = fraction × ε), got {frac!r}")
    check_images_labels(x, y)
    if mode not in ("final", "best"):
        raise ConfigError(f"eps_curve mode must be 'final' or 'best', got {mode!r}")
    if not eps_values:
        raise ConfigError("eps_values must contain at least one ε")
    dev = model_device(model)
    out = []
    with eval_mode(model):
        for e in eps_values:
            check_eps(e, norm, tuple(x.shape[1:]))
            correct = 0
            for i in range(0, len(x), batch_size):
                xb, yb = x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev)
                r = pgd_attack(
                    model,
                    xb,
                    yb,
                    eps=e,
                    steps=steps,
                    step_size=frac * e,
                    norm=norm,
                    random_start=False,
                    mode=mode,
                )
                correct += int((~r.success).sum())
            out.append((float(e), 100.0 * correct / len(x)))
            log.info("ε=%.4g: %.2f%%", e, out[-1][1])
    return out


_OBJECTIVE_LABELS = {"at": "AT", "trades": "TRADES", "mart": "MART", "fpd": "FPD"}


def model_label(config: Mapping[str, Any] | None, fallback: str) -> str:
    """A plot label from a run's config: objective and defences (``"AT+FSR"``,
    ``"TRADES+CAS"``, ``"standard"``), or ``fallback`` (e.g. the folder name) without one."""
    if not config or not config.get("train"):
        return fallback
    objective = str(config["train"].get("objective", ""))
    parts = [_OBJECTIVE_LABELS.get(objective, objective)] if objective else []
    for d in config.get("defenses") or []:
        kind = str(d.get("kind", "")).upper()
        if kind and kind not in parts:
            parts.append(kind)
    return "+".join(parts) or fallback


def plot_eps_curve(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    norm: str = "linf",
    title: str | None = None,
    mark_eps: float | None = None,
    mark_label: str | None = None,
) -> Path:
    """Plot ``{label: [(ε, accuracy %), ...]}`` to a PNG at ``path`` (written atomically).

    ε is drawn in the tables' units (pixel units in [0, 1] for L∞). ``mark_eps`` draws a
    labelled vertical line (``mark_label``, default ``"ε = <mark_eps>"``), e.g. the training ε.
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
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if mark_eps is not None:
        ax.axvline(
            mark_eps,
            color="grey",
            linestyle=":",
            linewidth=1,
            label=mark_label or f"ε = {mark_eps:g}",
        )
    ax.set_xlabel("ε (L∞, pixel units in [0, 1])" if norm == "linf" else "ε (L2)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:  # wrapped: a long title would be clipped at the figure's edges
        ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    return save_png(fig, path)


def default_eps_values(eps: float, norm: str, d: int) -> list[float]:
    """A small ε grid around ``eps``: 0, ε/4 ... 4ε (capped at 1 for L∞ / sqrt(d) for L2)."""
    cap = 1.0 if norm == "linf" else math.sqrt(d)
    return sorted({min(f * eps, cap) for f in (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)})


def plot_accuracy_bars(
    reports: Mapping[str, Any],
    path: str | Path,
    *,
    mode: str = "final",
    title: str | None = None,
    level: float = 0.95,
) -> Path:
    """Grouped bars: accuracy (%) per column (Natural, each attack, Ensemble, ...) per report,
    with Wilson ``level`` confidence intervals over the report's points as error bars.

    ``reports``: ``{label: EvalReport}``; a column missing from a report is left out for it.
    Written atomically to a PNG at ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from fortify.stats import accuracy_interval

    if not reports:
        raise ConfigError("plot_accuracy_bars needs at least one report")
    cols: list[str] = []
    for r in reports.values():
        cols += [c for c in r.columns if c not in cols]
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(cols) + 1.5), 3.6), dpi=120)
    for i, (label, r) in enumerate(reports.items()):
        xs, ys, lo, hi = [], [], [], []
        for j, c in enumerate(cols):
            correct, ran = r.correct(c, mode), r.ran(c, mode)
            if correct is None or ran is None or not bool(ran.any()):
                continue
            correct = correct[ran]  # only the points the column's attacks ran on count
            iv = accuracy_interval(correct, level=level)
            xs.append(j + (i - (len(reports) - 1) / 2) * width)
            ys.append(iv.estimate)
            lo.append(max(0.0, iv.estimate - iv.low))  # rounding can make these -1e-15
            hi.append(max(0.0, iv.high - iv.estimate))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=label)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=20)
    ax.set_ylabel(f"accuracy (%), {round(100 * level)} % CI")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=len(reports), fontsize="small")
    if title:
        ax.set_title(title, fontsize="medium")
    return save_png(fig, path)


def save_png(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure atomically as a PNG at ``path`` and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png")

    try:
        atomic_write_with(path, write)
    finally:
        plt.close(fig)
    return path

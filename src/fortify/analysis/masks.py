"""Visualise FSR masks and robustness maps for a few images (PNG via matplotlib, Agg backend)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fortify.analysis.features import pick_block
from fortify.utils.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["mask_maps", "plot_masks"]


@torch.no_grad()
def mask_maps(
    model: nn.Module, x: torch.Tensor, block: str | None = None
) -> dict[str, torch.Tensor]:
    """Channel-averaged mask and robustness map at an FSR block (eval mode).

    Args:
        x: (N, C, H, W) images in [0, 1].
    Returns:
        ``{"mask": (N, h, w), "r": (N, h, w), "mask_full": (N, C_b, h, w)}`` on CPU, where
        (h, w) is the block's feature resolution.
    """
    _, blk = pick_block(model, block)
    captured: list[torch.Tensor] = []
    handle = blk.register_forward_hook(lambda _m, inp, _o: captured.append(inp[0]))
    was = model.training
    model.eval()
    try:
        model(x.to(next(model.parameters()).device))
        parts = blk.parts(captured[0])
    finally:
        handle.remove()
        model.train(was)
    if parts.mask is None:
        raise ValueError("this FSR block has no mask (ablation 'no-separation')")
    if parts.r is None:
        raise ValueError("this FSR block has no robustness map")
    m, r = parts.mask.float().cpu(), parts.r.float().cpu()
    return {"mask": m.mean(1), "r": r.mean(1), "mask_full": m}


def plot_masks(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    path: str | Path,
    *,
    block: str | None = None,
    class_names: list[str] | None = None,
    title: str | None = None,
) -> dict[str, float]:
    """Save a grid (one row per image): clean image, adversarial image, mean mask (clean),
    mean mask (adversarial), mean robustness map r (adversarial).

    Args:
        x, x_adv: (N, C, H, W) clean and adversarial images in [0, 1] (N ≤ 16 is sensible).
        y: (N,) labels (shown in the row titles).
        path: PNG file to write (atomically).
        title: figure title, e.g. the attack and ε that made ``x_adv``.
    Returns:
        summary numbers: mean mask on clean and adversarial inputs and the fraction of units
        with m > 0.5 ("robust") for each.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = mask_maps(model, x, block)
    adv = mask_maps(model, x_adv, block)
    with torch.no_grad():
        pred = model(x_adv.to(next(model.parameters()).device)).argmax(1).cpu()
    n = len(x)
    fig, axes = plt.subplots(n, 5, figsize=(10.5, 2.1 * n + 0.6), squeeze=False)
    titles = ["clean", "adversarial", "mask m (clean)", "mask m (adv)", "r (adv)"]

    def show_img(ax: Any, img: torch.Tensor) -> None:
        img = img.detach().cpu()
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())

    for i in range(n):
        row = axes[i]
        show_img(row[0], x[i])
        show_img(row[1], x_adv[i])
        row[2].imshow(clean["mask"][i].numpy(), cmap="viridis", vmin=0, vmax=1)
        im_m = row[3].imshow(adv["mask"][i].numpy(), cmap="viridis", vmin=0, vmax=1)
        lim = float(adv["r"][i].abs().max()) or 1.0
        im_r = row[4].imshow(adv["r"][i].numpy(), cmap="coolwarm", vmin=-lim, vmax=lim)
        fig.colorbar(im_m, ax=row[2:4].tolist(), fraction=0.046, pad=0.02)
        fig.colorbar(im_r, ax=row[4], fraction=0.046, pad=0.04, label="r")
        label, guess = str(int(y[i])), str(int(pred[i]))
        if class_names:
            label, guess = class_names[int(y[i])], class_names[int(pred[i])]
        row[0].set_ylabel(f"y={label}\nadv pred={guess}", fontsize=8)
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
    fig.suptitle(title or "FSR masks: clean vs adversarial inputs", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    summary = {
        "mean_mask_clean": float(clean["mask_full"].mean()),
        "mean_mask_adv": float(adv["mask_full"].mean()),
        "robust_fraction_clean": float((clean["mask_full"] > 0.5).float().mean()),
        "robust_fraction_adv": float((adv["mask_full"] > 0.5).float().mean()),
    }
    log.info("wrote %s (%s)", path, summary)
    return summary

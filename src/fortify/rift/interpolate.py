"""Weight interpolation between the AT model and the fine-tuned model, step 3 of RiFT.

``θ_α = (1 − α)·θ_AT + α·θ_FT`` over the whole state dict: parameters and floating-point
buffers (BatchNorm running statistics) are interpolated; integer buffers (BatchNorm's
``num_batches_tracked``) are copied from θ_FT when α ≥ 0.5, else from θ_AT. α = 0 and α = 1
return exact copies of the endpoints.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fortify.errors import CheckpointError, ConfigError
from fortify.utils.atomic import atomic_write_text, atomic_write_with

log = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]


def alpha_grid(step: float = 0.1) -> list[float]:
    """α values 0.0, step, …, 1.0 (rounded to 10 decimals; ``1/step`` must be an integer)."""
    if not 0 < step <= 1:
        raise ConfigError(f"α grid step must be in (0, 1], got {step!r}")
    n = round(1 / step)
    if abs(n * step - 1) > 1e-9:
        raise ConfigError(f"α grid step must divide 1 evenly (e.g. 0.1, 0.05, 0.25), got {step!r}")
    return [round(i / n, 10) for i in range(n + 1)]


def check_compatible(sd_at: StateDict, sd_ft: StateDict) -> None:
    """Raise :class:`CheckpointError` unless both state dicts have the same keys and shapes."""
    only_at = sorted(set(sd_at) - set(sd_ft))
    only_ft = sorted(set(sd_ft) - set(sd_at))
    if only_at or only_ft:
        raise CheckpointError(
            "the AT and fine-tuned checkpoints are different architectures: keys only in AT: "
            f"{only_at[:8]}{' …' if len(only_at) > 8 else ''}; keys only in fine-tuned: "
            f"{only_ft[:8]}{' …' if len(only_ft) > 8 else ''}"
        )
    bad = [k for k in sd_at if tuple(sd_at[k].shape) != tuple(sd_ft[k].shape)]
    if bad:
        shown = "; ".join(
            f"{k!r}: {tuple(sd_at[k].shape)} vs {tuple(sd_ft[k].shape)}" for k in bad[:8]
        )
        raise CheckpointError(
            f"the AT and fine-tuned checkpoints are different architectures: {len(bad)} tensor(s) "
            f"differ in shape (AT vs fine-tuned): {shown}{' …' if len(bad) > 8 else ''}"
        )
    bad_dtype = [k for k in sd_at if sd_at[k].dtype != sd_ft[k].dtype]
    if bad_dtype:
        k = bad_dtype[0]
        raise CheckpointError(
            f"tensor {k!r} has dtype {sd_at[k].dtype} in the AT checkpoint but "
            f"{sd_ft[k].dtype} in the fine-tuned one"
        )


def interpolate_state(sd_at: StateDict, sd_ft: StateDict, alpha: float) -> dict[str, torch.Tensor]:
    """``(1 − α)·sd_at + α·sd_ft`` for floating tensors; integer tensors copied (see module doc).

    Args:
        alpha: in [0, 1]; 0 returns a copy of ``sd_at``, 1 a copy of ``sd_ft``.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"interpolation α must be a number in [0, 1], got {alpha!r}")
    check_compatible(sd_at, sd_ft)
    out: dict[str, torch.Tensor] = {}
    for k, a in sd_at.items():
        b = sd_ft[k].to(a.device)
        if alpha == 0.0:
            out[k] = a.detach().clone()
        elif alpha == 1.0:
            out[k] = b.detach().clone()
        elif a.is_floating_point() or a.is_complex():
            out[k] = torch.lerp(a.detach(), b.detach(), float(alpha))
        else:
            out[k] = (b if alpha >= 0.5 else a).detach().clone()
    return out


# ----------------------------------------------------------------------------------------------
# grid evaluation and the selection rule


ALPHA_RULES = ("paired", "fixed")


@dataclass
class GridPoint:
    """Validation accuracies (percent) of θ_α.

    ``clean_ci`` / ``robust_ci``: the paired-bootstrap CI (percentage points) of θ_α's accuracy
    minus θ_AT's on the same points, filled by :func:`select_alpha` with ``rule="paired"``.
    ``outcomes``: per-point 0/1 tensors ``{"clean", "robust"}`` (N,) from
    :func:`evaluate_grid` (not written to ``grid.json``).
    """

    alpha: float
    clean: float
    robust: float
    clean_ci: tuple[float, float] | None = None
    robust_ci: tuple[float, float] | None = None
    outcomes: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict without the per-point outcomes."""
        return {
            "alpha": self.alpha,
            "clean": self.clean,
            "robust": self.robust,
            "clean_ci": list(self.clean_ci) if self.clean_ci is not None else None,
            "robust_ci": list(self.robust_ci) if self.robust_ci is not None else None,
        }


def select_alpha(
    points: Sequence[GridPoint],
    tolerance: float = 0.1,
    *,
    rule: str = "paired",
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[GridPoint, str]:
    """Choose α* on the validation grid; α = 0 (θ_AT) is the reference and always admissible.

    ``rule="paired"`` (default): for every α, paired-bootstrap CIs (``level``, ``resamples``,
    ``seed``; :func:`fortify.stats.paired_bootstrap` over the same validation points) of its
    clean and robust accuracy minus θ_AT's. α is rejected for robustness when its robust
    accuracy is *detectably* more than ``tolerance`` points below θ_AT's (the CI's upper end
    < −tolerance); among the others α* is the largest clean gain that is itself detectable (the
    clean CI's lower end > 0). Without a detectable clean gain α* = 0. Needs the per-point
    ``outcomes`` of :func:`evaluate_grid`; fills ``clean_ci`` / ``robust_ci`` of every point.

    ``rule="fixed"`` (the paper): the largest clean gain among the α whose robust accuracy is at
    least ``robust(θ_AT) − tolerance`` points, estimates only.

    Ties are broken by higher robust accuracy, then by smaller α. Returns the chosen point and a
    one-line reason.
    """
    if rule not in ALPHA_RULES:
        raise ConfigError(f"unknown α rule {rule!r}; allowed: {', '.join(ALPHA_RULES)}")
    if tolerance < 0:
        raise ConfigError(f"robust-accuracy tolerance must be >= 0 points, got {tolerance!r}")
    base = [p for p in points if p.alpha == 0.0]
    if not base:
        raise ConfigError("the α grid must contain α = 0 (the AT model) as the reference")
    ref = base[0]

    def key(p: GridPoint) -> tuple[float, float, float]:
        return (p.clean - ref.clean, p.robust, -p.alpha)

    if rule == "fixed":
        floor = ref.robust - tolerance - 1e-9
        admissible = [p for p in points if p.robust >= floor]
        best = max(admissible, key=key)
        rejected = [p.alpha for p in points if p.robust < floor]
        reason = (
            f"α* = {best.alpha:g} (fixed rule): clean {best.clean:.2f}% "
            f"({best.clean - ref.clean:+.2f} vs AT), robust {best.robust:.2f}% "
            f"(AT {ref.robust:.2f}%, floor {ref.robust - tolerance:.2f}%)"
            + (f"; α rejected for robustness: {rejected}" if rejected else "")
        )
        return best, reason

    from fortify.stats import paired_bootstrap

    if any(p.outcomes is None for p in points):
        raise ConfigError(
            "α rule 'paired' needs the per-point outcomes of every grid point (evaluate_grid "
            "records them); use rule='fixed' for accuracies alone"
        )
    assert ref.outcomes is not None
    for p in points:
        assert p.outcomes is not None
        c = paired_bootstrap(
            ref.outcomes["clean"], p.outcomes["clean"], resamples=resamples, seed=seed, level=level
        )
        r = paired_bootstrap(
            ref.outcomes["robust"], p.outcomes["robust"], resamples=resamples, seed=seed,
            level=level,
        )  # fmt: skip
        p.clean_ci, p.robust_ci = (c.low, c.high), (r.low, r.high)
    rejected = [p.alpha for p in points if p.robust_ci is not None and p.robust_ci[1] < -tolerance]
    gains = [
        p
        for p in points
        if p.alpha not in rejected and p.clean_ci is not None and p.clean_ci[0] > 0
    ]
    best = max(gains, key=key) if gains else ref
    n = len(ref.outcomes["clean"])
    if best is ref:
        reason = (
            f"α* = 0 (paired rule, {100 * level:g}% CIs on {n} validation points): no α has a "
            "detectable clean gain" + (" without a detectable robustness loss" if rejected else "")
        )
    else:
        assert best.clean_ci is not None and best.robust_ci is not None
        reason = (
            f"α* = {best.alpha:g} (paired rule, {100 * level:g}% CIs on {n} validation points): "
            f"clean {best.clean:.2f}% ({best.clean - ref.clean:+.2f} "
            f"[{best.clean_ci[0]:+.2f}, {best.clean_ci[1]:+.2f}] vs AT), robust "
            f"{best.robust:.2f}% ({best.robust - ref.robust:+.2f} "
            f"[{best.robust_ci[0]:+.2f}, {best.robust_ci[1]:+.2f}], tolerance {tolerance:g})"
        )
    if rejected:
        reason += f"; α rejected for a detectable robustness loss: {rejected}"
    return best, reason


def evaluate_grid(
    model: nn.Module,
    sd_at: StateDict,
    sd_ft: StateDict,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alphas: Sequence[float] | None = None,
    steps: int = 10,
    step_size: float | None = None,
    batch_size: int = 512,
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
) -> list[GridPoint]:
    """Clean and PGD-``steps`` (L∞, random start) accuracy of θ_α on (x, y) for each α.

    A point counts as robust when it is classified correctly both clean and under the attack;
    each :class:`GridPoint` keeps the per-point outcomes for the paired α rule.

    ``model`` is a module of the right architecture; its state is overwritten by each θ_α and
    restored to ``sd_at`` at the end. x: float (N, C, H, W) in [0, 1] from the VALIDATION split.
    Each α is attacked with the same random-start seed.
    """
    from fortify.attacks import pgd

    alphas = list(alphas) if alphas is not None else alpha_grid()
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ConfigError(f"interpolation α must be in [0, 1], got {a!r}")
    if step_size is None:
        step_size = eps / 4
    was_training = model.training
    model.eval()
    points = []
    try:
        for a in alphas:
            if progress is not None:
                progress(a)
            model.load_state_dict(interpolate_state(sd_at, sd_ft, a))
            gen = torch.Generator(device=x.device).manual_seed(seed)
            clean_ok = torch.zeros(len(x), dtype=torch.bool)
            robust_ok = torch.zeros(len(x), dtype=torch.bool)
            for i in range(0, len(x), batch_size):
                xb, yb = x[i : i + batch_size], y[i : i + batch_size]
                xa = pgd(
                    model,
                    xb,
                    yb,
                    eps=eps,
                    steps=steps,
                    step_size=step_size,
                    norm="linf",
                    random_start=True,
                    generator=gen,
                )
                with torch.no_grad():
                    ok = (model(xb).argmax(1) == yb).cpu()
                    clean_ok[i : i + len(xb)] = ok
                    robust_ok[i : i + len(xb)] = ok & (model(xa).argmax(1) == yb).cpu()
            n = max(len(x), 1)
            clean = 100.0 * float(clean_ok.sum()) / n
            robust = 100.0 * float(robust_ok.sum()) / n
            log.info("α=%.2f clean %.2f%% PGD-%d %.2f%%", a, clean, steps, robust)
            points.append(
                GridPoint(
                    float(a), clean, robust, outcomes={"clean": clean_ok, "robust": robust_ok}
                )
            )
    finally:
        model.load_state_dict(dict(sd_at))
        model.train(was_training)
    return points


def save_grid(
    points: Sequence[GridPoint],
    chosen: GridPoint,
    reason: str,
    out_dir: str | Path,
    rule: dict[str, Any] | None = None,
) -> None:
    """Write ``grid.json`` (``rule``: the selection options) and ``tradeoff.png``."""
    out = Path(out_dir)
    data: dict[str, Any] = {
        "points": [p.to_dict() for p in points],
        "chosen": chosen.to_dict(),
        "reason": reason,
        "rule": rule or {},
    }
    atomic_write_text(out / "grid.json", json.dumps(data, indent=2))
    plot_tradeoff(points, chosen, out / "tradeoff.png", rule=rule)


def plot_tradeoff(
    points: Sequence[GridPoint],
    chosen: GridPoint,
    path: str | Path,
    rule: dict[str, Any] | None = None,
) -> None:
    """Clean vs robust validation accuracy along α, α annotated, α* highlighted, and the
    robustness floor (θ_AT's PGD-10 accuracy minus the tolerance) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rule = rule or {}
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    ax.plot(
        [p.clean for p in points], [p.robust for p in points], "o-", color="tab:blue",
        label="θ_α, α from 0 (AT) to 1 (fine-tuned)",
    )  # fmt: skip
    for p in points:
        ax.annotate(
            f"{p.alpha:g}",
            (p.clean, p.robust),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
            annotation_clip=False,
        )
    ax.plot(
        [chosen.clean], [chosen.robust], "*", ms=14, color="tab:red", label=f"α*={chosen.alpha:g}"
    )
    at = min(points, key=lambda p: p.alpha)
    if "tolerance" in rule and at.alpha == 0:
        floor = at.robust - float(rule["tolerance"])
        how = "tested with paired CIs" if rule.get("rule") == "paired" else "on estimates"
        ax.axhline(
            floor, ls="--", color="gray", lw=1,
            label=f"floor: AT PGD-10 − {float(rule['tolerance']):g} points ({how})",
        )  # fmt: skip
    ax.margins(x=0.12, y=0.15)  # room for the α labels at the ends
    ax.set_xlabel("clean accuracy (%, validation)")
    ax.set_ylabel("PGD-10 accuracy (%, validation)")
    n = rule.get("n_points")
    eps = rule.get("eps")
    what = ", ".join(
        s for s in (f"n={n}" if n else "", f"L∞ ε={float(eps):.3g}" if eps is not None else "") if s
    )
    sub = f"validation, {what}" if what else "validation"
    ax.set_title(f"RiFT: clean vs PGD-10 along θ_α = (1−α)θ_AT + αθ_FT\n({sub})", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)

"""Up-front time estimates of long commands from one measured forward/backward.

:func:`unit_costs` times a model's fp32 input gradient and forward per image on a batch;
:func:`suite_seconds` multiplies them by an attack suite's budget. ``fortify eval`` logs the
result before it starts, ``fortify replicate fsr-table1`` before its grid (and ``--estimate``
prints the detailed version). Estimates are rough: they ignore data loading and assume the
attacks' gradients cost what one measured gradient costs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Input gradients per point of the paper suite: FGSM 1 + PGD-20 + PGD-100 + C&W-30.
PAPER_GRADIENTS = 151
#: Masking checks on ``check_points`` points: about 6 PGD-20 runs; plus ``square_queries``.
CHECK_GRADIENTS = 120


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per image of one fp32 input gradient (forward + backward) and one forward."""

    grad_s: float
    forward_s: float


def unit_costs(model: nn.Module, x: torch.Tensor, repeats: int = 3) -> UnitCosts:
    """Time ``model`` (its current mode, no parameter gradients kept) on the batch ``x``
    (N, C, H, W) in [0, 1]: the best of ``repeats`` timings after one warm-up, per image."""
    grads, fwds = [], []
    n = max(len(x), 1)
    p = next(model.parameters(), None)
    x = x.to(p.device) if p is not None else x
    for _ in range(repeats + 1):
        xg = x.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        torch.autograd.grad(model(xg).logsumexp(1).sum(), xg)
        grads.append((time.perf_counter() - t0) / n)
        with torch.no_grad():
            t0 = time.perf_counter()
            model(x)
            fwds.append((time.perf_counter() - t0) / n)
    return UnitCosts(min(grads[1:]), min(fwds[1:]))


def suite_seconds(
    costs: UnitCosts,
    suite: str,
    n_points: int,
    *,
    aa_points: int | None = None,
    check_points: int = 0,
    square_queries: int = 1000,
    assume_robust: float = 0.7,
) -> dict[str, float] | None:
    """Estimated seconds per part (``paper``, ``checks``, ``autoattack``) of a suite on
    ``n_points`` points, or None for a suite without a cost model.

    AutoAttack (standard): 100 APGD-CE gradients per clean-correct point (90 % assumed), and on
    the ``assume_robust`` fraction 9×100 APGD-T and ~9×150 FAB-T gradients and 5,000 Square
    forwards.
    """
    cg, cf = costs.grad_s, costs.forward_s
    aa_n = n_points if aa_points is None else min(aa_points, n_points)
    parts: dict[str, float] = {}
    if suite in ("paper", "full"):
        parts["paper"] = n_points * PAPER_GRADIENTS * cg
    if suite in ("autoattack", "full"):
        r = assume_robust
        parts["autoattack"] = aa_n * 0.9 * (100 * cg + r * (900 * cg + 1350 * cg + 5000 * cf))
    if not parts:
        return None
    if check_points:
        parts["checks"] = min(check_points, n_points) * (CHECK_GRADIENTS * cg + square_queries * cf)
    return parts


def minutes(seconds: float) -> str:
    """``"~12 min"``, ``"~40 s"`` or ``"~2.5 h"``."""
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def log_suite_estimate(
    model: nn.Module,
    x: torch.Tensor,
    suite: str,
    *,
    aa_points: int | None = None,
    check_points: int = 0,
    square_queries: int = 1000,
) -> float | None:
    """Log the estimated duration of ``suite`` on the points ``x`` before it starts (measured on
    up to 64 of them); returns the seconds, or None (nothing logged) for suites without a model."""
    if suite_seconds(UnitCosts(0.0, 0.0), suite, 1) is None or len(x) == 0:
        return None
    costs = unit_costs(model, x[:64])
    parts = suite_seconds(
        costs,
        suite,
        len(x),
        aa_points=aa_points,
        check_points=check_points,
        square_queries=square_queries,
    )
    assert parts is not None
    total = sum(parts.values())
    log.info(
        "estimated time: %s for suite %s on %d points (%s; measured %.2f ms per input gradient, "
        "%.2f ms per forward per image, %d threads)",
        minutes(total),
        suite,
        len(x),
        ", ".join(f"{k} {minutes(v)}" for k, v in parts.items()),
        1e3 * costs.grad_s,
        1e3 * costs.forward_s,
        torch.get_num_threads(),
    )
    return total

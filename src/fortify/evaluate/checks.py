"""Honest-evaluation checks run after the suite (see docs/evaluation.md).

``result_checks`` are free (computed from the suite's per-sample outcomes). ``masking_checks``
look for gradient masking and run on the first ``check_points`` points to stay cheap:
zero input gradients, an ε sweep (monotonicity, loss increase), robust accuracy at a very large
ε, and black-box Square vs the white-box attacks. A warning of any of them makes the report
unreliable. The checks' own attacks at the threat-model ε (the sweep's PGD-20 at ε and Square)
become the column ``Check attacks`` on those points, so they count in the Worst case column.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from fortify.attacks import pgd_attack
from fortify.evaluate.autoattack import Square
from fortify.evaluate.context import SuiteContext
from fortify.evaluate.outcome import MODE_FREE, Outcome, accuracy_on, first_mask, worst_case
from fortify.evaluate.report import NATURAL

CHECK_ATTACKS = "Check attacks"

if TYPE_CHECKING:
    from fortify.evaluate.shard import Results

log = logging.getLogger(__name__)

SWEEP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
LARGE_EPS_LINF = 0.5
LARGE_EPS_MAX_ACC = 5.0  # % robust accuracy allowed at the very large ε
SQUARE_MARGIN = 2.0  # % by which Square may beat the white-box attacks before we warn


def result_checks(ctx: SuiteContext | Results) -> None:
    """Robust ≤ clean per attack; more PGD iterations must not help the model; best ≤ final."""
    clean = 100.0 * float(ctx.clean_correct.float().mean())
    n = ctx.n
    if not bool(ctx.clean_correct.any()):
        ctx.check(
            "anything to test",
            "warn",
            f"the model classifies none of the {n} points correctly (clean 0%): every attack "
            "trivially 'succeeds', so the robust columns and the checks below test nothing — "
            "is the model trained (and are the inputs in [0, 1])?",
        )
    bad = []
    for o in ctx.outcomes:
        if o.name == NATURAL or len(o.correct) != n or o.n == 0:
            continue
        clean_o = accuracy_on(ctx.clean_correct, o.ran)  # clean accuracy on the same points
        if o.accuracy > clean_o + 50.0 / o.n:
            bad.append(f"{o.name} [{o.mode}] {o.accuracy:.2f}% > clean {clean_o:.2f}%")
    if bad:
        ctx.check(
            "robust ≤ clean",
            "warn",
            "robust accuracy above clean accuracy: " + "; ".join(bad),
        )
    else:
        ctx.check("robust ≤ clean", "ok", f"every attack's accuracy ≤ clean ({clean:.2f}%)")
    tol = 100.0 / n * 0.5
    for m in ctx.modes:
        get = {o.name: o for o in ctx.outcomes if o.mode in (m, MODE_FREE)}
        if "PGD-20" in get and "PGD-100" in get:
            a20, a100 = get["PGD-20"].accuracy, get["PGD-100"].accuracy
            if a100 > a20 + tol:
                ctx.check(
                    f"more iterations [{m}]",
                    "warn",
                    f"PGD-100 ({a100:.2f}%) is weaker than PGD-20 ({a20:.2f}%): a sign of "
                    "gradient masking "
                    "or an unsuitable step size",
                    masking=True,
                )
            else:
                ctx.check(
                    f"more iterations [{m}]",
                    "ok",
                    f"PGD-100 {a100:.2f}% ≤ PGD-20 {a20:.2f}%",
                    masking=True,
                )
    if ctx.mode == "both":
        worse = []
        for o in ctx.outcomes:
            if o.mode == "best":
                f = next((p for p in ctx.outcomes if p.name == o.name and p.mode == "final"), None)
                if f is not None and bool((o.correct & ~f.correct).any()):
                    worse.append(o.name)
        ctx.check(
            "best ≤ final",
            "fail" if worse else "ok",
            f"best-mode accuracy exceeds final for {worse}"
            if worse
            else "best-mode accuracy ≤ final per point",
        )


def _sweep(
    ctx: SuiteContext, xb: torch.Tensor, yb: torch.Tensor, eps: float, steps: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD-``steps`` on one batch (CE, no random start, step 2.5ε/steps): (correct, loss up)."""
    r = pgd_attack(
        ctx.model,
        xb,
        yb,
        eps=eps,
        steps=steps,
        norm=ctx.norm,
        random_start=False,
        need_success=False,
    )
    ctx.verify_ball(f"ε-sweep PGD-{steps} at ε={eps:.4g}", r.x_adv, xb, eps)
    with torch.no_grad():
        la, lc = ctx.model(r.x_adv), ctx.model(xb)
        gain = F.cross_entropy(la.float(), yb, reduction="none") - F.cross_entropy(
            lc.float(), yb, reduction="none"
        )
    return (la.argmax(1) == yb).cpu(), (gain > 0).cpu()


def sweep_eps_values(eps: float, norm: str, dim: int) -> list[float]:
    """The ε values of the sweep (``SWEEP_FACTORS`` × ε, capped at the largest useful ε)."""
    cap = 1.0 if norm == "linf" else math.sqrt(dim)
    return sorted({min(f * eps, cap) for f in SWEEP_FACTORS})


def masking_data(
    ctx: SuiteContext, *, check_points: int = 200, square_queries: int = 1000
) -> dict[str, Any]:
    """The per-point measurements of the masking checks on the first ``check_points`` points.

    Only the points of the context's own chunks are measured (``ctx.batches()``, cut at
    ``check_points``), so slices of a sharded evaluation measure disjoint points; the
    ``pt_*`` entries are bool tensors (False where not measured) that slices join by OR.
    Keys: ``points``, ``dim``, ``sweep_eps``, ``large_eps``, ``square_queries`` and the
    per-point ``pt_zero_grad`` (m,), ``pt_sweep_correct`` / ``pt_sweep_increased`` (len(ε), m),
    ``pt_large_correct`` (m,), ``pt_square_correct`` (m,).
    """
    m = min(check_points, ctx.n)
    dim = math.prod(ctx.x.shape[1:])
    eps_values = sweep_eps_values(ctx.eps, ctx.norm, dim)
    big = LARGE_EPS_LINF if ctx.norm == "linf" else LARGE_EPS_LINF * math.sqrt(dim)
    zero = torch.zeros(m, dtype=torch.bool)
    s_correct = torch.zeros(len(eps_values), m, dtype=torch.bool)
    s_up = torch.zeros(len(eps_values), m, dtype=torch.bool)
    large = torch.zeros(m, dtype=torch.bool)
    square = torch.zeros(m, dtype=torch.bool)
    sq = Square(
        ctx.model,
        norm=ctx.norm,
        eps=ctx.eps,
        queries=square_queries,
        seed=ctx.seed,
        device=ctx.device,
        rescale_schedule=True,
    )
    for sl, xb, yb in ctx.batches():
        if sl.start >= m:
            break
        stop = min(sl.stop, m)
        xb, yb, sl = xb[: stop - sl.start], yb[: stop - sl.start], slice(sl.start, stop)
        # 1. zero input gradients at the clean points
        xg = xb.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(ctx.model(xg).float(), yb, reduction="sum")
            (g,) = torch.autograd.grad(loss, xg)
        zero[sl] = (g.flatten(1).abs().sum(1) == 0).cpu()
        # 2. ε sweep; 3. very large ε
        for j, e in enumerate(eps_values):
            s_correct[j, sl], s_up[j, sl] = _sweep(ctx, xb, yb, e)
        large[sl] = _sweep(ctx, xb, yb, big)[0]
        # 4. black-box Square (seeded per batch by pyautoattack)
        adv = sq(xb, yb)
        ctx.verify_ball("Square", adv, xb)
        with torch.no_grad():
            square[sl] = (ctx.model(adv).argmax(1) == yb).cpu()
    return {
        "points": m,
        "dim": dim,
        "sweep_eps": eps_values,
        "large_eps": big,
        "square_queries": square_queries,
        "pt_zero_grad": zero,
        "pt_sweep_correct": s_correct,
        "pt_sweep_increased": s_up,
        "pt_large_correct": large,
        "pt_square_correct": square,
    }


def masking_checks(
    ctx: SuiteContext, *, check_points: int = 200, square_queries: int = 1000
) -> None:
    """Cheap gradient-masking indicators on the first ``check_points`` points (see module doc)."""
    data = masking_data(ctx, check_points=check_points, square_queries=square_queries)
    masking_verdicts(ctx, data)


def _pt(data: dict[str, Any], key: str) -> torch.Tensor | None:
    v = data.get(key)
    return None if v is None else torch.as_tensor(v, dtype=torch.bool)


def masking_verdicts(ctx: SuiteContext | Results, data: dict[str, Any]) -> None:
    """The masking checks' verdicts from :func:`masking_data` of every point (see module doc).

    ``ctx`` needs ``clean_correct``, ``outcomes``, ``modes``, ``norm``, ``eps``, ``extras`` and
    ``check(name, status, message)``: a :class:`~fortify.evaluate.context.SuiteContext` or the
    joined results of a sharded evaluation (:class:`~fortify.evaluate.shard.Results`).
    """
    m = int(data["points"])
    sub = f"on the first {m} points"
    clean_sub = ctx.clean_correct[:m]
    zero_pt, large_pt = _pt(data, "pt_zero_grad"), _pt(data, "pt_large_correct")
    s_correct, s_up = _pt(data, "pt_sweep_correct"), _pt(data, "pt_sweep_increased")
    assert zero_pt is not None and large_pt is not None
    assert s_correct is not None and s_up is not None

    # 1. zero input gradients at the clean points
    zero = int(zero_pt.sum())
    ctx.check(
        "zero gradients",
        "warn" if zero else "ok",
        f"{zero}/{m} points have an all-zero input gradient ({sub}); gradient-based attacks "
        "cannot move them"
        if zero
        else f"no point has an all-zero input gradient ({sub})",
        masking=True,
    )

    # 2. ε sweep: monotonicity and loss increase; 3. very large ε
    eps_values = [float(e) for e in data["sweep_eps"]]
    curve = [(e, 100.0 * float(s_correct[j].float().mean())) for j, e in enumerate(eps_values)]
    loss_up = None
    at_eps = torch.ones(m, dtype=torch.bool)  # survived the checks' attacks at ε
    for j, e in enumerate(eps_values):
        if math.isclose(e, ctx.eps):
            loss_up = s_up[j]
            at_eps &= s_correct[j]
    ctx.extras["eps_sweep"] = {
        "norm": ctx.norm,
        "points": m,
        "attack": "PGD-20 CE, step 2.5ε/20",
        "curve": curve,
    }
    tol = 1.0 + 100.0 / m
    rises = [(a, b) for a, b in zip(curve, curve[1:], strict=False) if b[1] > a[1] + tol]
    ctx.check(
        "monotone in ε",
        "warn" if rises else "ok",
        (
            "robust accuracy rises with ε: "
            + ", ".join(
                f"{a[1]:.1f}% at ε={a[0]:.4g} → {b[1]:.1f}% at ε={b[0]:.4g}" for a, b in rises
            )
            + f" ({sub})"
        )
        if rises
        else "robust accuracy non-increasing over ε ∈ {"
        + ", ".join(f"{e:.4g}" for e, _ in curve)
        + "} ("
        + sub
        + ")",
        masking=True,
    )
    if loss_up is not None:
        stuck = int((~loss_up).sum())
        frac = stuck / m
        ctx.check(
            "PGD increases the loss",
            "warn" if frac > 0.05 else "ok",
            f"PGD-20 did not increase the CE loss for {stuck}/{m} points ({sub})"
            if frac > 0.05
            else f"PGD-20 increased the CE loss for {m - stuck}/{m} points ({sub})",
            masking=True,
        )
    big = float(data["large_eps"])
    acc_big = 100.0 * float(large_pt.float().mean())
    ctx.extras["large_eps"] = {"eps": big, "accuracy": acc_big, "points": m}
    ctx.check(
        "large ε → 0",
        "warn" if acc_big > LARGE_EPS_MAX_ACC else "ok",
        f"robust accuracy {acc_big:.1f}% at ε={big:.3g} ({ctx.norm}, PGD-20, {sub}); "
        + (
            "should be near 0 — a sign of gradient masking"
            if acc_big > LARGE_EPS_MAX_ACC
            else "near 0 as expected"
        ),
        masking=True,
    )

    # 4. black-box Square vs white-box attacks
    square_queries = int(data["square_queries"])
    sq_correct = _pt(data, "pt_square_correct")
    if sq_correct is None:  # pragma: no cover
        ctx.check("Square vs white-box", "warn", "pyautoattack not installed; Square check skipped")
        _add_check_attacks(ctx, at_eps & clean_sub, "PGD-20 CE at ε (step 2.5ε/20)")
        return
    mode = ctx.modes[0]
    white = [o for o in ctx.outcomes if o.name != NATURAL and o.mode != MODE_FREE]
    wb = worst_case(white, mode)
    sq_correct = sq_correct & clean_sub
    acc_sq = 100.0 * float(sq_correct.float().mean())
    ctx.extras["square"] = {"queries": square_queries, "points": m, "accuracy": acc_sq}
    _add_check_attacks(
        ctx,
        at_eps & sq_correct,
        f"PGD-20 CE at ε (step 2.5ε/20, no random start) and Square ({square_queries} queries)",
    )
    if wb is None:
        ctx.check(
            "Square vs white-box",
            "ok",
            f"Square ({square_queries} queries): {acc_sq:.1f}% ({sub}); no white-box attack to "
            "compare",
            masking=True,
        )
        return
    wb_correct, wb_ran = wb
    both = torch.ones(m, dtype=torch.bool) if wb_ran is None else wb_ran[:m].clone()
    wb_sub, sq_sub = wb_correct[:m][both], sq_correct[both]
    k = int(both.sum())
    acc_wb, acc_sq_both = accuracy_on(wb_sub, None), accuracy_on(sq_sub, None)
    only_sq = int((wb_sub & ~sq_sub).sum())
    ctx.extras["square"].update(whitebox_accuracy=acc_wb, broken_only_by_square=only_sq)
    msg = (
        f"Square ({square_queries} queries) {acc_sq_both:.1f}% vs white-box worst case "
        f"{acc_wb:.1f}% [{mode}] (on {k} of the first {m} points); "
        f"{only_sq} point(s) broken only by Square"
    )
    if k and acc_sq_both < acc_wb - SQUARE_MARGIN:
        ctx.check(
            "Square vs white-box",
            "warn",
            msg + " — a black-box attack beating white-box ones suggests gradient masking",
            masking=True,
        )
    else:
        ctx.check("Square vs white-box", "ok", msg, masking=True)


def _add_check_attacks(ctx: SuiteContext | Results, survived: torch.Tensor, what: str) -> None:
    """Add the checks' attacks at ε as column ``Check attacks`` on the first ``len(survived)``
    points (mode-free, outside the Ensemble, inside Worst case)."""
    m = len(survived)
    correct = torch.zeros(ctx.n, dtype=torch.bool)
    correct[:m] = survived
    ctx.add(
        Outcome(
            CHECK_ATTACKS,
            correct,
            MODE_FREE,
            ensemble=False,
            note=f"per-point worst case of the masking checks' attacks at ε: {what}, on the "
            f"first {m} of {ctx.n} points",
            ran=first_mask(ctx.n, m),
        )
    )

"""Built-in suites: ``paper`` (FSR release), ``quick``, ``autoattack`` (pyautoattack), ``full``
(paper + AutoAttack) and ``pgd10`` (RiFT's robustness number)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from fortify.errors import ConfigError, check_point_count
from fortify.evaluate.autoattack import StandardAutoAttack, capture_warnings, check_classes
from fortify.evaluate.context import SuiteContext, first_points, first_points_note
from fortify.evaluate.outcome import MODE_FREE, Outcome, ensemble_of, first_mask
from fortify.evaluate.registry import register_suite

log = logging.getLogger(__name__)

CW_KAPPA = 50.0
AA_SCOPES = ("all", "robust")
#: The advice of the error on a model with fewer than 4 classes (AutoAttack needs 4).
AA_INSTEAD = "use suite 'paper' or 'quick'"


@register_suite(
    "paper",
    description="FSR release: Natural, FGSM, PGD-20, PGD-100, C&W (κ=50), Ensemble",
    shardable=True,
)
def paper_suite(ctx: SuiteContext) -> None:
    """FSR release settings: FGSM; PGD-20/100 step 0.1ε no random start; C&W = PGD-30 κ=50."""
    step = 0.1 * ctx.eps
    ctx.run_fgsm("FGSM")
    ctx.run_pgd("PGD-20", steps=20, step_size=step, random_start=False, loss="ce")
    ctx.run_pgd("PGD-100", steps=100, step_size=step, random_start=False, loss="ce")
    ctx.run_pgd("C&W", steps=30, step_size=step, random_start=False, loss="cw", kappa=CW_KAPPA)


@register_suite(
    "quick",
    description="PGD-20 (step 0.1ε, no random start) + Ensemble, for training/validation",
    shardable=True,
)
def quick_suite(ctx: SuiteContext) -> None:
    """PGD-20 only (the cheap validation-time estimate)."""
    ctx.run_pgd("PGD-20", steps=20, step_size=0.1 * ctx.eps, random_start=False, loss="ce")


@register_suite("pgd10")
def pgd10_suite(ctx: SuiteContext) -> None:
    """PGD-10 (L∞, step ε/4, random start): RiFT's robustness number"""
    ctx.run_pgd("PGD-10", steps=10, step_size=ctx.eps / 4, random_start=True)


@dataclass
class AutoAttackOptions:
    """Options of the ``autoattack`` and ``full`` suites (``evaluate(..., suite_options=...)``).

    Attributes:
        autoattack_points: run AutoAttack on the first N points only (None: all); the other
            points are not counted in the AutoAttack column (nor in any worst case containing
            it), and the column's n, its note and the report's ``autoattack_points`` setting say
            how many were attacked.
        autoattack_scope: ``"all"`` (default): AutoAttack attacks every clean-correct point and
            its column is a standalone AutoAttack accuracy. ``"robust"`` (suite ``full`` only):
            AutoAttack attacks only the points that survived every attack of the paper suite,
            the only points where it can change the worst case. The AutoAttack column is then
            marked "not computed" and enters the Ensemble, which equals the per-point worst case
            Ensemble ∧ AutoAttack of an ``"all"`` run bit for bit (outside the Ensemble with
            ``"all"``, as before).
    """

    autoattack_points: int | None = None
    autoattack_scope: str = "all"

    def validate(self) -> None:
        """Raise :class:`ConfigError` on a bad value."""
        check_point_count(self.autoattack_points, "autoattack_points")
        if self.autoattack_scope not in AA_SCOPES:
            raise ConfigError(
                f"autoattack_scope must be one of {', '.join(AA_SCOPES)}, got "
                f"{self.autoattack_scope!r}"
            )


def run_autoattack(
    ctx: SuiteContext,
    *,
    name: str = "AutoAttack",
    points: int | None = None,
    survivors: torch.Tensor | None = None,
    scope: str = "all",
) -> Outcome:
    """Run AutoAttack (standard version, :class:`~fortify.evaluate.autoattack.StandardAutoAttack`)
    chunk by chunk; pyautoattack's own checks' warnings become checks.

    Each chunk of ``ctx.batches()`` is one ``run_standard_evaluation`` call (batch = the chunk,
    AutoAttack's seed = ``ctx.seed``), so a point's outcome depends only on (seed, its chunk).

    Args:
        points: attack only the first ``points`` points (None: all). The others are not attacked
            and not counted (``Outcome.ran``); the note and ``ctx.settings`` say so.
        survivors: bool (N,) — the points no earlier attack broke. When given, each chunk's
            survivors and its other clean-correct points are attacked in two separate calls, so
            the survivors' outcomes do not depend on ``scope``.
        scope: ``"all"``: a standalone column, outside the Ensemble. ``"robust"``: attack the
            survivors only; the column is marked not computed and enters the Ensemble, which
            then equals the ``"all"`` run's Ensemble ∧ AutoAttack bit for bit. Needs
            ``survivors``.
    """
    check_point_count(points, "autoattack_points")
    if scope not in AA_SCOPES:
        raise ConfigError(f"autoattack_scope must be one of {', '.join(AA_SCOPES)}, got {scope!r}")
    if scope == "robust" and survivors is None:
        raise ConfigError(
            "autoattack_scope='robust' needs cheaper attacks to run first: use suite 'full' "
            "(the autoattack suite alone has no worst case to restrict AutoAttack to)"
        )
    adversary = StandardAutoAttack.in_context(ctx, instead=AA_INSTEAD)
    limit = first_points(ctx.n, points)
    notes = [first_points_note("AutoAttack", limit, ctx.n), adversary.note]
    ctx.settings["autoattack_points"] = limit
    ctx.settings["autoattack_scope"] = scope
    in_limit = torch.arange(ctx.n) < limit
    attack = in_limit & ctx.clean_correct
    groups = [attack] if survivors is None else [attack & survivors, attack & ~survivors]
    if scope == "robust":
        groups = groups[:1]
    # Not attacked: beyond the limit (not counted: ``ran``), or broken by earlier attacks.
    correct = ctx.clean_correct & ~in_limit
    t0 = time.perf_counter()
    attacked = 0
    with capture_warnings() as found:
        for sl, xb, yb in ctx.batches():
            for group in groups:
                idx = group[sl].nonzero().flatten()
                if not len(idx):
                    continue
                xa, ya = xb[idx.to(xb.device)], yb[idx.to(yb.device)]
                x_adv = adversary(xa, ya)
                ctx.verify_ball(name, x_adv, xa)
                correct[sl.start + idx] = (ctx.predict(x_adv) == ya).cpu()
                attacked += len(idx)
    dt = time.perf_counter() - t0
    if found:
        for msg in found:
            ctx.check("AutoAttack's own checks", "warn", msg, masking=True)
    else:
        ctx.check(
            "AutoAttack's own checks",
            "ok",
            "no warnings (randomness, probability outputs, dynamic defence, classes, zero "
            "gradients, Square vs APGD)",
            masking=True,
        )
    if scope == "robust":
        notes.append(
            "not computed on its own: AutoAttack ran only on the points that survived every "
            "other attack (autoattack_scope=robust), so here it enters the Ensemble, which is "
            "the worst case over all attacks including AutoAttack"
        )
    log.info("%s: attacked %d point(s) in this process in %.1f s", name, attacked, dt)
    note = "; ".join(n for n in notes if n)
    return ctx.add(
        Outcome(
            name,
            correct,
            MODE_FREE,
            ensemble=scope == "robust",
            seconds=dt,
            note=note,
            ran=first_mask(ctx.n, limit),
            computed=scope == "all",
        )
    )


@register_suite(
    "autoattack",
    description="AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) via pyautoattack",
    options=AutoAttackOptions,
    shardable=True,
)
def autoattack_suite(ctx: SuiteContext) -> None:
    """AutoAttack standard version through the reference package ``pyautoattack``."""
    run_autoattack(
        ctx,
        points=ctx.options.get("autoattack_points"),
        scope=ctx.options.get("autoattack_scope", "all"),
    )


@register_suite(
    "full", description="paper suite + AutoAttack", options=AutoAttackOptions, shardable=True
)
def full_suite(ctx: SuiteContext) -> None:
    """Everything of ``paper`` followed by ``autoattack``.

    AutoAttack attacks the points that survived every paper attack (in any row) separately from
    the others, so ``autoattack_scope="robust"`` (survivors only) gives the same worst case.
    """
    check_classes(ctx.num_classes, instead=AA_INSTEAD)  # before the paper attacks run
    paper_suite(ctx)
    survivors = torch.zeros(ctx.n, dtype=torch.bool)
    for mode in ctx.modes:
        worst = ensemble_of(ctx.outcomes, mode)
        if worst is not None:
            survivors |= worst
    run_autoattack(
        ctx,
        points=ctx.options.get("autoattack_points"),
        survivors=survivors,
        scope=ctx.options.get("autoattack_scope", "all"),
    )

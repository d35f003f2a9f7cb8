"""Built-in suites: ``paper`` (FSR release), ``autoattack`` (pyautoattack), ``quick``, ``full``."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import torch

from fortify.errors import ConfigError, EvaluationError, check_point_count
from fortify.evaluate.core import (
    SuiteContext,
    attack_first,
    first_points,
    first_points_note,
    register_suite,
)
from fortify.evaluate.report import MODE_FREE, Outcome, first_mask

log = logging.getLogger("fortify.evaluate.suites")

CW_KAPPA = 50.0


@register_suite(
    "paper", description="FSR release: Natural, FGSM, PGD-20, PGD-100, C&W (κ=50), Ensemble"
)
def paper_suite(ctx: SuiteContext) -> None:
    """FSR release settings: FGSM; PGD-20/100 step 0.1ε no random start; C&W = PGD-30 κ=50."""
    step = 0.1 * ctx.eps
    ctx.run_fgsm("FGSM")
    ctx.run_pgd("PGD-20", steps=20, step_size=step, random_start=False, loss="ce")
    ctx.run_pgd("PGD-100", steps=100, step_size=step, random_start=False, loss="ce")
    ctx.run_pgd("C&W", steps=30, step_size=step, random_start=False, loss="cw", kappa=CW_KAPPA)


@register_suite(
    "quick", description="PGD-20 (step 0.1ε, no random start) + Ensemble, for training/validation"
)
def quick_suite(ctx: SuiteContext) -> None:
    """PGD-20 only (the cheap validation-time estimate)."""
    ctx.run_pgd("PGD-20", steps=20, step_size=0.1 * ctx.eps, random_start=False, loss="ce")


class _CaptureLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class AutoAttackOptions:
    """Options of the ``autoattack`` and ``full`` suites (``evaluate(..., suite_options=...)``).

    Attributes:
        autoattack_points: run AutoAttack on the first N points only (None: all); the other
            points are not counted in the AutoAttack column (nor in any worst case containing
            it), and the column's n, its note and the report's ``autoattack_points`` setting say
            how many were attacked.
    """

    autoattack_points: int | None = None

    def validate(self) -> None:
        """Raise :class:`ConfigError` on a bad value."""
        check_point_count(self.autoattack_points, "autoattack_points")


def run_autoattack(
    ctx: SuiteContext,
    *,
    version: str = "standard",
    name: str = "AutoAttack",
    points: int | None = None,
) -> Outcome:
    """Run pyautoattack's standard version; its own checks' warnings become checks.

    Args:
        points: attack only the first ``points`` points (None: all). The others are not attacked
            and not counted (``Outcome.ran``); the note and ``ctx.settings`` say so.
    """
    check_point_count(points, "autoattack_points")
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:  # pragma: no cover - pyautoattack is a dependency
        raise EvaluationError(
            "the autoattack suite needs the 'pyautoattack' package (pip install pyautoattack)"
        ) from exc
    k = ctx.num_classes
    if k < 4:
        raise ConfigError(
            f"AutoAttack's standard version needs at least 4 classes (targeted DLR), the model "
            f"has {k}; "
            "use suite 'paper' or 'quick'"
        )
    norm = {"linf": "Linf", "l2": "L2"}[ctx.norm]
    adversary = AutoAttack(
        ctx.model, norm=norm, eps=ctx.eps, version=version, device=ctx.device, seed=ctx.seed
    )
    limit = first_points(ctx.n, points)
    notes = [first_points_note("AutoAttack", limit, ctx.n)]
    if k - 1 < 9:  # fewer than 10 classes: one target per other class
        adversary.apgd_targeted.n_target_classes = k - 1
        adversary.fab.n_target_classes = k - 1
        notes.append(f"APGD-T/FAB-T with {k - 1} target classes (model has {k})")
    ctx.settings["autoattack_points"] = limit
    x_all = ctx.x.to(ctx.device)

    def _run(xa: torch.Tensor, ya: torch.Tensor) -> torch.Tensor:
        return adversary.run_standard_evaluation(xa, ya, batch_size=ctx.batch_size)[0]

    handler = _CaptureLog()
    aa_log = logging.getLogger("auto-attack")
    aa_log.addHandler(handler)
    t0 = time.perf_counter()
    try:
        # pyautoattack reseeds the global RNG; keep the caller's RNG state untouched.
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x_adv = attack_first(_run, x_all, ctx.y.to(ctx.device), limit)
    finally:
        aa_log.removeHandler(handler)
    found = handler.messages + [str(w.message) for w in caught]
    ctx.verify_ball(name, x_adv, x_all)
    correct = torch.zeros(ctx.n, dtype=torch.bool)
    for sl, _, yb in ctx.batches():
        correct[sl] = (ctx.predict(x_adv[sl]) == yb).cpu()
    correct &= ctx.clean_correct
    dt = time.perf_counter() - t0
    if found:
        for msg in dict.fromkeys(found):
            ctx.check("AutoAttack's own checks", "warn", msg, masking=True)
    else:
        ctx.check(
            "AutoAttack's own checks",
            "ok",
            "no warnings (randomness, probability outputs, dynamic defence, classes, zero "
            "gradients, Square vs APGD)",
            masking=True,
        )
    note = "; ".join(n for n in notes if n)
    return ctx.add(
        Outcome(
            name,
            correct,
            MODE_FREE,
            ensemble=False,
            seconds=dt,
            note=note,
            ran=first_mask(ctx.n, limit),
        )
    )


@register_suite(
    "autoattack",
    description="AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) via pyautoattack",
    options=AutoAttackOptions,
)
def autoattack_suite(ctx: SuiteContext) -> None:
    """AutoAttack standard version through the reference package ``pyautoattack``."""
    run_autoattack(ctx, points=ctx.options.get("autoattack_points"))


@register_suite("full", description="paper suite + AutoAttack", options=AutoAttackOptions)
def full_suite(ctx: SuiteContext) -> None:
    """Everything of ``paper`` followed by ``autoattack``."""
    paper_suite(ctx)
    run_autoattack(ctx, points=ctx.options.get("autoattack_points"))

"""The ``adaptive`` suite: an evaluation of bounded-output models (FPD) that cannot be fooled.

A model whose output is bounded (FPD's ``tanh`` on the logits) saturates: in float32 the
cross-entropy gradient through ``tanh(z)`` is exactly zero once ``|z|`` exceeds ~9, so PGD on
the bounded output stalls and reports robustness that is not there (gradient masking). This
suite runs, side by side and **all scored on the real bounded model**:

- the usual attacks on the bounded output: FGSM, PGD-CE;
- white-box attacks on the pre-bound logits, ``model.unbounded_logits(x)`` wrapped as an
  ``nn.Module`` (:class:`UnboundedLogits`): PGD on the C&W margin (κ) and on DLR;
- AutoAttack (standard) on the bounded output and on the pre-bound logits;
- Square (score-based black box) on the bounded output and on the pre-bound logits;
- transfer: PGD-CE crafted on a plain surrogate model (a module, or a fortify run directory /
  checkpoint);

and adds checks (bounded output; zero gradients on the output vs the logits; the gap between
CE-on-output and the logit attacks; black box beating white box) to the evaluator's own
gradient-masking checks. Every column enters the Ensemble, the per-sample worst case over
everything (with Natural, so it never exceeds clean accuracy): that is the headline robust
accuracy, also stored as ``report.extras["adaptive"]["headline"]``.

Use ``evaluate(model, x, y, suite="adaptive", eps=..., suite_options={...})`` with any fields of
:class:`AdaptiveOptions` as option names (e.g. ``{"steps": 20, "surrogate": plain}``), or
:func:`adaptive_evaluate` to pass an :class:`AdaptiveOptions` instance. A model without
``unbounded_logits`` is attacked on its own output in the logit columns (noted in the report).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from fortify.attacks import PGDOptions, attack_loss, pgd
from fortify.errors import ConfigError, FortifyError, check_point_count
from fortify.evaluate.autoattack import Square, StandardAutoAttack, check_classes
from fortify.evaluate.context import SuiteContext, attack_first, first_points, first_points_note
from fortify.evaluate.driver import evaluate
from fortify.evaluate.outcome import Outcome, accuracy_on, first_mask, worst_case
from fortify.evaluate.registry import describe_option, register_suite
from fortify.evaluate.report import EvalReport

log = logging.getLogger(__name__)

SUITE = "adaptive"
AUTOATTACK_TARGETS = ("both", "bounded", "logits", "none")
SQUARE_TARGETS = ("bounded", "logits")
#: The advice of the error on a model with fewer than 4 classes (AutoAttack needs 4).
AA_INSTEAD = "give the adaptive option autoattack='none' to run the other attacks without it"
GAP_WARN = 2.0  # percentage points by which CE-on-output may exceed the logit attacks


class UnboundedLogits(nn.Module):
    """``forward(x) = model.unbounded_logits(x)``: the pre-bound logits (N, K) as a model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(model, "unbounded_logits", None)):
            raise FortifyError(
                f"{type(model).__name__} has no unbounded_logits(x) method; only bounded-output "
                "models such as FPD expose pre-bound logits"
            )
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = cast(Callable[[torch.Tensor], torch.Tensor], self.model.unbounded_logits)
        return logits(x)


def logits_model(model: nn.Module) -> nn.Module | None:
    """The pre-bound-logits view of ``model`` (itself or a DDP ``.module``), or None."""
    for m in (model, getattr(model, "module", None)):
        if m is not None and callable(getattr(m, "unbounded_logits", None)):
            return UnboundedLogits(m)
    return None


def load_surrogate(surrogate: nn.Module | str | Path, device: torch.device) -> nn.Module:
    """A surrogate model: a module, or a fortify run directory / checkpoint path (tag "best")."""
    if isinstance(surrogate, nn.Module):
        return surrogate.to(device)
    from fortify.runs import load_model

    path = Path(surrogate)
    if not path.exists():
        raise FortifyError(
            f"surrogate {str(path)!r} does not exist; pass a run directory or checkpoint"
        )
    model, _meta = load_model(path, device=device)
    return model


@dataclass
class AdaptiveOptions:
    """Budgets of the adaptive suite (ε and norm come from :func:`evaluate`).

    Every field is also an option name of the suite: ``evaluate(..., suite="adaptive",
    suite_options={"steps": 20, "autoattack": "none"})``; :meth:`as_suite_options` converts an
    instance.

    Attributes:
        steps: PGD steps of every white-box column (FPD release: 40).
        step_size: pixel units; None: 2.5·ε/steps.
        restarts: PGD restarts (later restarts only on points not yet broken).
        kappa: C&W confidence on the pre-bound logits.
        autoattack: "both" (bounded output and logits), "bounded", "logits" or "none".
        autoattack_points: run AutoAttack on the first N points only (None: all); the others
            are not counted in those columns nor in the worst case (its n says so).
        square_queries: Square's query budget per point (0 disables the Square columns).
        square_on: which outputs Square sees ("bounded", "logits").
        surrogate: plain model, run directory or checkpoint for the transfer column; None skips.
        transfer_steps: PGD steps on the surrogate (None: ``steps``).
    """

    steps: int = 40
    step_size: float | None = None
    restarts: int = 1
    kappa: float = 50.0
    autoattack: str = "both"
    autoattack_points: int | None = None
    square_queries: int = 5000
    square_on: Sequence[str] = SQUARE_TARGETS
    surrogate: nn.Module | str | Path | None = None
    transfer_steps: int | None = None

    def as_suite_options(self) -> dict[str, Any]:
        """``{field: value}`` for ``evaluate(..., suite_options=...)`` (values not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field and what it allows."""
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"adaptive steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.restarts, int) or self.restarts < 1:
            raise ConfigError(f"adaptive restarts must be an integer >= 1, got {self.restarts!r}")
        if self.step_size is not None and not self.step_size > 0:
            raise ConfigError(
                f"adaptive step_size must be > 0 (pixel units), got {self.step_size!r}"
            )
        if self.autoattack not in AUTOATTACK_TARGETS:
            raise ConfigError(
                f"adaptive autoattack={self.autoattack!r} is not allowed; "
                f"choose one of {list(AUTOATTACK_TARGETS)}"
            )
        bad = [s for s in self.square_on if s not in SQUARE_TARGETS]
        if bad:
            raise ConfigError(
                f"adaptive square_on has {bad}; allowed entries: {list(SQUARE_TARGETS)}"
            )
        if self.square_queries < 0:
            raise ConfigError(f"adaptive square_queries must be >= 0, got {self.square_queries}")
        check_point_count(self.autoattack_points, "adaptive autoattack_points")


def adaptive_evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    options: AdaptiveOptions | None = None,
    **kwargs: Any,
) -> EvalReport:
    """Run the ``adaptive`` suite with explicit budgets.

    Args:
        model: maps images (N, C, H, W) in [0, 1] to (bounded) logits (N, K); if it has
            ``unbounded_logits(x)`` (FPD does) the logit columns attack that.
        x, y: images in [0, 1] and int64 labels. eps: budget in pixel units.
        options: :class:`AdaptiveOptions` (surrogate, steps, AutoAttack / Square budgets).
        **kwargs: passed to :func:`fortify.evaluate.evaluate` (norm, batch_size, seed, mode,
            checks, check_points, square_queries of the generic Square check, ...).
            Fields of :class:`AdaptiveOptions` may also be given here directly.
    Returns:
        the :class:`EvalReport`; the headline is its Ensemble column.
    """
    opts = options or AdaptiveOptions()
    names = set(AdaptiveOptions.__dataclass_fields__)
    own = {k: kwargs.pop(k) for k in list(kwargs) if k in names and k != "square_queries"}
    if "adaptive_square_queries" in kwargs:
        own["square_queries"] = kwargs.pop("adaptive_square_queries")
    opts = replace(opts, **own)
    return evaluate(
        model, x, y, suite=SUITE, eps=eps, suite_options=opts.as_suite_options(), **kwargs
    )


# --------------------------------------------------------------------------------------------


def _zero_grad_fraction(
    net: nn.Module, ctx: SuiteContext, loss: str, kappa: float, m: int
) -> float:
    """Fraction of the first ``m`` points whose input gradient of ``loss`` is exactly zero."""
    zero = 0
    for i in range(0, m, ctx.batch_size):
        xb = ctx.x[i : min(i + ctx.batch_size, m)].to(ctx.device)
        yb = ctx.y[i : min(i + ctx.batch_size, m)].to(ctx.device)
        with torch.enable_grad():
            xa = xb.detach().clone().requires_grad_(True)
            obj = attack_loss(net(xa), yb, None, loss=loss, targeted=False, kappa=kappa).sum()
            (g,) = torch.autograd.grad(obj, xa)
        zero += int((g.flatten(1).abs().amax(1) == 0).sum())
    return zero / max(m, 1)


@register_suite(
    SUITE,
    description="FPD-proof: CE on the output, C&W/DLR on pre-bound logits, AutoAttack, Square, "
    "transfer; Ensemble = worst case over all",
    options=AdaptiveOptions,
)
def adaptive_suite(ctx: SuiteContext) -> None:
    """Attacks that see through bounded outputs (see the module docstring)."""
    opts = AdaptiveOptions(**ctx.options)
    opts.validate()
    eps, norm, k = ctx.eps, ctx.norm, opts.steps
    step = opts.step_size if opts.step_size is not None else 2.5 * eps / k
    logit_net = logits_model(ctx.model)
    has_logits = logit_net is not None
    target = logit_net if logit_net is not None else ctx.model
    where = "pre-bound logits" if has_logits else "model output (it has no unbounded_logits)"
    if opts.autoattack in ("both", "bounded") or (opts.autoattack == "logits" and has_logits):
        check_classes(ctx.num_classes, instead=AA_INSTEAD)  # before any attack runs
    columns: dict[str, list[Outcome]] = {}

    base = PGDOptions(eps=eps, steps=k, norm=norm, restarts=opts.restarts, kappa=opts.kappa)

    def pgd_fn(
        net: nn.Module, loss: str, salt: int, s: float = step, n: int = k
    ) -> Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]:
        def fn(xb: torch.Tensor, yb: torch.Tensor, sl: slice) -> torch.Tensor:
            gen = ctx.generator(salt + sl.start)
            return pgd(net, xb, yb, options=base, steps=n, step_size=s, loss=loss, generator=gen)

        return fn

    # -- the usual attacks on the bounded output ---------------------------------------------
    columns["FGSM"] = ctx.run_fgsm("FGSM")
    columns["ce"] = ctx.run_pgd(
        f"PGD-{k} CE",
        steps=k,
        step_size=step,
        loss="ce",
        random_start=True,
        restarts=opts.restarts,
        note="cross-entropy on the model's (bounded) output",
    )
    # -- white box on the pre-bound logits, scored on the bounded model -----------------------
    columns["cw"] = ctx.run_attack(
        f"PGD-{k} C&W",
        pgd_fn(target, "cw", 11),
        note=f"margin loss κ={opts.kappa:g} on the {where}",
    )
    columns["dlr"] = ctx.run_attack(
        f"PGD-{k} DLR", pgd_fn(target, "dlr", 13), note=f"DLR loss on the {where}"
    )
    # -- AutoAttack -------------------------------------------------------------------------
    limit = first_points(ctx.n, opts.autoattack_points)
    aa_nets = []
    if opts.autoattack in ("both", "bounded"):
        aa_nets.append(("AutoAttack", ctx.model, "standard AutoAttack on the model's output"))
    if opts.autoattack in ("both", "logits") and has_logits:
        aa_nets.append(
            ("AutoAttack (logits)", target, "standard AutoAttack on the pre-bound logits")
        )
    for name, net, note in aa_nets:
        adversary = StandardAutoAttack.in_context(ctx, net, instead=AA_INSTEAD)

        def aa_fn(
            xb: torch.Tensor, yb: torch.Tensor, sl: slice, adversary: StandardAutoAttack = adversary
        ) -> torch.Tensor:
            return attack_first(adversary, xb, yb, limit - sl.start)

        if limit < ctx.n:
            note += "; " + first_points_note("AutoAttack", limit, ctx.n)
        columns[name] = ctx.run_attack(name, aa_fn, note=note, ran=first_mask(ctx.n, limit))
    if aa_nets:
        ctx.settings["autoattack_points"] = limit
    # -- black box ----------------------------------------------------------------------------
    black = []
    if opts.square_queries > 0:
        for which in opts.square_on:
            if which == "logits" and not has_logits:
                continue
            net = ctx.model if which == "bounded" else target
            name = "Square" if which == "bounded" else "Square (logits)"

            square = Square(
                net,
                norm=norm,
                eps=eps,
                queries=opts.square_queries,
                seed=ctx.seed,
                device=ctx.device,
                rescale_schedule=opts.square_queries < 5000,
            )

            def sq_fn(
                xb: torch.Tensor, yb: torch.Tensor, sl: slice, square: Square = square
            ) -> torch.Tensor:
                return square(xb, yb)

            seen = "model output" if which == "bounded" else "pre-bound logits"
            black.append(
                ctx.run_attack(name, sq_fn, note=f"{opts.square_queries} queries on the {seen}")
            )
    if opts.surrogate is not None:
        sur = load_surrogate(opts.surrogate, ctx.device)
        was_training = sur.training
        sur.eval()
        n = opts.transfer_steps or k
        try:
            black.append(
                ctx.run_attack(
                    "Transfer",
                    pgd_fn(sur, "ce", 17, s=2.5 * eps / n, n=n),
                    note=f"PGD-{n} CE crafted on the surrogate ({type(sur).__name__}), "
                    "scored on the model",
                )
            )
        finally:
            sur.train(was_training)

    # -- checks of this suite -----------------------------------------------------------------
    mode = ctx.modes[0]

    def acc(outs: list[Outcome]) -> float:
        o = next((o for o in outs if o.mode == mode), outs[0] if outs else None)
        return o.accuracy if o is not None else float("nan")

    m = min(ctx.n, ctx.batch_size)
    with torch.no_grad():
        out = ctx.model(ctx.x[:m].to(ctx.device))
    bounded = bool(out.abs().max() <= 1.0 + 1e-6)
    ctx.check(
        "bounded output",
        "warn" if bounded else "ok",
        "the model's outputs lie in [-1, 1]: cross-entropy attacks on them are no evidence of "
        "robustness; the logit attacks, AutoAttack and the Ensemble are the numbers to trust"
        if bounded
        else "outputs are not confined to [-1, 1]",
    )
    top2 = out.float().topk(min(2, out.shape[1]), dim=1).values
    ties = int((top2[:, 0] == top2[:, -1]).sum()) if out.shape[1] > 1 else 0
    ctx.extras.setdefault("adaptive_ties", ties)
    ctx.check(
        "saturated ties",
        "warn" if ties else "ok",
        f"{ties}/{m} clean points have two or more classes tied at the maximal output: their "
        "prediction is decided by argmax tie-breaking (class order), not by the model"
        if ties
        else f"no ties at the maximal output on the first {m} points",
    )
    zero_out = _zero_grad_fraction(ctx.model, ctx, "ce", 0.0, m)
    zero_logit = _zero_grad_fraction(target, ctx, "cw", opts.kappa, m) if has_logits else None
    msg = (
        f"{100 * zero_out:.1f}% of the first {m} points have an exactly zero CE gradient "
        "on the output"
    )
    if zero_logit is not None:
        msg += f", {100 * zero_logit:.1f}% a zero C&W gradient on the pre-bound logits"
    ctx.check(
        "zero gradients (output vs logits)",
        "warn" if zero_out > 0.05 else "ok",
        msg,
        masking=True,
    )
    if has_logits:
        big = min(1.0, max(0.5, 4 * eps)) if norm == "linf" else 4 * eps
        broken = 0
        for i in range(0, m, ctx.batch_size):
            xb = ctx.x[i : min(i + ctx.batch_size, m)].to(ctx.device)
            yb = ctx.y[i : min(i + ctx.batch_size, m)].to(ctx.device)
            large = PGDOptions(eps=big, steps=k, norm=norm, loss="dlr")  # step 2.5·big/k
            xa = pgd(target, xb, yb, options=large, generator=ctx.generator(19 + i))
            ctx.verify_ball("large-ε DLR on logits", xa, xb, big)
            broken += int((ctx.predict(xa) != yb).sum())
        acc_big = 100.0 * (1 - broken / max(m, 1))
        ctx.extras.setdefault("large_eps_logits", {"eps": big, "accuracy": acc_big, "points": m})
        ctx.check(
            "large ε → 0 (logits)",
            "warn" if acc_big > 5.0 else "ok",
            f"DLR on the pre-bound logits at ε={big:.3g} leaves {acc_big:.1f}% accuracy "
            f"(first {m} points)" + ("; should be near 0" if acc_big > 5.0 else ""),
            masking=True,
        )
    ce_acc, best_logit = acc(columns["ce"]), min(acc(columns["cw"]), acc(columns["dlr"]))
    gap = ce_acc - best_logit
    ctx.check(
        "CE on output vs logit attacks",
        "warn" if gap > GAP_WARN else "ok",
        f"PGD-CE on the output {ce_acc:.2f}% vs C&W/DLR on the {where} {best_logit:.2f}%"
        + (
            " — CE on the bounded output overestimates robustness (gradient masking)"
            if gap > GAP_WARN
            else ""
        ),
    )
    white = [acc(v) for key, v in columns.items() if v]
    if black and white:
        best_black, best_white = min(acc(b) for b in black), min(white)
        ctx.check(
            "black box vs white box",
            "warn" if best_black < best_white - GAP_WARN else "ok",
            f"best black-box column {best_black:.2f}% vs best white-box column {best_white:.2f}%"
            + (
                " — black box beats white box: white-box gradients are unreliable"
                if best_black < best_white - GAP_WARN
                else ""
            ),
            masking=True,
        )
    ens = worst_case(ctx.outcomes, mode)
    headline = accuracy_on(*ens) if ens is not None else float("nan")
    headline_n = ctx.n if ens is None or ens[1] is None else int(ens[1].sum())
    ctx.extras["adaptive"] = {
        "headline": headline,
        "headline_points": headline_n,
        "mode": mode,
        "logits_available": has_logits,
        "ce_minus_logit_attacks": gap,
        "zero_grad_fraction_output": zero_out,
        "zero_grad_fraction_logits": zero_logit,
        "steps": k,
        "step_size": step,
        "kappa": opts.kappa,
        "autoattack": opts.autoattack,
        "autoattack_points": limit,
        "square_queries": opts.square_queries,
        "surrogate": describe_option(opts.surrogate),
    }
    log.info("adaptive: headline (per-sample worst case over every column) %.2f%%", headline)

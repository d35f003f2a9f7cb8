"""Module robust criticality (MRC), step 1 of RiFT.

For module *i* with weight ``W₀``::

    MRC_i = max_{‖ΔW‖₂ ≤ ε‖W₀‖₂}  R(W₀ + ΔW) − R(W₀)

where ``R`` is the mean cross-entropy over a FIXED set of adversarial examples (crafted once
against the unperturbed model; see :func:`build_adversarial_set`). The maximum is approximated
by gradient ascent on that weight only (``torch.autograd.grad`` w.r.t. the weight; every other
parameter, bias and buffer is untouched), ``passes`` passes over the set in mini-batches, with a
projection after each pass that rescales ΔW to exactly ``ε‖W₀‖`` when it left the ball.

Two variants (``variant=``):

* ``"max"`` (default, the authors' release): always run all passes; MRC is the largest loss
  measured after any pass (and at W₀ itself, so MRC ≥ 0) minus the baseline loss.
* ``"first-projection"`` (the paper's Algorithm 1): stop after the first pass that needed a
  projection; MRC is the largest loss measured up to and including that point.

The model is put in eval mode (BatchNorm uses its running statistics; nothing is updated) and
the weight is restored bit-for-bit afterwards (checked). The results (:class:`ModuleMRC`,
:class:`MRCReport`, the bar chart) are in :mod:`fortify.rift.mrc_report`.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fortify.errors import ConfigError, DataError, EvaluationError
from fortify.rift.mrc_report import ModuleMRC, MRCReport

log = logging.getLogger(__name__)

VARIANTS = ("max", "first-projection")
DEFENCES_PREFIX = "fortify_defenses"
_NORM_TOL = 1e-5  # relative tolerance on ‖ΔW‖ ≤ ε‖W₀‖ (float32 rounding of the rescale)


# ----------------------------------------------------------------------------------------------
# which modules


def weight_modules(model: nn.Module, *, include_defences: bool = False) -> list[str]:
    """Names of every Conv2d / Linear with a weight parameter, in module (≈ depth) order.

    Modules of attached defences (under ``fortify_defenses.``) are skipped unless
    ``include_defences``; RiFT is about the backbone. Modules the model lists in its
    ``unused_modules`` (e.g. the WRN release's ``sub_block1``, never run in forward) are skipped:
    their MRC is trivially 0 and they must never be chosen for fine-tuning.
    """
    unused = tuple(getattr(model, "unused_modules", ()))
    names = []
    for name, mod in model.named_modules():
        if any(name == u or name.startswith(u + ".") for u in unused):
            continue
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        if not isinstance(getattr(mod, "weight", None), nn.Parameter):
            continue
        if not include_defences and name.split(".")[0] == DEFENCES_PREFIX:
            continue
        names.append(name)
    return names


def get_weight(model: nn.Module, name: str) -> nn.Parameter:
    """The ``weight`` parameter of submodule ``name`` (raises listing valid names)."""
    modules = dict(model.named_modules())
    candidates = weight_modules(model, include_defences=True)
    if name not in modules or name == "":
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"module {name!r} does not exist in the model.{hint} Modules with a weight: "
            f"{', '.join(candidates)}"
        )
    weight = getattr(modules[name], "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise ConfigError(
            f"module {name!r} ({type(modules[name]).__name__}) has no weight parameter; choose "
            f"one of: {', '.join(candidates)}"
        )
    return weight


# ----------------------------------------------------------------------------------------------
# the fixed adversarial set


def build_adversarial_set(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    batch_size: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """PGD-``steps`` L∞ examples (random start) against ``model`` in eval mode, crafted once.

    Args:
        x: float images (N, C, H, W) in [0, 1] — take them from the VALIDATION split.
        y: int64 labels (N,).
        eps: L∞ radius in pixel units; step_size defaults to ``eps / 4`` (2/255 at 8/255).
        seed: seeds the random start (a generator on ``x.device``).

    Returns:
        Adversarial images (N, C, H, W), detached, same device as ``x``.
    """
    from fortify.attacks import pgd

    if step_size is None:
        step_size = eps / 4
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    out = []
    try:
        for i in range(0, len(x), batch_size):
            out.append(
                pgd(
                    model,
                    x[i : i + batch_size],
                    y[i : i + batch_size],
                    eps=eps,
                    steps=steps,
                    step_size=step_size,
                    norm="linf",
                    loss="ce",
                    random_start=True,
                    mode="final",
                    generator=gen,
                )
            )
    finally:
        model.train(was_training)
    return torch.cat(out) if out else x[:0].clone()


@torch.no_grad()
def loss_and_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (percent) of ``model`` on (x, y), in the model's mode."""
    total_loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size])
        yb = y[i : i + batch_size]
        total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    n = max(len(x), 1)
    return total_loss / n, 100.0 * correct / n


# ----------------------------------------------------------------------------------------------
# the computation


@dataclass
class MRCOptions:
    """How a module's robust criticality is measured (defaults: the release's).

    Attributes:
        eps: radius of the weight perturbation relative to the weight's L2 norm (> 0).
        passes: ascent passes over the fixed adversarial set (>= 1).
        lr: ascent step size on the weight (> 0).
        batch_size: mini-batch size of the passes (>= 1).
        variant: ``"max"`` (release: the largest loss over all passes) or
            ``"first-projection"`` (paper: stop at the first pass that hits the radius).
    """

    eps: float = 0.1
    passes: int = 10
    lr: float = 1.0
    batch_size: int = 512
    variant: str = "max"

    def validate(self) -> MRCOptions:
        """``self`` if every field is allowed, else a ConfigError naming it and what is allowed."""
        eps, passes, lr, batch_size = self.eps, self.passes, self.lr, self.batch_size
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ConfigError(f"MRC radius eps must be > 0 (relative to ‖W‖), got {eps!r}")
        if not (isinstance(passes, int) and passes >= 1):
            raise ConfigError(f"MRC passes must be an integer >= 1, got {passes!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"MRC lr must be > 0, got {lr!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ConfigError(f"MRC batch size must be an integer >= 1, got {batch_size!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(
                f"unknown MRC variant {self.variant!r}; allowed: {', '.join(VARIANTS)}"
            )
        return self


def _options(options: MRCOptions | None, settings: dict[str, Any]) -> MRCOptions:
    """``options``, or :class:`MRCOptions` from keyword ``settings`` (not both), validated."""
    if options is not None and settings:
        raise ConfigError(
            f"pass MRC options either as options= or as keywords, not both: {sorted(settings)}"
        )
    if options is None:
        allowed = set(MRCOptions.__dataclass_fields__)
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise ConfigError(f"unknown MRC option(s) {unknown}; allowed: {sorted(allowed)}")
        options = MRCOptions(**settings)
    return options.validate()


def module_mrc(
    model: nn.Module,
    name: str,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    *,
    options: MRCOptions | None = None,
    baseline: tuple[float, float] | None = None,
    index: int = 0,
    **settings: Any,
) -> ModuleMRC:
    """MRC of module ``name`` on the fixed adversarial set (x_adv (N, C, H, W) in [0,1], y (N,)).

    ``options`` (or its fields as keywords: ``eps``, ``passes``, ``lr``, ``batch_size``,
    ``variant``) say how; ``baseline`` = (loss, acc%) of the unperturbed model on the set,
    computed when omitted. The model is evaluated in eval mode; its weight is restored exactly
    before returning.
    """
    opts = _options(options, settings)
    eps, passes, lr, batch_size, variant = (
        opts.eps, opts.passes, opts.lr, opts.batch_size, opts.variant
    )  # fmt: skip
    if len(x_adv) == 0 or len(x_adv) != len(y):
        raise DataError(
            f"MRC needs a non-empty adversarial set with one label per image; got "
            f"{len(x_adv)} images and {len(y)} labels"
        )
    weight = get_weight(model, name)
    was_training = model.training
    model.eval()
    flags = {p: p.requires_grad for p in model.parameters()}
    w0 = weight.detach().clone()
    w0_norm = float(w0.norm())
    radius = eps * w0_norm
    try:
        for p in flags:
            p.requires_grad_(False)
        weight.requires_grad_(True)
        if baseline is None:
            baseline = loss_and_accuracy(model, x_adv, y, batch_size)
        base_loss, base_acc = baseline
        best_loss, best_acc, best_pass, best_rel = base_loss, base_acc, 0, 0.0
        projected_at: int | None = None
        passes_run = 0
        for p_idx in range(1, passes + 1):
            for i in range(0, len(x_adv), batch_size):
                loss = F.cross_entropy(model(x_adv[i : i + batch_size]), y[i : i + batch_size])
                (grad,) = torch.autograd.grad(loss, weight)
                with torch.no_grad():
                    weight.add_(grad, alpha=lr)  # ascent on the robust loss
            passes_run = p_idx
            with torch.no_grad():
                delta = weight - w0
                dnorm = float(delta.norm())
                projected = dnorm > radius
                if projected:
                    weight.copy_(w0 + delta * (radius / dnorm))
                    if projected_at is None:
                        projected_at = p_idx
                rel = float((weight - w0).norm()) / max(w0_norm, 1e-30)
            loss_p, acc_p = loss_and_accuracy(model, x_adv, y, batch_size)
            if loss_p > best_loss:
                best_loss, best_acc, best_pass, best_rel = loss_p, acc_p, p_idx, rel
            if variant == "first-projection" and projected:
                break
        if best_rel > eps * (1 + _NORM_TOL) + 1e-12:
            raise EvaluationError(
                f"MRC of {name}: the maximiser has ‖ΔW‖/‖W‖ = {best_rel:.6g} > ε = {eps}; "
                "the projection failed"
            )
    finally:
        with torch.no_grad():
            weight.copy_(w0)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if not torch.equal(weight.detach(), w0):
        raise EvaluationError(f"weight of {name} was not restored exactly after MRC")
    return ModuleMRC(
        name=name,
        index=index,
        mrc=max(best_loss - base_loss, 0.0),
        baseline_loss=base_loss,
        max_loss=best_loss,
        baseline_acc=base_acc,
        acc_at_max=best_acc,
        acc_drop=base_acc - best_acc,
        rel_norm=best_rel,
        best_pass=best_pass,
        passes_run=passes_run,
        projected_at=projected_at,
        numel=weight.numel(),
    )


def compute_mrc(
    model: nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    *,
    modules: Sequence[str] | None = None,
    options: MRCOptions | None = None,
    progress: Callable[[str], None] | None = None,
    **settings: Any,
) -> MRCReport:
    """MRC of every Conv2d/Linear weight (or of ``modules``) on a fixed adversarial set.

    Args:
        model: classifier mapping [0,1] images to logits; evaluated in eval mode.
        x_adv: fixed adversarial images (N, C, H, W) in [0, 1]; y: labels (N,).
        modules: module names (default: :func:`weight_modules` in depth order).
        options: :class:`MRCOptions` (radius relative to each weight's L2 norm, passes, step
            size, mini-batch size, variant), or its fields as keywords (``eps=0.1, ...``).
        progress: called with each module name before it is processed (for progress bars).
    """
    opts = _options(options, settings)
    names = list(modules) if modules is not None else weight_modules(model)
    if not names:
        raise ConfigError("the model has no Conv2d/Linear weights to score")
    order = {n: i for i, n in enumerate(weight_modules(model, include_defences=True))}
    for n in names:
        get_weight(model, n)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        baseline = loss_and_accuracy(model, x_adv, y, opts.batch_size)
    finally:
        model.train(was_training)
    results = []
    for n in names:
        if progress is not None:
            progress(n)
        index = order.get(n, len(order))
        r = module_mrc(model, n, x_adv, y, options=opts, baseline=baseline, index=index)
        log.info("MRC %-28s %.4f (robust-acc drop %.2f pts)", n, r.mrc, r.acc_drop)
        results.append(r)
    results.sort(key=lambda m: m.index)
    return MRCReport(
        modules=results,
        eps=float(opts.eps),
        passes=opts.passes,
        lr=float(opts.lr),
        batch_size=opts.batch_size,
        variant=opts.variant,
        n_points=len(x_adv),
        baseline_loss=baseline[0],
        baseline_acc=baseline[1],
        seconds=time.perf_counter() - start,
    )

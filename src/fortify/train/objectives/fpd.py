"""FPD's two-phase training (Li et al., CVPR 2020) as the ``fpd`` objective.

Per mini-batch, with x_noisy = clamp(x + U(−δ, δ), 0, 1) and one forward pass giving the
restored image x′ and the bounded output ŷ:

- **phase 1** (``L2 = MSE(x′, x) > T``): one optimiser step on L2 alone, updating only the
  phase-1 parameter set (``train.options.phase1_params``; see
  :meth:`fortify.defenses.fpd.FPD.phase1_parameters`). Every other parameter gets no gradient
  and is skipped by the optimiser (no momentum or weight-decay drift either).
- **phase 2** (``L2 ≤ T``): one step on ``CE(ŷ, y) + L2`` over every trainable parameter, then
  a second step on the restored image: x′ is recomputed by a fresh (no-grad) front pass with the
  *updated* weights, clamped to [0, 1] and fed back in as a plain input:
  ``CE(ŷ₂, y) + w·MSE(x′₂, x)``.

Options (``train.options``): ``threshold`` (T, > 0, default 3.0 as the release), ``noise`` (δ in
pixel units, default 0.01), ``second_weight`` (w, default 1.0), ``second_step`` (default true),
``phase1_params`` ("front" | "decoder", default "front"), ``phase1_optimizer`` ("separate", the
release: phase 1 steps its own optimiser of the run's kind and learning rate over the phase-1
parameters, with its own moments and no LR schedule; "shared": the run's optimiser),
``clamp`` (default false, the release: x_noisy and the fed-back x′ are not clipped; true clips
both to [0, 1]), ``warn_after_epochs`` (default 5: warn once if no step has reached phase 2 by
then). Metrics: ``fpd_phase2`` (1 if the step ran
phase 2; its epoch mean is the fraction of phase-2 steps), ``fpd_l2``, ``ce``, ``ce2``,
``fpd_l2_2``, ``loss``, ``acc``.
"""

from __future__ import annotations

import logging
import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from fortify.config.schema import TrainConfig
from fortify.defenses.contract import capture_aux
from fortify.defenses.fpd import FPD, find_fpd
from fortify.defenses.fpd_options import Phase1Params
from fortify.errors import ConfigError
from fortify.train.objectives.base import (
    Metrics,
    Objective,
    StepContext,
    accuracy,
    register_objective,
)

log = logging.getLogger(__name__)

_OPTIONS = {
    "threshold": 3.0,
    "noise": 0.01,
    "second_weight": 1.0,
    "second_step": True,
    "phase1_params": "front",
    "phase1_optimizer": "separate",
    "clamp": False,
    "warn_after_epochs": 5,
}


def _forward(model: nn.Module, fpd: FPD, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``x`` through ``model`` (possibly DDP-wrapped); return (bounded logits, x′)."""
    with capture_aux(model):
        bounded = model(x)
    restored = fpd.aux.recorded["restored"]
    fpd.aux.release()  # records live until used; drop them so no graph outlives the step
    return bounded, restored


@register_objective("fpd")
class FPDTwoPhase(Objective):
    """The FPD two-phase objective; it owns the whole optimisation step (see module doc)."""

    adversarial = False
    ddp_find_unused_parameters = True  # phase-1 steps leave the classifier without gradient

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        opts = dict(cfg.options)
        unknown = sorted(set(opts) - set(_OPTIONS))
        if unknown:
            raise ConfigError(
                f"unknown train.options {unknown} for objective 'fpd'; allowed: {sorted(_OPTIONS)}"
            )
        merged = {**_OPTIONS, **opts}
        self.threshold = _positive(merged["threshold"], "threshold", strict=True)
        self.noise = _positive(merged["noise"], "noise", strict=False)
        self.second_weight = _positive(merged["second_weight"], "second_weight", strict=False)
        self.second_step = _flag(merged["second_step"], "second_step")
        self.phase1_params = cast(Phase1Params, str(merged["phase1_params"]))
        if self.phase1_params not in ("front", "decoder"):
            raise ConfigError(
                f"train.options.phase1_params={self.phase1_params!r} is not allowed; "
                "choose 'front' (decoder + backbone feature extractor) or 'decoder'"
            )
        self.phase1_optimizer = str(merged["phase1_optimizer"])
        if self.phase1_optimizer not in ("separate", "shared"):
            raise ConfigError(
                f"train.options.phase1_optimizer={self.phase1_optimizer!r} is not allowed; choose "
                "'separate' (the release: phase 1 has its own optimiser) or 'shared'"
            )
        self.clamp = _flag(merged["clamp"], "clamp")
        self._phase1_opt: torch.optim.Optimizer | None = None
        warn_after = merged["warn_after_epochs"]
        if isinstance(warn_after, bool) or not isinstance(warn_after, int) or warn_after < 0:
            raise ConfigError(
                "train.options.warn_after_epochs must be an integer >= 0 (0: never warn), got "
                f"{warn_after!r}"
            )
        self.warn_after_epochs = warn_after
        self.phase2_steps = 0
        self.min_l2 = math.inf
        self._warned = False

    def _noisy(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.noise == 0:
            return x
        gen = ctx.generator
        dev = gen.device if gen is not None else x.device
        u = torch.rand(x.shape, generator=gen, device=dev, dtype=x.dtype).to(x.device)
        noisy = x + (2 * u - 1) * self.noise
        return noisy.clamp_(0.0, 1.0) if self.clamp else noisy

    def _phase1_optimizer(self, subset: list[nn.Parameter]) -> torch.optim.Optimizer | None:
        """The phase-1 optimiser (built on first use, over ``subset``); None when shared."""
        if self.phase1_optimizer == "shared":
            return None
        if self._phase1_opt is None:
            from fortify.train.optim import build_optimizer

            self._phase1_opt = build_optimizer(subset, self.cfg)
        return self._phase1_opt

    def _maybe_warn(self, ctx: StepContext) -> None:
        if (
            not self._warned
            and self.phase2_steps == 0
            and self.warn_after_epochs > 0
            and ctx.epoch >= self.warn_after_epochs
        ):
            self._warned = True
            log.warning(
                "FPD phase 2 never started in %d epochs: the restoration loss (lowest %.4g) "
                "never fell to the threshold T=%.4g, so the classifier is not being trained. "
                "Raise train.options.threshold or check the decoder.",
                ctx.epoch,
                self.min_l2,
                self.threshold,
            )

    def train_step(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext
    ) -> Metrics:
        """One FPD step (phase 1: one update; phase 2: two updates). Returns scalar metrics."""
        self._maybe_warn(ctx)
        fpd = find_fpd(ctx.module)
        x_noisy = self._noisy(x, ctx)
        with ctx.autocast():
            bounded, restored = _forward(model, fpd, x_noisy)
            l2 = F.mse_loss(restored.float(), x.float())
        l2_value = _mean_over_processes(l2.detach())
        self.min_l2 = min(self.min_l2, l2_value)

        if l2_value > self.threshold:
            trainable = {id(p) for p in ctx.params}
            subset = [p for p in fpd.phase1_parameters(self.phase1_params) if id(p) in trainable]
            loss1 = l2
            if ctx.world_size > 1:
                # DDP's reducer waits for a gradient of every parameter; the classifier has no
                # path to L2, so give it an exact zero one (ctx.step then skips it).
                loss1 = l2 + 0.0 * bounded.float().sum()
            ctx.step(loss1, params=subset, optimizer=self._phase1_optimizer(subset))
            return {
                "fpd_phase2": 0.0,
                "fpd_l2": l2.detach(),
                "loss": l2.detach(),
                "acc": accuracy(bounded, y),
            }

        self.phase2_steps += 1
        ce = F.cross_entropy(bounded.float(), y)
        loss = ce + l2
        ctx.step(loss)
        metrics: Metrics = {
            "fpd_phase2": 1.0,
            "fpd_l2": l2.detach(),
            "ce": ce.detach(),
            "loss": loss.detach(),
            "acc": accuracy(bounded, y),
        }
        if not self.second_step:
            return metrics
        # Second step: a fresh front pass with the updated weights; x′ is an input (detached).
        with torch.no_grad(), ctx.autocast():
            x_restored = fpd.restore(x_noisy).float()
            if self.clamp:
                x_restored = x_restored.clamp_(0.0, 1.0)
        with ctx.autocast():
            bounded2, restored2 = _forward(model, fpd, x_restored)
            ce2 = F.cross_entropy(bounded2.float(), y)
            l2_2 = F.mse_loss(restored2.float(), x.float())
            loss2 = ce2 + self.second_weight * l2_2
        ctx.step(loss2)
        metrics.update(ce2=ce2.detach(), fpd_l2_2=l2_2.detach(), loss2=loss2.detach())
        return metrics


def _mean_over_processes(value: torch.Tensor) -> float:
    """``value`` averaged over every process of a distributed run (itself otherwise).

    The phase decision must be the same on every rank: a rank taking one optimiser step while
    another takes two would pair DDP's gradient all-reduces across different steps.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        v = value.float().clone()
        dist.all_reduce(v)
        return float(v) / dist.get_world_size()
    return float(value)


def _positive(value: object, name: str, *, strict: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    v = float(value) if ok else math.nan  # type: ignore[arg-type]
    if not math.isfinite(v) or (v <= 0 if strict else v < 0):
        bound = "> 0" if strict else ">= 0"
        raise ConfigError(f"train.options.{name} must be a finite number {bound}, got {value!r}")
    return v


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"train.options.{name} must be true or false, got {value!r}")
    return value

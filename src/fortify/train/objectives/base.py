"""The objective interface shared by every training method, and its registry.

An :class:`Objective` turns one batch into a loss (:meth:`Objective.loss`) or, if it needs more
control, performs the whole optimisation step itself (:meth:`Objective.train_step`). Everything
an objective needs from the loop (optimiser, precision, the inner attack, the step counter, the
RNG for random starts, distributed facts) comes in a :class:`StepContext`. See
``docs/training.md`` for the contract.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fortify.config.schema import TrainConfig
from fortify.defenses.contract import AuxContext, capture_aux, provide_labels
from fortify.errors import ConfigError, FortifyError
from fortify.registry import Registry

Metrics = dict[str, torch.Tensor | float]
Scored = tuple[torch.Tensor, Metrics]  # an objective's (loss, metrics)


class AdvBatch(NamedTuple):
    """One batch for :meth:`Objective.compute`: clean images ``x`` (N, C, H, W) in [0, 1] pixel
    units, labels ``y`` (N,) and the inner maximisation's ``x_adv`` (shape of ``x``; ``x``
    itself for non-adversarial objectives)."""

    x: torch.Tensor
    y: torch.Tensor
    x_adv: torch.Tensor


class NonFiniteLossError(FortifyError, RuntimeError):
    """Training diverged: the loss (or the model's outputs or weights) became NaN or infinite;
    training stops, checkpoints stay as they were.

    ``what`` is the finding without context (e.g. ``"the training loss is nan"``), for a caller
    that words the message itself (:func:`fortify.train.fit` adds the epoch, step and advice).
    """

    def __init__(self, message: str, what: str | None = None) -> None:
        super().__init__(message)
        self.what = what


def set_train_mode(model: nn.Module, freeze_bn: bool = False) -> None:
    """Put ``model`` in training mode; with ``freeze_bn`` BatchNorm layers stay in eval mode."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


@dataclass
class StepContext:
    """What the loop hands an objective for each step.

    Attributes:
        cfg: the ``train`` section of the experiment config.
        optimizer: the optimiser over the trainable parameters.
        device: where the batch lives.
        params: the trainable parameters (``requires_grad``), in optimiser order.
        module: the model without any DistributedDataParallel wrapper. Attacks craft examples on
            it (no gradient synchronisation needed for input gradients).
        scaler: a ``GradScaler`` for fp16, else None.
        generator: RNG for attack random starts (seeded per epoch and rank by the loop).
        epoch: 0-based epoch.
        global_step: batches processed so far in the run (0-based; advanced by the loop after
            each :meth:`Objective.train_step`).
        rank, world_size: distributed facts (1 process: 0, 1).
        extra: free-form per-run state an objective may keep (e.g. a phase flag).
    """

    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    device: torch.device
    params: list[nn.Parameter]
    module: nn.Module
    scaler: torch.amp.GradScaler | None = None
    generator: torch.Generator | None = None
    epoch: int = 0
    global_step: int = 0
    rank: int = 0
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict[str, Any])

    # -- precision -------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of ``train.precision`` (a no-op for fp32)."""
        precision = self.cfg.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # -- model modes -----------------------------------------------------------------------
    def train_mode(self, model: nn.Module) -> None:
        """Training mode for the update passes (honours ``train.freeze_bn``)."""
        set_train_mode(model, self.cfg.freeze_bn)

    @contextlib.contextmanager
    def crafting(self, model: nn.Module) -> Iterator[nn.Module]:
        """Switch to the mode of ``train.attack.bn_mode`` while crafting; restore on exit."""
        if self.cfg.attack.bn_mode == "eval":
            model.eval()
        else:
            self.train_mode(model)
        try:
            yield model
        finally:
            self.train_mode(model)

    # -- the inner attack ------------------------------------------------------------------
    def attack(
        self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None
    ) -> torch.Tensor:
        """Adversarial examples for ``(x, y)`` from ``train.attack`` (PGD or FGSM-RS), detached."""
        from fortify.attacks import pgd

        a = self.cfg.attack
        net = self.module if model is None else model
        steps = 1 if a.kind == "fgsm-rs" else a.steps
        random_start = True if a.kind == "fgsm-rs" else a.random_start
        with self.crafting(net), self.autocast():
            x_adv = pgd(
                net,
                x,
                y,
                eps=a.eps,
                steps=steps,
                step_size=a.step_size,
                random_start=random_start,
                generator=self.generator,
            )
        return x_adv.detach()

    def gaussian_ascent(
        self,
        x: torch.Tensor,
        sigma: float,
        make_loss: Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]],
    ) -> torch.Tensor:
        """The TRADES / MART releases' inner attack, detached: signed-gradient ascent of
        ``make_loss(net)(x_adv)`` (a scalar; ``make_loss`` runs in crafting mode, so it may
        precompute clean outputs) from ``x + sigma·N(0, I)`` with ``train.attack``'s ε, step
        size and steps (one step for ``fgsm-rs``), on the unwrapped model under autocast."""
        a, net = self.cfg.attack, self.module
        with self.crafting(net), self.autocast():
            return signed_ascent(
                make_loss(net),
                x,
                gaussian_start(x, sigma, self.generator),
                eps=a.eps,
                step_size=a.step_size,
                steps=1 if a.kind == "fgsm-rs" else a.steps,
            )

    # -- the update ------------------------------------------------------------------------
    def check_finite(self, loss: torch.Tensor) -> None:
        """Raise :class:`NonFiniteLossError` if ``loss`` is NaN/Inf on any rank."""
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            value = float(loss.detach().float().mean())
            what = (
                f"the training loss is {value}"
                if not math.isfinite(value)
                else "the training loss is NaN/Inf on another process"
            )
            raise NonFiniteLossError(
                f"training diverged: {what} at epoch {self.epoch + 1}, step {self.global_step}; "
                "stopping (the last good checkpoint is kept). Try a lower train.lr, "
                "train.grad_clip, or train.precision=fp32.",
                what,
            )

    def step(
        self,
        loss: torch.Tensor,
        params: Iterable[nn.Parameter] | None = None,
        *,
        zero_grad: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Backward ``loss`` and take one optimiser step.

        Args:
            loss: scalar loss (checked for NaN/Inf first).
            params: update only these parameters (others get no gradient and are skipped by
                the optimiser this step); None = all trainable parameters.
            zero_grad: clear gradients first (False to accumulate into existing ones).
            optimizer: step this optimiser instead of the run's (e.g. an objective's own
                optimiser over ``params``; the LR schedule only drives the run's).
        """
        opt = self.optimizer if optimizer is None else optimizer
        self.check_finite(loss)
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
            if opt is not self.optimizer:
                opt.zero_grad(set_to_none=True)
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        subset = None if params is None else list(params)
        if subset is None or self.world_size > 1:
            scaled.backward()  # type: ignore[no-untyped-call]  # DDP's reducer needs all grads
        else:
            scaled.backward(inputs=subset)  # type: ignore[no-untyped-call]
        if subset is not None and self.world_size > 1:
            keep = {id(p) for p in subset}
            for p in self.params:
                if id(p) not in keep:
                    p.grad = None
        clip_params = self.params if subset is None else subset
        if self.cfg.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(clip_params, self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()


def forward_aux(
    model: nn.Module,
    inputs: torch.Tensor,
    y: torch.Tensor,
    x_clean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward ``inputs`` while capturing auxiliary losses of attached defences.

    Returns ``(logits, terms)``; ``terms`` is empty for models without loss providers. The
    labels ``y`` are visible to label-reading defences (CAS, CIFS) during this forward pass.
    """
    with capture_aux(model, labels=y) as cap:
        logits = model(inputs)
        terms: dict[str, torch.Tensor] = {}
        if cap.providers:
            terms = cap.losses(AuxContext(y=y, logits=logits, x=inputs, x_clean=x_clean))
    return logits, terms


def forward_labelled(model: nn.Module, inputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``model(inputs)`` with the labels ``y`` visible to label-reading defences (CAS, CIFS),
    for training passes outside :func:`forward_aux` (e.g. TRADES's and MART's clean pass)."""
    with provide_labels(model, y):
        return model(inputs)


def clean_and_adv(
    model: nn.Module, b: AdvBatch
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(logits_clean, logits_adv, terms)``: the clean pass (labels visible to label-reading
    defences), then the adversarial pass with the defences' auxiliary terms (TRADES, MART)."""
    logits_clean = forward_labelled(model, b.x, b.y)
    logits_adv, terms = forward_aux(model, b.x_adv, b.y, x_clean=b.x)
    return logits_clean, logits_adv, terms


def with_aux(
    loss: torch.Tensor, terms: dict[str, torch.Tensor], metrics: Metrics
) -> tuple[torch.Tensor, Metrics]:
    """Add auxiliary ``terms`` to ``loss``; record each term and the total in ``metrics``."""
    for name, value in terms.items():
        loss = loss + value
        metrics[name] = value.detach().float()
    metrics["loss"] = loss.detach().float()
    return loss, metrics


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of correct top-1 predictions (a detached scalar tensor)."""
    return (logits.detach().argmax(1) == y).float().mean()


def kl_clean_adv(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p(x) ‖ p(x_adv)) of softmax distributions, shape (N,)."""
    log_p = F.log_softmax(logits_clean.float(), dim=1)
    return (log_p.exp() * (log_p - F.log_softmax(logits_adv.float(), dim=1))).sum(1)


def check_start_sigma(value: object, option: str) -> float:
    """``train.options.<option>``, the σ of a Gaussian start in pixel units, as a float; a
    :class:`ConfigError` unless it is a finite number >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(
            f"train.options.{option} (σ of the Gaussian start, pixel units) must be a finite "
            f"number >= 0, got {value!r}"
        )
    return float(value)


def gaussian_start(
    x: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``clamp(x + sigma·N(0, I), 0, 1)``: the small Gaussian start of the TRADES / MART releases.

    The noise is drawn on the generator's device (``x``'s without one) and moved to ``x``.
    """
    dev = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
    return (x + sigma * noise).clamp(0.0, 1.0)


def signed_ascent(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    x_start: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
) -> torch.Tensor:
    """L∞ signed-gradient ascent of ``loss_fn(x_adv)`` (a scalar) from ``x_start``.

    Each step: ``x_adv += step_size · sign(∇ loss)``, then projection onto the ε-ball around
    ``x`` and [0, 1] (pixel units). Gradients are taken w.r.t. the input only. Returns the last
    iterate, detached.
    """
    x_adv = x_start.detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x_adv), x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()


class Objective:
    """Base class: override :meth:`compute` (and :meth:`perturb` if the inner attack differs).

    Class attributes:
        name: registry name.
        adversarial: whether :meth:`loss` crafts adversarial examples (False: ``x_adv = x``).
        ddp_find_unused_parameters: set True if some steps leave parameters without gradient
            (e.g. partial updates under DistributedDataParallel).
    """

    name: str = "base"
    adversarial: bool = True
    ddp_find_unused_parameters: bool = False
    # ``train.options`` this objective reads, with defaults; None: not declared (the objective
    # checks them itself). Declared options are checked on construction: an unknown name is a
    # ConfigError instead of being silently ignored.
    options: dict[str, object] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        compute = cls.__dict__.get("compute")
        if compute is not None:
            params = list(inspect.signature(compute).parameters)
            if len(params) == 6:  # the former (self, model, x, y, x_adv, ctx)
                raise TypeError(
                    f"{cls.__name__}.compute{inspect.signature(compute)} must take "
                    "(self, model, b, ctx) with b = AdvBatch(x, y, x_adv) — the signature "
                    "changed from compute(self, model, x, y, x_adv, ctx)"
                )

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if self.options is not None:
            unknown = sorted(set(cfg.options) - set(self.options))
            if unknown:
                allowed = ", ".join(f"{k} (default {v!r})" for k, v in self.options.items())
                raise ConfigError(
                    f"unknown train.options {unknown} for objective {self.name!r}; "
                    f"allowed: {allowed or 'none'}"
                )

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        """The inner maximisation; by default ``train.attack`` on the unwrapped model."""
        return ctx.attack(x, y)

    def compute(self, model: nn.Module, b: AdvBatch, ctx: StepContext) -> Scored:
        """The outer loss on a batch and its adversarial examples ``b.x_adv``: ``(loss,
        metrics)``."""
        raise NotImplementedError

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, Metrics]:
        """Craft ``x_adv`` (if adversarial) and return :meth:`compute`'s ``(loss, metrics)``."""
        x_adv = self.perturb(model, x, y, ctx) if self.adversarial else x
        return self.compute(model, AdvBatch(x, y, x_adv), ctx)

    def train_step(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext
    ) -> Metrics:
        """One optimisation step on a batch; returns metrics (scalars) to average per epoch.

        The model is in training mode on entry. The default computes :meth:`loss` under the
        precision's autocast and calls :meth:`StepContext.step`. Override to take several
        steps, update parameter subsets or run extra forward passes.
        """
        with ctx.autocast():
            loss, metrics = self.loss(model, x, y, ctx)
        ctx.step(loss)
        return metrics


ObjectiveFactory = Callable[[TrainConfig], Objective]
#: Every objective; the modules of :mod:`fortify.train.objectives` register at import.
OBJECTIVES: Registry[ObjectiveFactory] = Registry("objective")


def register_objective(name: str) -> Callable[[ObjectiveFactory], ObjectiveFactory]:
    """Class decorator registering an :class:`Objective` subclass (or factory) as ``name``."""

    def deco(factory: ObjectiveFactory) -> ObjectiveFactory:
        OBJECTIVES.register(name, factory)
        if isinstance(factory, type) and issubclass(factory, Objective):
            factory.name = name
        return factory

    return deco


def available_objectives() -> list[str]:
    """Names of every registered objective."""
    return OBJECTIVES.available()


def get_objective(name: str, cfg: TrainConfig | None = None) -> Objective:
    """Instantiate objective ``name`` for ``cfg`` (default TrainConfig); unknown names raise."""
    return OBJECTIVES.get(name)(cfg if cfg is not None else TrainConfig())

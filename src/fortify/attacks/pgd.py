"""FGSM and PGD (L∞ / L2; CE, C&W margin, DLR), functional API.

All budgets (``eps``, ``step_size``) are in [0, 1] pixel units. Attacks never change the
model's train/eval mode and never touch parameters' ``.grad``: gradients are taken with
``torch.autograd.grad`` w.r.t. the input only (a model in train mode stays in train mode, so
its BatchNorm running statistics are updated by the attack's forward passes; ``evaluate`` runs in
eval mode). They do not enter or leave autocast and keep the input's memory format
(channels-last stays channels-last).

Every example evaluated or returned lies in the ε-ball exactly: ``|x_adv − x| <= eps`` (L∞) or
``‖x_adv − x‖₂ <= eps`` (L2) without tolerance, computed in the images' dtype or in float64 (a
pixel that ``x + eps`` rounded to one unit in the last place outside is set to the nearest value
inside); apart from such pixels the arithmetic is torchattacks' (docs/evaluation.md, "Attacks").

Two semantics for iterative attacks:

- ``mode="final"``: the adversarial example is the last iterate (training-style; costs exactly
  ``steps`` forward+backward passes, plus one forward when success masks are requested).
- ``mode="best"``: a point counts as broken as soon as any iterate fools the model; the iterate
  whose logits were seen to fool is returned and the point leaves the batch, so later steps run
  on fewer points.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic

import torch
from torch import nn

from fortify.attacks.inputs import Opts, check_logit_values, first_forward, prepared
from fortify.attacks.losses import attack_loss
from fortify.attacks.options import FGSMOptions, PGDOptions, check_flag
from fortify.errors import ConfigError, DataError, EvaluationError

log = logging.getLogger(__name__)

_TINY = 1e-12


@dataclass
class AttackResult:
    """Outcome of an attack on a batch.

    Attributes:
        x_adv: adversarial examples (N, C, H, W), detached; the last iterate in ``final`` mode,
            the verified fooling iterate (or last iterate if none fooled) in ``best`` mode.
        success: bool (N,), True where ``x_adv`` was seen to fool the model (misclassified, or
            classified as the target when targeted).
        x_best: in ``mode="both"``: per point the first iterate seen to fool (else the last).
        success_best: in ``mode="both"``: bool (N,), True where any iterate fooled the model
            (always a superset of ``success``).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    x_best: torch.Tensor | None = None
    success_best: torch.Tensor | None = None


#: An attack's core: (model, x, y, target, validated options, need_success, largest label).
_Core = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None", Opts, bool, int], "AttackResult"
]


def _logits(
    model: nn.Module, x: torch.Tensor, max_label: int = -1, first: bool = False
) -> torch.Tensor:
    """``model(x)`` checked to be logits (N, K); on the ``first`` pass of an attack model errors
    are explained (:func:`~fortify.attacks.inputs.first_forward`) and the logits must be float,
    finite, on ``x``'s device and of K >= 2 classes (one cheap check per attack, not per step)."""
    out = first_forward(model, x) if first else model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise EvaluationError(
            f"the model returned {got}, attacks need a tensor of logits ({x.shape[0]}, K); "
            "wrap the model so that forward(x) returns logits only"
        )
    if first:
        check_logit_values(out, x.device)
    if max_label >= out.shape[1]:
        raise DataError(
            f"labels must be class indices in [0, K) = [0, {out.shape[1]}) for this model's "
            f"{out.shape[1]} logits, got {max_label}"
        )
    return out


def _fooled(
    logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, targeted: bool
) -> torch.Tensor:
    pred = logits.argmax(dim=1)
    if targeted and target is not None:
        return pred == target
    return pred != y


def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    """L2 norm per sample, shaped (N, 1, 1, ...) for broadcasting."""
    return v.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (v.dim() - 1)))


def _budget(eps: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` not above ``eps``."""
    e = torch.tensor(eps, dtype=torch.float64).to(dtype)
    while float(e) > eps:
        e = torch.nextafter(e, torch.zeros_like(e))
    return float(e)


_Box = tuple[torch.Tensor, torch.Tensor]


def _float64_device(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or a CPU copy on a device without float64 (Apple MPS)."""
    return x.cpu() if x.device.type == "mps" else x


def _linf_box(x: torch.Tensor, eps: float) -> _Box:
    """Per pixel, the bounds ``(lo, hi)`` in [0, 1] of the L∞ ball around ``x``, exactly: the
    values ``v`` of ``x``'s dtype with ``|v − x| <= e`` in float64, ``e`` the largest value of
    the dtype not above ``eps``. So ``|v − x|`` passes ``<= eps`` however it is computed (in
    ``x``'s dtype or in float64) and compared (in the dtype or as a Python float); ``x ± eps``
    rounded to the nearest pixel value can lie one unit in the last place outside. Computed
    once per attack call (on the CPU for a device without float64)."""
    xs = _float64_device(x)
    lim = _budget(eps, x.dtype)
    xw = xs.double()
    hi, lo = xs + lim, xs - lim
    while True:  # a bound rounded outwards steps back once; a bound at x would be inside
        up, down = hi.double() - xw > lim, xw - lo.double() > lim
        if not bool(up.any() or down.any()):
            return lo.clamp_(min=0.0).to(x.device), hi.clamp_(max=1.0).to(x.device)
        hi = torch.where(up, torch.nextafter(hi, xs), hi)
        lo = torch.where(down, torch.nextafter(lo, xs), lo)


def _l2_radius(eps: float, x: torch.Tensor) -> float | None:
    """The radius a float32/float64 L2 projection scales to so that the rounded pixels stay in
    the ε-ball without a check: ``eps`` less the rounding of the norm (relative, ≤ (log₂ d + 8)
    units) and of the d pixel sums ``x + δ`` (absolute, ≤ √d units; pixels ≤ 1), both doubled
    (≈ 1e-5 of ε for 3×32×32 float32 images). None for half precisions: their unit is too
    coarse, :func:`_fit_l2_` checks those after every projection."""
    if x.dtype not in (torch.float32, torch.float64):
        return None
    u = torch.finfo(x.dtype).eps / 2
    d = max(1, x[0].numel()) if len(x) else 1
    return eps * (1.0 - 2 * (math.log2(d) + 8) * u) - 2 * math.sqrt(d) * u


def _fit_l2_(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Shrink in place towards ``x`` the points whose L2 distance to ``x``, computed in ``x``'s
    dtype or in float64, exceeds ``eps`` by rounding (the pixels are rounded after the
    projection scales the perturbation); they end a few units in the last place inside."""
    if x_adv.device.type == "mps":  # no float64 there: fit a CPU copy, write it back
        return x_adv.copy_(_fit_l2_(x_adv.cpu(), x.cpu(), eps))
    tiny = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    cap = eps * (1.0 - 8 * tiny)
    for k in range(64):  # the factor reaches 0 (x_adv = x) long before the last round
        delta = x_adv.double() - x.double()
        dist = _per_sample_norm(delta).flatten()
        over = (dist > cap) | (_per_sample_norm(x_adv - x).flatten().double() > cap)
        if not bool(over.any()):
            break
        scale = cap / dist[over] * max(0.0, 1.0 - 8 * tiny * 2**k)
        fitted = x[over].double() + delta[over] * scale.view(-1, *([1] * (x.dim() - 1)))
        x_adv[over] = fitted.to(x.dtype).clamp_(0.0, 1.0)
    return x_adv


def _project_(
    x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, box: _Box | None
) -> torch.Tensor:
    """Project ``x_adv`` in place onto the ε-ball around ``x`` intersected with [0, 1]
    (``box``: :func:`_linf_box` of ``x``, for L∞)."""
    delta = x_adv.sub_(x)  # x_adv now holds the perturbation
    if norm == "linf":
        assert box is not None
        return delta.clamp_(-eps, eps).add_(x).clamp_(min=box[0], max=box[1])
    radius = _l2_radius(eps, x)
    delta.mul_(torch.clamp((radius or eps) / (_per_sample_norm(delta) + _TINY), max=1.0))
    x_adv = delta.add_(x).clamp_(0.0, 1.0)
    return x_adv if radius is not None else _fit_l2_(x_adv, x, eps)  # no sync per step


def _random_start(
    x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None, box: _Box | None
) -> torch.Tensor:
    gen_device = generator.device if generator is not None else x.device
    if norm == "linf":
        noise = torch.empty(x.shape, device=gen_device, dtype=x.dtype).uniform_(
            -eps, eps, generator=generator
        )
    else:
        noise = torch.randn(x.shape, device=gen_device, dtype=x.dtype, generator=generator)
        radius = torch.rand(
            (x.shape[0],) + (1,) * (x.dim() - 1),
            device=gen_device,
            dtype=x.dtype,
            generator=generator,
        )
        noise = noise / (_per_sample_norm(noise) + _TINY) * radius * eps
    noise = noise.to(x.device)
    x_adv = torch.empty_like(x).copy_(x).add_(noise)
    if box is not None:
        return x_adv.clamp_(min=box[0], max=box[1])
    return _fit_l2_(x_adv.clamp_(0.0, 1.0), x, eps)


def _grad_step_(x_adv: torch.Tensor, grad: torch.Tensor, step: float, norm: str) -> None:
    if norm == "linf":
        x_adv.add_(grad.sign_(), alpha=step)
    else:
        x_adv.add_(grad.div_(_per_sample_norm(grad) + _TINY), alpha=step)


def _input_grad(
    model: nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    loss: str,
    targeted: bool,
    kappa: float,
    max_label: int = -1,
    first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward + backward: (logits detached, d loss / d x_adv); ``first``: the attack's
    first pass (see :func:`_logits`).

    The gradient is always a tensor the caller may change in place: a model whose output does
    not depend on its input (fully detached) gives zeros, and an expanded (stride-0) gradient,
    as ``model(x).detach() + 0 * x.sum()`` produces, is copied first.
    """
    with torch.enable_grad():
        xa = x_adv.detach().requires_grad_(True)
        logits = _logits(model, xa, max_label, first)
        obj = attack_loss(logits, y, target, loss=loss, targeted=targeted, kappa=kappa).sum()
        grad = None
        if obj.requires_grad:
            (grad,) = torch.autograd.grad(obj, xa, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(xa)
    elif 0 in grad.stride() and grad.numel() > 1:
        grad = grad.clone(memory_format=torch.contiguous_format)
    return logits.detach(), grad


def _pgd_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    opts: PGDOptions,
    need_success: bool,
    max_label: int,
) -> AttackResult:
    """One restart of PGD on all of ``x`` (``opts`` validated, ``step_size`` resolved)."""
    eps, steps, norm, loss = float(opts.eps), opts.steps, opts.norm, opts.loss
    step_size, targeted, kappa = opts.resolved_step_size(), opts.targeted, float(opts.kappa)
    mode, generator = opts.mode, opts.generator
    x = x.detach()
    box = _linf_box(x, eps) if norm == "linf" else None
    x_adv = (
        _random_start(x, eps, norm, generator, box)
        if opts.random_start
        else torch.empty_like(x).copy_(x)
    )

    if mode == "best":
        # Active points shrink as they are broken; results are written back by index.
        out = x_adv.clone()
        success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        idx = torch.arange(len(x), device=x.device)
        xa_x, xa_y, xa_t = x, y, target
        for i in range(steps):
            logits, grad = _input_grad(
                model, x_adv, xa_y, xa_t, loss, targeted, kappa, max_label, i == 0
            )
            fooled = _fooled(logits, xa_y, xa_t, targeted)
            if bool(fooled.any()):
                out[idx[fooled]] = x_adv[fooled]  # the iterate whose logits we just saw fool
                success[idx[fooled]] = True
                keep = ~fooled
                idx, x_adv, grad, xa_x, xa_y = (
                    idx[keep],
                    x_adv[keep],
                    grad[keep],
                    xa_x[keep],
                    xa_y[keep],
                )
                xa_t = xa_t[keep] if xa_t is not None else None
                box = (box[0][keep], box[1][keep]) if box is not None else None
                if len(idx) == 0:
                    return AttackResult(out, success)
            _grad_step_(x_adv, grad, step_size, norm)
            _project_(x_adv, xa_x, eps, norm, box)
        # Verify the last iterate of the survivors (it was never evaluated).
        with torch.no_grad():
            fooled = _fooled(_logits(model, x_adv), xa_y, xa_t, targeted)
        out[idx] = x_adv
        success[idx] = fooled
        return AttackResult(out, success)

    track = mode == "both"
    if track:
        x_best = torch.empty_like(x)
        success_best = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for i in range(steps):
        logits, grad = _input_grad(
            model, x_adv, y, target, loss, targeted, kappa, max_label, i == 0
        )
        if track:
            new = _fooled(logits, y, target, targeted) & ~success_best
            if bool(new.any()):
                x_best[new] = x_adv[new]
                success_best |= new
        _grad_step_(x_adv, grad, step_size, norm)
        _project_(x_adv, x, eps, norm, box)
    if not need_success and not track:
        return AttackResult(x_adv, torch.zeros(len(x), dtype=torch.bool, device=x.device))
    with torch.no_grad():
        success = _fooled(_logits(model, x_adv), y, target, targeted)
    if not track:
        return AttackResult(x_adv, success)
    rest = ~success_best
    x_best[rest] = x_adv[rest]
    return AttackResult(x_adv, success, x_best, success_best | success)


class AttackFunction(Generic[Opts]):
    """The one calling convention of fortify's functional attacks (``pgd_attack``,
    ``fgsm_attack``): ``f(model, x, y, *, target=None, need_success=True, options=None,
    **settings) -> AttackResult``.

    A call builds the attack's options (``options`` with ``settings`` replacing its fields,
    validated), checks ``x`` (float (N, C, H, W) in [0, 1]), ``y`` and ``target`` (int64 (N,))
    and runs the attack's core on them.

    Args of a call:
        model: maps images in [0, 1] (N, C, H, W) to logits (N, K); its mode is left alone.
        x: float images in [0, 1], shape (N, C, H, W). y: int64 labels (N,).
        target: int64 target classes (N,) when ``targeted``.
        need_success: False skips the verifying forward where the attack can (``success`` is
            then all False); with ``restarts > 1`` (an option of PGD) later restarts attack
            only the points whose returned example does not fool yet.
        options, settings: the fields of the attack's options dataclass, e.g.
            ``pgd_attack(model, x, y, eps=8/255, steps=10, loss="cw")``.
    Returns: :class:`AttackResult` with detached tensors of the same shape as ``x``.
    """

    def __init__(self, name: str, options_cls: type[Opts], core: _Core[Opts], doc: str) -> None:
        self.__name__ = self.__qualname__ = name
        self.__module__ = __name__
        self.__doc__ = doc
        self.options_cls: type[Opts] = options_cls
        self._core: _Core[Opts] = core

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        need_success: bool = True,
        options: Opts | None = None,
        **settings: Any,
    ) -> AttackResult:
        check_flag(need_success, "need_success")
        opts, y, target, max_label = prepared(
            self.options_cls, model, options, settings, x, y, target
        )
        x = x.detach()
        restarts: int = getattr(opts, "restarts", 1)
        result = self._core(model, x, y, target, opts, need_success or restarts > 1, max_label)
        for _ in range(restarts - 1):
            # Later restarts attack the points whose *returned* example does not fool yet: in
            # mode "both" that is the final example, so the final row equals a mode="final" run
            # (a point fooled only at an intermediate iterate is attacked again for that row).
            todo = ~result.success
            if not bool(todo.any()):
                break
            t_sub = target[todo] if target is not None else None
            r = self._core(model, x[todo], y[todo], t_sub, opts, True, max_label)
            idx = todo.nonzero().squeeze(1)
            # Replace the example where this restart fooled (final) or, if not, keep the latest.
            result.x_adv[idx] = r.x_adv
            result.success[idx] = r.success
            if result.x_best is not None and r.x_best is not None and r.success_best is not None:
                assert result.success_best is not None
                fresh = ~result.success_best[idx]  # keep an iterate already seen to fool
                result.x_best[idx[fresh]] = r.x_best[fresh]
                result.success_best[idx] |= r.success_best
        return result

    def __reduce__(self) -> str:
        return self.__name__  # pickled by reference, like a function

    def __repr__(self) -> str:
        return f"<attack function {self.__name__}>"


class ExamplesOnly(Generic[Opts]):
    """An :class:`AttackFunction` that returns only ``x_adv`` (detached, same shape and memory
    format as ``x``) and skips the verifying forward: ``pgd(model, x, y, eps=..., steps=...)``.
    """

    def __init__(self, name: str, attack: AttackFunction[Opts], doc: str) -> None:
        self.__name__ = self.__qualname__ = name
        self.__module__ = __name__
        self.__doc__ = doc
        self.attack: AttackFunction[Opts] = attack

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """``kwargs``: ``target=`` (int64 (N,)), ``options=`` and the options' fields."""
        target, options = kwargs.pop("target", None), kwargs.pop("options", None)
        opts = self.attack.options_cls.build(options, **kwargs)
        if getattr(opts, "mode", "final") == "both":
            raise ConfigError(
                f"{self.__name__}() returns one set of examples; use mode='final' or 'best' (or "
                f"{self.attack.__name__} for 'both')"
            )
        return self.attack(model, x, y, target=target, need_success=False, options=opts).x_adv

    def __reduce__(self) -> str:
        return self.__name__  # pickled by reference, like a function

    def __repr__(self) -> str:
        return f"<attack function {self.__name__}>"


def _fgsm_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    opts: FGSMOptions,
    need_success: bool,
    max_label: int,
) -> AttackResult:
    targeted, kappa = opts.targeted, opts.kappa
    _, grad = _input_grad(model, x, y, target, opts.loss, targeted, kappa, max_label, True)
    lo, hi = _linf_box(x, float(opts.eps))
    x_adv = torch.empty_like(x).copy_(x)
    x_adv.add_(grad.sign_(), alpha=float(opts.eps)).clamp_(min=lo, max=hi)
    if not need_success:
        return AttackResult(x_adv, torch.zeros(len(x), dtype=torch.bool, device=x.device))
    with torch.no_grad():
        success = _fooled(_logits(model, x_adv), y, target, targeted)
    return AttackResult(x_adv, success)


pgd_attack: AttackFunction[PGDOptions] = AttackFunction(
    "pgd_attack",
    PGDOptions,
    _pgd_run,
    """PGD returning adversarial examples *and* per-sample success masks (for evaluators).

    ``pgd_attack(model, x, y, *, target=None, need_success=True, options=None, **settings)``;
    the settings are the fields of :class:`~fortify.attacks.options.PGDOptions` (``eps`` and
    ``steps`` required, pixel units): ``pgd_attack(model, x, y, eps=8/255, steps=10,
    loss="cw")``, or ``options=`` with keyword arguments replacing its fields. With
    ``restarts > 1`` later restarts attack only the points not fooled yet.
    ``need_success=False`` skips the verifying forward in final mode with one restart.
    Returns :class:`AttackResult` (see :class:`AttackFunction` for the calling convention).
    """,
)

pgd: ExamplesOnly[PGDOptions] = ExamplesOnly(
    "pgd",
    pgd_attack,
    """Projected gradient descent; returns ``x_adv`` (detached, same shape/format as ``x``).

    ``pgd(model, x, y, *, target=None, options=None, **settings)``: ``x`` is float
    (N, C, H, W) in [0, 1]; the settings are the fields of
    :class:`~fortify.attacks.options.PGDOptions` (``eps``, ``steps`` required; ``eps`` and
    ``step_size`` in pixel units, ``step_size`` defaulting to ``2.5 * eps / steps``). Each
    step: ascend the per-sample loss (sign step for L∞, per-sample normalised step for L2),
    then project onto the ε-ball and [0, 1]. ``mode="final"`` returns the last iterate and
    costs exactly ``steps`` forward+backward passes; ``mode="best"`` returns, for each point,
    the first iterate whose logits fooled the model (broken points leave the batch). See
    :func:`pgd_attack` for per-sample success masks.
    """,
)

fgsm_attack: AttackFunction[FGSMOptions] = AttackFunction(
    "fgsm_attack",
    FGSMOptions,
    _fgsm_run,
    """FGSM (L∞): ``clamp(x + eps * sign(∇ loss), 0, 1)`` with per-sample success mask.

    ``fgsm_attack(model, x, y, *, target=None, need_success=True, options=None,
    **settings)``; the settings are the fields of :class:`~fortify.attacks.options.FGSMOptions`
    (``eps`` required, pixel units); ``target`` (N,) when targeted; ``need_success=False`` skips
    the verifying forward (``success`` is then all False).
    """,
)

fgsm: ExamplesOnly[FGSMOptions] = ExamplesOnly(
    "fgsm",
    fgsm_attack,
    """Fast gradient sign method (L∞, one forward+backward); returns ``x_adv`` detached.

    ``fgsm(model, x, y, *, target=None, options=None, **settings)``: ``x`` float
    (N, C, H, W) in [0, 1]; the settings are the fields of
    :class:`~fortify.attacks.options.FGSMOptions` (``eps`` in pixel units). Untargeted it
    ascends the loss w.r.t. ``y``; targeted it descends towards ``target``.
    """,
)

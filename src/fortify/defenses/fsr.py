"""Feature Separation and Recalibration (FSR; Kim et al., CVPR 2023) as a plug-in block.

For an intermediate feature map ``f`` of shape (N, C, H, W) the block

1. computes a *robustness map* ``r = S(f)`` with the separation net ``S``
   (conv3x3 C→h, BN, ReLU, conv3x3 h→h, BN, ReLU, conv3x3 h→C; no biases; h = ``hidden``),
2. turns it into a soft mask ``m ∈ [0, 1]`` with a two-class Gumbel-softmax over
   {robust, non-robust} with probabilities σ(r), 1 − σ(r) and temperature τ. In training the
   Gumbel noise is sampled; in eval mode both noises are equal and ``m = sigmoid(r / τ)``,
3. splits ``f+ = m ⊙ f`` (robust) and ``f− = (1 − m) ⊙ f`` (non-robust),
4. recalibrates ``f̃− = f− + (1 − m) ⊙ R(f−)`` with the recalibration net ``R`` (same layout as S),
5. returns ``f+ + f̃−`` (same shape as ``f``).

A shared auxiliary head ``GAP → Linear(C → K)`` produces ``p+``, ``p−`` and ``p̃−``; it runs only
while :func:`fortify.defenses.contract.capture_aux` is active, so attacks and evaluation pay
nothing for it. The block implements the aux-loss contract and returns
``{"fsr_sep": λ_sep · L_sep, "fsr_rec": λ_rec · L_rec}`` with
``L_sep = CE(p+, y) + CE(p−, y')`` (``y'``: the final classifier's top-1 class if it is wrong,
else its top-2 class) and ``L_rec = CE(p̃−, y)``.

Use it with :func:`attach_fsr` or :func:`fortify.defenses.attach.attach`, or from a config
(``defenses: [{kind: fsr, at: [layer4], options: {...}}]``) through the registered builder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fortify.defenses.attach import attach, check_block_sizes
from fortify.defenses.contract import AuxContext, CaptureMixin
from fortify.defenses.registry import (
    check_choice,
    check_number,
    options_from_dict,
    register_block_defence,
)
from fortify.errors import ConfigError, FortifyError

log = logging.getLogger(__name__)

ABLATIONS = ("none", "no-separation", "no-recalibration")
MASKS = ("gumbel", "binary")
RELEASE_EPS = 1e-8  # the epsilon the authors' release adds inside every log and to τ

__all__ = [
    "ABLATIONS",
    "FSR",
    "FSRBlock",
    "FSROptions",
    "FSRParts",
    "MASKS",
    "RELEASE_EPS",
    "attach_fsr",
    "build",
    "fsr_blocks",
    "gumbel_mask",
    "wrong_labels",
]


def _conv_net(channels: int, hidden: int) -> nn.Sequential:
    """conv3x3 C→h, BN, ReLU, conv3x3 h→h, BN, ReLU, conv3x3 h→C (no biases).

    Indices 0, 1, 3, 4, 6 hold the parameters (the release's ``sep_net``/``rec_net`` layout).
    """
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, channels, 3, padding=1, bias=False),
    )


def _eps_value(eps_log: bool | float) -> float:
    if isinstance(eps_log, bool):
        return RELEASE_EPS if eps_log else 0.0
    if isinstance(eps_log, (int, float)) and 0.0 <= float(eps_log) < 1e-2:
        return float(eps_log)
    raise ConfigError(
        f"FSR option eps_log={eps_log!r} is not allowed; use false (exact numerics), "
        f"true (the release's {RELEASE_EPS:g}) or a small float in [0, 0.01)"
    )


@dataclass
class FSROptions:
    """Options of an FSR block (the release's values are the defaults); see :class:`FSRBlock`."""

    tau: float = 0.1
    lambda_sep: float = 1.0
    lambda_rec: float = 1.0
    hidden: int = 64
    ablation: str = "none"
    mask: str = "gumbel"
    eps_log: bool | float = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first option outside its allowed values."""
        check_number("FSR", "tau", self.tau, low=0, strict=True)
        check_number("FSR", "lambda_sep", self.lambda_sep, low=0)
        check_number("FSR", "lambda_rec", self.lambda_rec, low=0)
        hidden = self.hidden
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ConfigError(f"FSR option hidden must be a positive integer, got {hidden!r}")
        check_choice("FSR", "ablation", self.ablation, ABLATIONS)
        check_choice("FSR", "mask", self.mask, MASKS)
        _eps_value(self.eps_log)


def gumbel_mask(
    r: torch.Tensor,
    tau: float,
    *,
    sample: bool,
    eps: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Soft mask from a two-class Gumbel-softmax over probabilities (σ(r), 1 − σ(r)).

    ``m = exp((log σ(r) + g1)/τ) / (exp((log σ(r) + g1)/τ) + exp((log(1 − σ(r)) + g2)/τ))``,
    computed stably as ``sigmoid(((log σ(r) + g1) − (log(1 − σ(r)) + g2)) / τ)``.

    Args:
        r: robustness map, any shape.
        tau: temperature τ > 0.
        sample: draw ``g = −log(−log u)``, ``u ~ U(0, 1)`` independently for g1 and g2 (training);
            otherwise ``g1 = g2`` (the release sets ``u = 0.5``) and ``m = sigmoid(r / τ)``.
        eps: 0 for exact numerics; the release uses 1e-8 inside every log and added to τ.
        generator: optional RNG for the Gumbel noise.
    Returns:
        the mask, same shape as ``r``, values in [0, 1].
    """
    if eps > 0:
        p = torch.sigmoid(r)
        log_pos = torch.log(p + eps)
        log_neg = torch.log(1 - p + eps)
    else:
        log_pos = F.logsigmoid(r)
        log_neg = F.logsigmoid(-r)
    logit = log_pos - log_neg  # == r when eps == 0
    if sample:
        u = torch.rand((2, *r.shape), device=r.device, dtype=r.dtype, generator=generator)
        if eps > 0:
            g = -torch.log(-torch.log(u + eps) + eps)
        else:
            u = u.clamp_min(torch.finfo(u.dtype).tiny)
            g = -torch.log(-torch.log(u))
        logit = logit + (g[0] - g[1])
    return torch.sigmoid(logit / (tau + eps))


def wrong_labels(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The FSR "wrong label" y′: top-1 class of ``logits`` if it is wrong, else the top-2 class.

    Args:
        logits: (N, K) final-classifier logits (K ≥ 2).
        y: (N,) true labels.
    Returns:
        (N,) int64 labels, never equal to ``y`` (detached).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise FortifyError(
            f"wrong_labels needs logits of shape (N, K) with K >= 2, got {tuple(logits.shape)}"
        )
    top2 = logits.detach().topk(2, dim=1).indices
    return torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])


@dataclass
class FSRParts:
    """Every intermediate of one FSR forward pass; feature tensors are (N, C, H, W).

    Under the ablations: ``no-separation`` has ``r``/``mask`` = None, ``f_pos`` = 0 and
    ``f_neg`` = f; ``no-recalibration`` has ``f_neg_rec`` = None.
    """

    r: torch.Tensor | None
    mask: torch.Tensor | None
    f_pos: torch.Tensor
    f_neg: torch.Tensor
    f_neg_rec: torch.Tensor | None
    out: torch.Tensor


class FSRBlock(CaptureMixin, nn.Module):
    """One FSR block for feature maps with ``channels`` channels (see the module docstring).

    Args:
        channels: C of the feature map (N, C, H, W) the block receives and returns.
        num_classes: K, outputs of the shared auxiliary head.
        tau: Gumbel-softmax temperature τ > 0 (release: 0.1).
        lambda_sep: weight λ_sep of the separation loss (release: 1).
        lambda_rec: weight λ_rec of the recalibration loss (release: 1).
        hidden: width h of the hidden convs of S and R (release: 64).
        ablation: ``"none"`` (full FSR), ``"no-separation"`` (no S and no mask; output
            ``f + R(f)``, only L_rec on ``aux(GAP(f + R(f)))``) or ``"no-recalibration"`` (no R;
            output ``f+``, only L_sep).
        mask: ``"gumbel"`` (soft mask) or ``"binary"`` (hard 0/1 mask ``1[sample > 0.5]`` with a
            straight-through gradient through the soft mask in training; ``1[r > 0]`` in eval).
        eps_log: ``False`` for exact numerics, ``True`` for the release's 1e-8 epsilons inside
            the logs and added to τ (imported checkpoints reproduce the release's logits).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        *,
        tau: float = 0.1,
        lambda_sep: float = 1.0,
        lambda_rec: float = 1.0,
        hidden: int = 64,
        ablation: str = "none",
        mask: str = "gumbel",
        eps_log: bool | float = False,
    ):
        super().__init__()
        check_block_sizes("FSR", channels, num_classes)
        FSROptions(tau, lambda_sep, lambda_rec, hidden, ablation, mask, eps_log).validate()
        self.channels = channels
        self.num_classes = num_classes
        self.tau = float(tau)
        self.lambda_sep = float(lambda_sep)
        self.lambda_rec = float(lambda_rec)
        self.hidden = hidden
        self.ablation = ablation
        self.mask_kind = mask
        self.eps = _eps_value(eps_log)
        self.separation: nn.Sequential | None = (
            _conv_net(channels, hidden) if ablation != "no-separation" else None
        )
        self.recalibration: nn.Sequential | None = (
            _conv_net(channels, hidden) if ablation != "no-recalibration" else None
        )
        self.aux = nn.Linear(channels, num_classes)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_classes={self.num_classes}, tau={self.tau}, "
            f"hidden={self.hidden}, ablation={self.ablation!r}, mask={self.mask_kind!r}, "
            f"eps={self.eps:g}"
        )

    def options(self) -> dict[str, Any]:
        """The options this block was built with (as accepted by :func:`build`)."""
        return {
            "tau": self.tau,
            "lambda_sep": self.lambda_sep,
            "lambda_rec": self.lambda_rec,
            "hidden": self.hidden,
            "ablation": self.ablation,
            "mask": self.mask_kind,
            "eps_log": self.eps,
        }

    def compute_mask(self, r: torch.Tensor) -> torch.Tensor:
        """Mask ``m`` from robustness map ``r`` (N, C, H, W).

        Sampled in training, deterministic (``sigmoid(r/τ)``, or ``1[r > 0]`` binary) in eval.
        """
        if not self.training and self.eps == 0 and self.mask_kind == "gumbel":
            return torch.sigmoid(r * (1.0 / self.tau))  # the exact eval mask, in 2 ops
        soft = gumbel_mask(r.float(), self.tau, sample=self.training, eps=self.eps).to(r.dtype)
        if self.mask_kind == "gumbel":
            return soft
        if self.training:
            hard = (soft > 0.5).to(soft.dtype)
            return hard + (soft - soft.detach())  # straight-through: exact 0/1 values, soft grads
        return (soft > 0.5).to(soft.dtype)

    def _check_input(self, f: torch.Tensor) -> None:
        if f.dim() != 4 or f.shape[1] != self.channels:
            raise FortifyError(
                f"FSR block built for {self.channels} channels got a tensor of shape "
                f"{tuple(f.shape)}; it needs (N, {self.channels}, H, W)"
            )

    def parts(self, f: torch.Tensor) -> FSRParts:
        """Run the block on ``f`` (N, C, H, W) and return every intermediate."""
        self._check_input(f)
        if self.separation is None:  # ablation: no separation (no mask, R on the whole feature)
            assert self.recalibration is not None
            f_rec = f + self.recalibration(f)
            return FSRParts(None, None, torch.zeros_like(f), f, f_rec, f_rec)
        r = self.separation(f)
        m = self.compute_mask(r)
        f_pos = m * f
        f_neg = (1 - m) * f
        if self.recalibration is None:  # ablation: no recalibration (f− is discarded)
            return FSRParts(r, m, f_pos, f_neg, None, f_pos)
        f_neg_rec = f_neg + (1 - m) * self.recalibration(f_neg)
        return FSRParts(r, m, f_pos, f_neg, f_neg_rec, f_pos + f_neg_rec)

    def head(self, feat: torch.Tensor) -> torch.Tensor:
        """Shared auxiliary head: GAP over H, W then Linear(C → K); (N, C, H, W) → (N, K)."""
        return self.aux(feat.mean(dim=(2, 3)))

    output_part: str = "out"  # analysis only: which FSRParts field forward returns

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, C, H, W); records the auxiliary predictions while capturing."""
        self._check_input(f)
        if (
            not self.capturing
            and self.output_part == "out"
            and self.separation is not None
            and self.recalibration is not None
        ):  # fast path (attacks, evaluation): f+ + f̃− = f + (1 − m) ⊙ R((1 − m) ⊙ f)
            keep = 1 - self.compute_mask(self.separation(f))
            return torch.addcmul(f, keep, self.recalibration(keep * f))
        p = self.parts(f)
        if self.output_part != "out":  # set by fortify.analysis.features.use_part
            alt = getattr(p, self.output_part)
            if alt is None:
                raise FortifyError(
                    f"FSR part {self.output_part!r} does not exist under ablation {self.ablation!r}"
                )
            return alt
        if self.capturing:
            rec: dict[str, torch.Tensor] = {}
            if self.separation is not None:
                rec["p_pos"] = self.head(p.f_pos)
                rec["p_neg"] = self.head(p.f_neg)
            if p.f_neg_rec is not None:
                rec["p_neg_rec"] = self.head(p.f_neg_rec)
            self.record(**rec)
        return p.out

    def aux_losses(self, ctx: AuxContext) -> dict[str, torch.Tensor]:
        """``{"fsr_sep": λ_sep·L_sep, "fsr_rec": λ_rec·L_rec}`` from the last captured forward.

        Terms dropped by the ablation are omitted. Returns ``{}`` (with a warning) when the
        block did not run during the capture.
        """
        rec = self.recorded
        if not rec:
            log.warning("FSR block recorded nothing during capture_aux; no FSR losses added")
            return {}
        y = ctx.y
        n = next(iter(rec.values())).shape[0]
        if y.shape[0] != n:
            raise FortifyError(
                f"AuxContext.y has {y.shape[0]} labels but the captured FSR forward saw {n} inputs"
            )
        out: dict[str, torch.Tensor] = {}
        if "p_pos" in rec:
            y_wrong = wrong_labels(ctx.logits, y)
            l_sep = F.cross_entropy(rec["p_pos"].float(), y) + F.cross_entropy(
                rec["p_neg"].float(), y_wrong
            )
            out["fsr_sep"] = self.lambda_sep * l_sep
        if "p_neg_rec" in rec:
            out["fsr_rec"] = self.lambda_rec * F.cross_entropy(rec["p_neg_rec"].float(), y)
        return out


FSR = FSRBlock


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    return asdict(options_from_dict(FSROptions, options, "FSR"))


def attach_fsr(
    model: nn.Module,
    at: str | Sequence[str],
    num_classes: int,
    input_shape: tuple[int, int, int],
    **options: Any,
) -> nn.Module:
    """Attach an FSR block after each module named in ``at``.

    Args:
        model: any CNN mapping (N, C, H, W) images to (N, K) logits.
        at: module name(s) from ``model.named_modules()`` whose 4-D outputs FSR will replace.
        num_classes: K (outputs of the auxiliary head).
        input_shape: (C, H, W) of one input image (used to infer the feature shapes).
        **options: :class:`FSRBlock` options (tau, lambda_sep, lambda_rec, hidden, ablation,
            mask, eps_log).
    Returns:
        the defended model (``model`` itself, or a wrapper for a plain ``nn.Sequential``).
    """
    opts = _check_options(options)
    # A throwaway block checks the options against the block itself before the model is touched.
    # Its parameter init draws from the global RNG: keep it, or every seeded FSR run changes.
    FSRBlock(1, num_classes, **opts)
    return attach(model, lambda shape: FSRBlock(shape[0], num_classes, **opts), at, input_shape)


def _default_position(model: nn.Module, model_name: str) -> list[str]:
    from fortify.models import spec

    default = spec(model_name).fsr_position
    if default is None:
        raise ConfigError(
            f"model {model_name!r} has no default FSR position; list module names in "
            "defenses[].at (e.g. the last residual stage)"
        )
    return [default]


# Config builder; ``at=[]`` uses the backbone's ``fsr_position``.
build = register_block_defence(
    "fsr",
    "FSR",
    FSROptions,
    lambda model, at, num_classes, chw, opts: attach_fsr(
        model, at, num_classes, chw, **asdict(opts)
    ),
    _default_position,
)


def fsr_blocks(model: nn.Module) -> dict[str, FSRBlock]:
    """Every FSR block in ``model``, keyed by the module name it is attached after."""
    from fortify.defenses.attach import attached

    found = attached(model, FSRBlock)
    if not found:  # e.g. a wrapped model: search all submodules
        found = {n: m for n, m in model.named_modules() if isinstance(m, FSRBlock)}
    return found

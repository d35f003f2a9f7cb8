"""Gradient-masking check for defences with a data-dependent selection in the forward pass.

CAS picks its channel mask from the auxiliary head's argmax and CIFS from its probe's top-k
classes (and, as released, treats the CIFS mask as a constant for gradients). A white-box attack
on such a model follows gradients in which the selection is frozen; if the selection itself is
what protects the model, the attack underestimates the attacker. This check attacks *variants*
of the model whose selection does not depend on the attacked input and transfers the examples to
the deployed model:

- ``label``: every CAS/CIFS block picks its classes from the **true label** (a smooth,
  label-driven mask; the variant is an evaluation device, never a defence);
- ``differentiable`` (CIFS only): the CIFS relevance is computed on the live feature map
  (``detach=False``), so the mask's dependence on the input is visible to the attack.

For each variant it reports the deployed model's accuracy on the transferred examples, the
direct PGD accuracy, the per-point worst case of both, and a paired bootstrap CI of
(transfer − direct). A CI entirely below 0 means the variant's attack finds points the direct
attack misses: the direct white-box number overstates robustness (status ``warn``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fortify.defenses.cas import CASBlock
from fortify.defenses.cifs import CIFSBlock
from fortify.defenses.contract import provide_labels
from fortify.errors import ConfigError, FortifyError

log = logging.getLogger(__name__)

__all__ = [
    "SelectionCheckOptions",
    "check_selection_model",
    "selection_check",
    "selection_variant",
]

VARIANTS = ("label", "differentiable")


@dataclass
class SelectionCheckOptions:
    """PGD budget of the check (L∞, CE on the final logits, no random start by default)."""

    eps: float = 8 / 255
    steps: int = 20
    step_size: float | None = None  # None: 0.1·eps (the FSR paper's PGD-20)
    random_start: bool = False
    batch_size: int = 256
    resamples: int = 2000
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        if not isinstance(self.eps, (int, float)) or not 0 < self.eps <= 1:
            raise ConfigError(f"selection check eps must be in (0, 1], got {self.eps!r}")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"selection check {name} must be an integer >= 1, got {v!r}")
        if self.step_size is not None and not self.step_size > 0:
            raise ConfigError(f"selection check step_size must be > 0, got {self.step_size!r}")


def _blocks(model: nn.Module) -> list[CASBlock | CIFSBlock]:
    return [m for m in model.modules() if isinstance(m, (CASBlock, CIFSBlock))]


def check_selection_model(model: nn.Module) -> None:
    """Raise :class:`FortifyError` unless ``model`` has a CAS or CIFS block (what
    :func:`selection_check` needs), before any work."""
    if not _blocks(model):
        raise FortifyError(
            "the model has no CAS or CIFS block; the selection check applies to defences with a "
            "data-dependent selection"
        )


def selection_variant(model: nn.Module, variant: str) -> nn.Module:
    """A deep copy of ``model`` whose CAS/CIFS blocks use ``variant`` (see the module docstring).

    Raises :class:`FortifyError` if the model has no such block (or no CIFS block for
    ``differentiable``).
    """
    if variant not in VARIANTS:
        raise ConfigError(f"selection variant {variant!r} is not allowed; choose one of {VARIANTS}")
    twin = copy.deepcopy(model).eval()
    blocks = _blocks(twin)
    if variant == "differentiable":
        blocks = [b for b in blocks if isinstance(b, CIFSBlock)]
    if not blocks:
        raise FortifyError(
            f"the model has no {'CIFS' if variant == 'differentiable' else 'CAS or CIFS'} block; "
            "the selection check applies to defences with a data-dependent selection"
        )
    for b in blocks:
        if variant == "label":
            b.opts.selection = "label"
        elif isinstance(b, CIFSBlock):
            b.opts.detach = False
    return twin


def _pgd(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, o: SelectionCheckOptions, labels: bool
) -> torch.Tensor:
    from fortify.attacks import pgd

    step = o.step_size if o.step_size is not None else 0.1 * o.eps
    gen = torch.Generator(device=x.device).manual_seed(o.seed)
    out = []
    for i in range(0, len(x), o.batch_size):
        xb, yb = x[i : i + o.batch_size], y[i : i + o.batch_size]
        with provide_labels(net, yb if labels else None):  # mode "final": whole batch each step
            out.append(
                pgd(net, xb, yb, eps=o.eps, steps=o.steps, step_size=step,
                    random_start=o.random_start, mode="final", generator=gen)
            )  # fmt: skip
    return torch.cat(out)


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat(
        [model(x[i : i + batch]).argmax(1) == y[i : i + batch] for i in range(0, len(x), batch)]
    )


def selection_check(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    options: SelectionCheckOptions | None = None,
) -> dict[str, Any]:
    """Run the check on ``model`` (eval mode; CAS and/or CIFS blocks attached).

    Args:
        x: images (N, C, H, W) in [0, 1]. y: int64 labels (N,).
        options: :class:`SelectionCheckOptions`.
    Returns: ``{"natural", "direct", "variants": {name: {"transfer", "worst", "difference",
    "status"}}, "status", "n"}`` — accuracies in %, difference = transfer − direct in points with
    its 95 % CI and verdict.
    """
    from fortify.stats import paired_bootstrap

    o = options or SelectionCheckOptions()
    o.validate()
    check_selection_model(model)
    was_training = model.training
    model.eval()
    try:
        natural = _correct(model, x, y, o.batch_size)
        direct = _correct(model, _pgd(model, x, y, o, labels=False), y, o.batch_size)
        names = ["label"] + (["differentiable"] if any(
            isinstance(b, CIFSBlock) for b in _blocks(model)) else [])  # fmt: skip
        variants: dict[str, Any] = {}
        for name in names:
            twin = selection_variant(model, name)
            x_adv = _pgd(twin, x, y, o, labels=name == "label")
            transfer = _correct(model, x_adv, y, o.batch_size)
            iv = paired_bootstrap(direct, transfer, resamples=o.resamples, seed=o.seed)
            variants[name] = {
                "transfer": 100.0 * float(transfer.float().mean()),
                "worst": 100.0 * float((transfer & direct).float().mean()),
                "difference": {**iv.to_dict(), "text": iv.format(2), "verdict": iv.verdict},
                "status": "warn" if iv.high < 0 else "ok",
            }
    finally:
        model.train(was_training)
    status = "warn" if any(v["status"] == "warn" for v in variants.values()) else "ok"
    if status == "warn":
        log.warning("selection check: an attack on a selection variant beats direct PGD")
    return {
        "n": len(x),
        "eps": o.eps,
        "steps": o.steps,
        "natural": 100.0 * float(natural.float().mean()),
        "direct": 100.0 * float(direct.float().mean()),
        "variants": variants,
        "status": status,
    }

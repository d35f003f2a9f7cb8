"""Channel-wise Activation Suppressing (CAS; Bai et al., ICLR 2021) as a plug-in block.

For a feature map ``f`` of shape (N, C, H, W) and K classes the block

1. pools ``z = GAP(f)`` (mean over H, W) and predicts auxiliary logits ``p̂ = W z + b`` with a
   linear head ``W ∈ R^{K×C}`` (the bias enters ``p̂`` only),
2. picks one class per sample: the **true label** in training mode (when the training loop
   provides it, see below), the **auxiliary prediction** ``argmax p̂`` otherwise — in evaluation
   mode always the prediction, whatever labels are around,
3. returns ``f ⊙ W[c]`` (the raw, signed weight row of that class, broadcast over H, W).

Training adds ``β · CE(p̂, y)`` per block, averaged over the blocks (``1/S Σ_s``), computed on the
captured (adversarial) forward pass: ``L = CE(final, y) + β · (1/S) Σ_s CE(p̂_s, y)``.

Labels reach the block through :func:`fortify.defenses.contract.capture_aux` (the training
objectives pass ``labels=y``) or :func:`fortify.defenses.contract.provide_labels`. In training
mode *without* labels (e.g. an inner attack crafted with ``train.attack.bn_mode: train``) the
block uses the prediction, as at test time; the release needs labels there and crashes.

**Differentiability.** ``out = f ⊙ W[c]`` is differentiable in ``f`` (gradient ``W[c]``) and in
``W``; the class choice ``c = argmax p̂`` is piecewise constant, so the gradient an attacker gets
through the block is exact wherever the prediction does not change, and the mask *jumps* when
the auxiliary prediction changes (a source of gradient masking; see ``docs/defenses.md``).
With ``selection="label"`` the mask uses the provided true label in every mode — an evaluation
diagnostic (the attack on this variant sees a smooth, label-driven mask), never a defence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fortify.defenses.attach import (
    ClassBlockAttacher,
    DefenceFactory,
    attached,
    check_block_sizes,
)
from fortify.defenses.contract import AuxContext, ChannelSelectionBlock, labels_for
from fortify.defenses.registry import check_choice, check_number, last_stage, register_block_defence
from fortify.errors import ConfigError, FortifyError

SELECTIONS = ("paper", "predicted", "label")

__all__ = ["CASBlock", "CASOptions", "CASParts", "SELECTIONS", "attach_cas", "build", "cas_blocks"]


@dataclass
class CASOptions:
    """CAS hyperparameters (defaults: the release's AT + CAS, ``Standard_Adv_Training``).

    Attributes:
        beta: weight β of the auxiliary CE (release ``--beta``: 2).
        average: average the auxiliary losses over the S blocks (release: True); False sums them.
        selection: which class drives the mask. ``"paper"``: the true label in training mode
            when provided, the auxiliary prediction otherwise (and always in evaluation mode);
            ``"predicted"``: always the prediction; ``"label"``: always the provided true label
            (evaluation diagnostic for masking checks; raises when no label is provided).
    """

    beta: float = 2.0
    average: bool = True
    selection: str = "paper"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        check_number("CAS", "beta", self.beta, low=0.0)
        if not isinstance(self.average, bool):
            raise ConfigError(f"CAS option average must be true or false, got {self.average!r}")
        check_choice("CAS", "selection", self.selection, SELECTIONS)


@dataclass
class CASParts:
    """One CAS forward pass: auxiliary logits (N, K), classes (N,), mask (N, C), output."""

    logits: torch.Tensor
    classes: torch.Tensor
    mask: torch.Tensor
    out: torch.Tensor


class CASBlock(ChannelSelectionBlock, nn.Module):
    """One CAS module for feature maps with ``channels`` channels (see the module docstring).

    Args:
        channels: C of the feature map (N, C, H, W).
        num_classes: K, outputs of the auxiliary head (the model's class count).
        options: :class:`CASOptions` (default: the paper's).
    """

    reads_labels = True

    def __init__(self, channels: int, num_classes: int, options: CASOptions | None = None):
        super().__init__()
        check_block_sizes("CAS", channels, num_classes)
        self.opts = options or CASOptions()
        self.opts.validate()
        self.channels = channels
        self.num_classes = num_classes
        self.fc = nn.Linear(channels, num_classes)
        self.term = "cas"  # loss-term name; per-block names (sum over blocks) when not averaging

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_classes={self.num_classes}, {self.opts}"

    def options(self) -> dict[str, Any]:
        """The options this block was built with (as accepted by :func:`build`)."""
        return asdict(self.opts)

    def _classes(self, logits: torch.Tensor) -> torch.Tensor:
        sel = self.opts.selection
        y = labels_for(self)
        if sel == "label":
            if y is None:
                raise FortifyError(
                    "CAS selection='label' needs the true labels: run the model inside "
                    "fortify.defenses.contract.provide_labels(model, y)"
                )
            return y
        if sel == "paper" and self.training and y is not None:
            return y
        return logits.detach().argmax(dim=1)

    def parts(self, f: torch.Tensor) -> CASParts:
        """Run the block on ``f`` (N, C, H, W); return logits, chosen classes, mask and output."""
        if f.dim() != 4 or f.shape[1] != self.channels:
            raise FortifyError(
                f"CAS block built for {self.channels} channels got a tensor of shape "
                f"{tuple(f.shape)}; it needs (N, {self.channels}, H, W)"
            )
        logits = self.fc(f.mean(dim=(2, 3)))
        classes = self._classes(logits)
        if classes.shape != (f.shape[0],):
            raise FortifyError(
                f"CAS got {tuple(classes.shape)} labels for a batch of {f.shape[0]} feature maps"
            )
        mask = self.fc.weight[classes]  # (N, C): raw signed rows, not detached
        out = f * mask.to(f.dtype)[:, :, None, None]
        return CASParts(logits, classes, mask, out)

    def aux_losses(self, ctx: AuxContext) -> dict[str, torch.Tensor]:
        """``{"cas": β · CE(p̂, y)}`` from the last captured forward (averaged over blocks)."""
        logits = self.captured_logits(ctx, "CAS")
        if logits is None:
            return {}
        return {self.term: self.opts.beta * F.cross_entropy(logits.float(), ctx.y)}


def _cas_blocks(names: list[str], num_classes: int, opts: CASOptions) -> DefenceFactory:
    return lambda shape: CASBlock(shape[0], num_classes, opts)


def _name_terms(model: nn.Module, opts: CASOptions) -> None:
    if not opts.average:
        for name, block in cas_blocks(model).items():
            block.term = f"cas[{name}]"


attach_cas: ClassBlockAttacher[CASOptions] = ClassBlockAttacher(
    "attach_cas",
    CASOptions,
    _cas_blocks,
    """Attach a CAS block after each module named in ``at`` (one auxiliary head per block).

    ``attach_cas(model, at, num_classes, input_shape, options=None)``: ``model`` any CNN mapping
    (N, C, H, W) images to (N, K) logits; ``at`` module names whose 4-D outputs CAS replaces
    (ResNet-18 paper default: ``["layer4.0", "layer4.1"]``); ``num_classes`` K;
    ``input_shape`` (C, H, W) of one image; ``options`` :class:`CASOptions`. Returns the
    defended model (``model`` itself, or a wrapper for a plain container).
    """,
    finish=_name_terms,
)


build = register_block_defence("cas", "CAS", CASOptions, attach_cas, last_stage("CAS"))


def cas_blocks(model: nn.Module) -> dict[str, CASBlock]:
    """Every CAS block in ``model``, keyed by the module name it is attached after."""
    return attached(model, CASBlock)

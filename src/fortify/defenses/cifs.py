"""Channel-wise Importance-based Feature Selection (CIFS; Yan et al., ICML 2021) as a plug-in block.

For a feature map ``z`` of shape (N, C, H, W) and K classes the block

1. runs a **probe** on the pooled feature ``u = GAP(z)``: *linear* ``A(u) = W u + b`` or
   *non-linear* ``A(u) = W₂ softplus_β(W₁ u + b₁) + b₂`` (hidden width 128, β = 5); the probe's
   logits ``p = A(u)`` feed the auxiliary loss,
2. picks k = 2 classes per sample: the top-k classes of the probe in evaluation mode; in
   training mode (when the loop provides labels) the true label replaces the top-1 class and the
   others are the probe's classes ranked 2..k (a rank-2 class equal to the label counts twice,
   as released),
3. measures the channel relevance ``g_c = Σ_{h,w} ∂(Σ_t A(z')_t)/∂z'_{c,h,w}`` on a *detached*
   copy ``z'`` of the feature map (the paper's "gradient of the top-k raw logits"),
4. turns it into a mask with the importance-mask generation function
   ``m = scale · softmax_c(g / T)`` (paper: T = 1, scale = 1) and returns ``z ⊙ m``.

Because the probe acts on ``GAP(z')``, ``Σ_{h,w} ∂ℓ/∂z'_{c,h,w} = ∂ℓ/∂u_c``, which has a closed
form: ``Σ_t W[t]`` for the linear probe and ``W₁ᵀ (σ(β(W₁u + b₁)) ⊙ Σ_t W₂[t])`` for the
non-linear one (σ is the derivative of softplus_β). The block evaluates these expressions
instead of calling autograd inside ``forward``: same numbers, no double backward, works under
``torch.no_grad()``; training still gets the release's second-order gradients into the probe's
weights (the expressions depend on them), and nothing else (``u`` is detached).

Loss (per block, averaged over the S blocks): ``3/(β+1) · β · CE(p, y)``; with the paper's β = 2
the prefactor is 1. For β ≠ 2 the block also returns ``(3/(β+1) − 1) · CE(final, y)`` as
``cifs_norm`` so that the total equals the release's ``3/(β+1) · [CE(final) + β/S Σ_s CE(p_s)]``
when the objective's own term is ``CE(final, y)`` (AT).

**Differentiability.** With ``detach=True`` (paper/release) the mask is a constant for an
attacker: the input gradient through the block is ``m`` only, although ``m`` changes with the
input — white-box attacks are weakened (gradient masking, see ``docs/defenses.md``).
``detach=False`` makes the mask a differentiable function of the feature map (for adaptive
evaluation). The top-k class choice is piecewise constant in both cases.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
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
from fortify.defenses.cas import SELECTIONS
from fortify.defenses.contract import AuxContext, ChannelSelectionBlock, labels_for
from fortify.defenses.registry import check_choice, check_number, last_stage, register_block_defence
from fortify.errors import ConfigError, FortifyError

PROBES = ("linear", "nonlinear")
DUPLICATES = ("keep", "skip-label")

__all__ = [
    "CIFSBlock",
    "CIFSOptions",
    "CIFSParts",
    "DUPLICATES",
    "PROBES",
    "attach_cifs",
    "build",
    "cifs_blocks",
]


@dataclass
class CIFSOptions:
    """CIFS hyperparameters (defaults: the release, ``CIFAR10_Res18_CIFS.py``).

    Attributes:
        beta: weight β of the probe CE (release ``--beta_cls``: 2).
        normalise: apply the release's ``3/(β+1)`` prefactor (a no-op at β = 2).
        probes: probe kind per position (``linear``/``nonlinear``); None: non-linear at every
            position but the last, linear at the last (release: layer4.0 non-linear,
            layer4.1 linear).
        hidden: hidden width of the non-linear probe (128). softplus_beta: its Softplus β (5).
        k: number of classes whose logits define the relevance (2).
        duplicate: training rule when the rank-2 class equals the label: ``keep`` (counted
            twice, release) or ``skip-label`` (use the best classes other than the label).
        temperature: T of the IMGF softmax (1). scale: factor on the softmax (1; the
            pre-cleanup release used 2).
        detach: compute the relevance on a detached feature map (release: True).
        selection: as for CAS — ``paper`` (label in training when provided, prediction
            otherwise), ``predicted``, or ``label`` (evaluation diagnostic).
    """

    beta: float = 2.0
    normalise: bool = True
    probes: list[str] | None = None
    hidden: int = 128
    softplus_beta: float = 5.0
    k: int = 2
    duplicate: str = "keep"
    temperature: float = 1.0
    scale: float = 1.0
    detach: bool = True
    selection: str = "paper"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        check_number("CIFS", "beta", self.beta, low=0.0)
        check_number("CIFS", "softplus_beta", self.softplus_beta, low=0.0, strict=True)
        check_number("CIFS", "temperature", self.temperature, low=0.0, strict=True)
        check_number("CIFS", "scale", self.scale, low=0.0, strict=True)
        for name in ("normalise", "detach"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"CIFS option {name} must be true or false, got {getattr(self, name)!r}"
                )
        for name in ("hidden", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CIFS option {name} must be an integer >= 1, got {value!r}")
        if self.probes is not None:
            if isinstance(self.probes, str) or not isinstance(self.probes, (list, tuple)):
                raise ConfigError(
                    f"CIFS option probes must be a list such as [nonlinear, linear], got "
                    f"{self.probes!r}"
                )
            for p in self.probes:
                check_choice("CIFS", "probes[]", p, PROBES)
        check_choice("CIFS", "duplicate", self.duplicate, DUPLICATES)
        check_choice("CIFS", "selection", self.selection, SELECTIONS)


@dataclass
class CIFSParts:
    """One CIFS forward pass: probe logits (N, K), classes (N, k), relevance and mask (N, C)."""

    logits: torch.Tensor
    classes: torch.Tensor
    relevance: torch.Tensor
    mask: torch.Tensor
    out: torch.Tensor


class CIFSBlock(ChannelSelectionBlock, nn.Module):
    """One CIFS block for feature maps with ``channels`` channels (see the module docstring).

    Args:
        channels: C of the feature map (N, C, H, W).
        num_classes: K (probe outputs).
        probe: ``"linear"`` or ``"nonlinear"``.
        options: :class:`CIFSOptions` (its ``probes`` field is used by the builder only).
    Parameters: ``hidden_fc`` (C → hidden, non-linear probe only) and ``fc`` (→ K).
    """

    reads_labels = True

    def __init__(
        self,
        channels: int,
        num_classes: int,
        probe: str = "linear",
        options: CIFSOptions | None = None,
    ):
        super().__init__()
        check_block_sizes("CIFS", channels, num_classes)
        check_choice("CIFS", "probe", probe, PROBES)
        self.opts = options or CIFSOptions()
        self.opts.validate()
        if self.opts.k > num_classes:
            raise ConfigError(f"CIFS option k={self.opts.k} exceeds the {num_classes} classes")
        self.channels = channels
        self.num_classes = num_classes
        self.probe = probe
        self.hidden_fc = nn.Linear(channels, self.opts.hidden) if probe == "nonlinear" else None
        self.fc = nn.Linear(self.opts.hidden if probe == "nonlinear" else channels, num_classes)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_classes={self.num_classes}, probe={self.probe!r}"

    def options(self) -> dict[str, Any]:
        """The options this block was built with."""
        return asdict(self.opts)

    def _classes(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, k) classes whose logits define the relevance."""
        k, sel = self.opts.k, self.opts.selection
        ranked = logits.detach().topk(min(k + 1, self.num_classes), dim=1).indices
        y = labels_for(self)
        if sel == "label" and y is None:
            raise FortifyError(
                "CIFS selection='label' needs the true labels: run the model inside "
                "fortify.defenses.contract.provide_labels(model, y)"
            )
        use_label = y is not None and (sel == "label" or (sel == "paper" and self.training))
        if not use_label:
            return ranked[:, :k]
        assert y is not None
        if y.shape != (logits.shape[0],):
            raise FortifyError(
                f"CIFS got {tuple(y.shape)} labels for a batch of {logits.shape[0]} feature maps"
            )
        if self.opts.duplicate == "keep" or k == 1:
            return torch.cat([y[:, None], ranked[:, 1:k]], dim=1)
        others = ranked[:, : k + 1]  # the best k classes other than y are among the top k+1
        keep = others != y[:, None]
        first = torch.cumsum(keep.long(), dim=1) <= (k - 1)
        picked = others[keep & first].view(-1, k - 1)
        return torch.cat([y[:, None], picked], dim=1)

    def parts(self, z: torch.Tensor) -> CIFSParts:
        """Run the block on ``z`` (N, C, H, W); return probe logits, classes, relevance, mask."""
        if z.dim() != 4 or z.shape[1] != self.channels:
            raise FortifyError(
                f"CIFS block built for {self.channels} channels got a tensor of shape "
                f"{tuple(z.shape)}; it needs (N, {self.channels}, H, W)"
            )
        u = z.mean(dim=(2, 3))
        if self.hidden_fc is None:
            logits = self.fc(u)
        else:
            logits = self.fc(F.softplus(self.hidden_fc(u), beta=self.opts.softplus_beta))
        classes = self._classes(logits)
        rows = self.fc.weight[classes].sum(dim=1)  # Σ_t ∂ℓ_t/∂(probe's last input)
        if self.hidden_fc is None:
            relevance = rows
        else:
            u_r = u.detach() if self.opts.detach else u
            slope = torch.sigmoid(self.opts.softplus_beta * self.hidden_fc(u_r))  # softplus'
            relevance = (slope * rows) @ self.hidden_fc.weight
        mask = torch.softmax(relevance.float() / self.opts.temperature, dim=1) * self.opts.scale
        out = z * mask.to(z.dtype)[:, :, None, None]
        return CIFSParts(logits, classes, relevance, mask, out)

    def aux_losses(self, ctx: AuxContext) -> dict[str, torch.Tensor]:
        """``{"cifs": 3/(β+1)·β·CE(p, y)}`` (+ ``cifs_norm`` for β ≠ 2), averaged over blocks."""
        logits = self.captured_logits(ctx, "CIFS")
        if logits is None:
            return {}
        beta = self.opts.beta
        norm = 3.0 / (beta + 1.0) if self.opts.normalise else 1.0
        out = {"cifs": norm * beta * F.cross_entropy(logits.float(), ctx.y)}
        if norm != 1.0:
            out["cifs_norm"] = (norm - 1.0) * F.cross_entropy(ctx.logits.float(), ctx.y)
        return out


def _cifs_blocks(names: list[str], num_classes: int, opts: CIFSOptions) -> DefenceFactory:
    probes = list(opts.probes) if opts.probes is not None else None
    if probes is None:
        probes = ["nonlinear"] * (len(names) - 1) + ["linear"]
    if len(probes) != len(names):
        raise ConfigError(
            f"CIFS option probes has {len(probes)} entries for {len(names)} positions {names}; "
            "give one probe kind per position"
        )
    kinds = dict(zip(names, probes, strict=True))
    block_opts = replace(opts, probes=None)
    order = iter(names)
    return lambda shape: CIFSBlock(shape[0], num_classes, kinds[next(order)], block_opts)


attach_cifs: ClassBlockAttacher[CIFSOptions] = ClassBlockAttacher(
    "attach_cifs",
    CIFSOptions,
    _cifs_blocks,
    """Attach a CIFS block after each module named in ``at``.

    ``attach_cifs(model, at, num_classes, input_shape, options=None)``: ``model`` any CNN
    mapping (N, C, H, W) images to (N, K) logits; ``at`` module names (ResNet-18 paper default
    ``["layer4.0", "layer4.1"]``); ``num_classes`` K; ``input_shape`` (C, H, W) of one image;
    ``options`` :class:`CIFSOptions` (``probes`` gives one probe kind per position). Returns
    the defended model.
    """,
)


# Config builder; ``at=[]`` uses the two blocks of the backbone's last stage (paper).
build = register_block_defence("cifs", "CIFS", CIFSOptions, attach_cifs, last_stage("CIFS"))


def cifs_blocks(model: nn.Module) -> dict[str, CIFSBlock]:
    """Every CIFS block in ``model``, keyed by the module name it is attached after."""
    return attached(model, CIFSBlock)

"""Feature Denoising (FD; Xie et al., CVPR 2019) as a plug-in block.

For a feature map ``x`` of shape (N, C, H, W), with P = H·W positions, the block returns

    x + BN(Conv1x1(D(x)))

where ``Conv1x1`` is C→C without bias (He-normal init on fan-out) and the BN's γ starts at 0,
so the block is the identity at initialisation. ``D`` is a denoising operation:

- ``nonlocal_gaussian`` (default; the release's ResNet-152 "Denoise"): embedded Gaussian
  non-local means ``y_p = Σ_q softmax_q(θ_p·φ_q / √d) x_q`` with θ, φ = Conv1x1(C→d), no bias,
  weights ~ N(0, 0.01²), d = C/2; the value path is ``x`` itself. Without embedding θ = φ = x and
  d = C.
- ``nonlocal_dot``: ``y_p = (1/P) Σ_q (θ_p·φ_q) x_q`` (the release's "DenoiseAll" uses it without
  embedding); evaluated in the cheaper order (d×C matrix first when d·C < P²).
- ``bilateral``: the Gaussian affinity restricted to a ``window``×``window`` neighbourhood of p
  (zero padding is excluded from the softmax).
- ``mean`` / ``median``: the mean / median over a ``window``×``window`` neighbourhood (mean: over
  the positions inside the map; median: edge-replicated border).
- ``none``: ``D(x) = x`` (the paper's "null" control block: 1×1 conv + residual only).

FD has no auxiliary loss; everything in the block is differentiable (median: through the
selected element), so attacks get exact gradients. Options switch off the conv, the zero-γ init
and the residual connection for ablations. The release implements only non-local means; the
local filters follow the paper's description (window 3 assumed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fortify.defenses.attach import attach, attached, check_block_sizes
from fortify.defenses.registry import (
    check_choice,
    check_number,
    register_block_defence,
    stage_positions,
)
from fortify.errors import ConfigError, FortifyError

log = logging.getLogger(__name__)

OPERATIONS = ("nonlocal_gaussian", "nonlocal_dot", "bilateral", "mean", "median", "none")

__all__ = ["FDBlock", "FDOptions", "OPERATIONS", "attach_fd", "build", "fd_blocks"]


@dataclass
class FDOptions:
    """FD hyperparameters (defaults: the release's ResNet-152 "Denoise" blocks).

    Attributes:
        operation: one of :data:`OPERATIONS` (default ``nonlocal_gaussian``).
        embed: θ/φ 1×1 embeddings for the non-local / bilateral operations (release: True for
            the Gaussian version, False for the dot-product "DenoiseAll").
        embed_ratio: embedding width d = max(1, round(C · embed_ratio)) (release: 1/2).
        window: neighbourhood size of ``bilateral``, ``mean``, ``median`` (odd, default 3).
        conv: apply the 1×1 conv + BN after D (release: True).
        zero_init: initialise the BN's γ to 0 (block = identity at start; release: True).
        residual: add the block's input back (release: True).
        max_affinity_mib: refuse a Gaussian non-local pass whose N×P×P affinity would exceed
            this many MiB in fp32 (use ``nonlocal_dot`` or a coarser position instead).
    """

    operation: str = "nonlocal_gaussian"
    embed: bool = True
    embed_ratio: float = 0.5
    window: int = 3
    conv: bool = True
    zero_init: bool = True
    residual: bool = True
    max_affinity_mib: float = 4096.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        check_choice("FD", "operation", self.operation, OPERATIONS)
        for name in ("embed", "conv", "zero_init", "residual"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"FD option {name} must be true or false, got {getattr(self, name)!r}"
                )
        check_number("FD", "embed_ratio", self.embed_ratio, low=0.0, strict=True)
        check_number("FD", "max_affinity_mib", self.max_affinity_mib, low=0.0, strict=True)
        w = self.window
        if isinstance(w, bool) or not isinstance(w, int) or w < 1 or w % 2 == 0:
            raise ConfigError(f"FD option window must be an odd integer >= 1, got {w!r}")
        if not (self.conv or self.residual):
            raise ConfigError("FD options conv=false and residual=false leave no block; keep one")


def _checked_options(options: object) -> FDOptions:
    """``options`` (None: the defaults) validated; anything but an :class:`FDOptions` is a
    :class:`ConfigError` naming the class."""
    if options is None:
        options = FDOptions()
    if not isinstance(options, FDOptions):
        raise ConfigError(
            f"options must be an FDOptions, got {type(options).__name__}; pass FDOptions(...) "
            "(or None for the release's defaults)"
        )
    options.validate()
    return options


class FDBlock(nn.Module):
    """One denoising block for feature maps with ``channels`` channels (module docstring).

    Parameters: ``theta``/``phi`` (embeddings, when used), ``conv`` and ``bn`` (when ``conv``).
    """

    def __init__(self, channels: int, options: FDOptions | None = None):
        super().__init__()
        check_block_sizes("FD", channels)
        self.opts = _checked_options(options)
        self.channels = channels
        op = self.opts.operation
        self.theta: nn.Conv2d | None = None
        self.phi: nn.Conv2d | None = None
        if self.opts.embed and op in ("nonlocal_gaussian", "nonlocal_dot", "bilateral"):
            d = max(1, round(channels * self.opts.embed_ratio))
            self.theta = nn.Conv2d(channels, d, 1, bias=False)
            self.phi = nn.Conv2d(channels, d, 1, bias=False)
            for conv in (self.theta, self.phi):
                nn.init.normal_(conv.weight, std=0.01)
        self.conv: nn.Conv2d | None = None
        self.bn: nn.BatchNorm2d | None = None
        if self.opts.conv:
            self.conv = nn.Conv2d(channels, channels, 1, bias=False)
            nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
            self.bn = nn.BatchNorm2d(channels)
            if self.opts.zero_init:
                nn.init.zeros_(self.bn.weight)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, {self.opts}"

    def options(self) -> dict[str, Any]:
        """The options this block was built with."""
        return asdict(self.opts)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.theta is None or self.phi is None:
            return x, x
        return self.theta(x), self.phi(x)

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """The operation D: (N, C, H, W) → (N, C, H, W)."""
        op = self.opts.operation
        n, c, h, w = x.shape
        p = h * w
        if op == "none":
            return x
        if op == "mean":
            r = self.opts.window // 2
            return F.avg_pool2d(x, self.opts.window, 1, r, count_include_pad=False)
        if op == "median":
            r = self.opts.window // 2
            padded = F.pad(x, (r, r, r, r), mode="replicate")
            patches = padded.unfold(2, self.opts.window, 1).unfold(3, self.opts.window, 1)
            return patches.reshape(n, c, h, w, -1).median(dim=-1).values
        theta, phi = self._embed(x)
        d = theta.shape[1]
        if op == "nonlocal_gaussian":
            mib = n * p * p * 4 / 2**20
            if mib > self.opts.max_affinity_mib:
                raise FortifyError(
                    f"FD nonlocal_gaussian on a {c}×{h}×{w} map needs a {n}×{p}×{p} affinity "
                    f"({mib:.0f} MiB > max_affinity_mib={self.opts.max_affinity_mib:g}); use "
                    "operation nonlocal_dot, a smaller batch or a coarser position"
                )
            q = theta.flatten(2).transpose(1, 2)  # (N, P, d)
            k = phi.flatten(2).transpose(1, 2)
            v = x.flatten(2).transpose(1, 2)  # (N, P, C)
            # zero-pad to equal widths (dot products unchanged): the fused attention kernel
            # needs them and is several times faster than the materialised N×P×P path
            if d < c:
                q, k = F.pad(q, (0, c - d)), F.pad(k, (0, c - d))
            elif c < d:
                v = F.pad(v, (0, d - c))
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the fused kernel's layout
            y = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d))[..., :c]
            return y.transpose(1, 2).reshape(n, c, h, w)
        if op == "nonlocal_dot":
            t, f, v = theta.flatten(2), phi.flatten(2), x.flatten(2)  # (N, d|C, P)
            if d * c < p * p:  # (φ xᵀ)/P first: d×C, then apply to θ
                y = torch.bmm((torch.bmm(f, v.transpose(1, 2)) / p).transpose(1, 2), t)
            else:
                y = torch.bmm(v, torch.bmm(t.transpose(1, 2), f).transpose(1, 2) / p)
            return y.reshape(n, c, h, w)
        # bilateral: Gaussian affinity over a window×window neighbourhood
        win = self.opts.window
        pad = win // 2
        nb_phi = F.unfold(phi, win, padding=pad).view(n, d, win * win, p)
        nb_x = F.unfold(x, win, padding=pad).view(n, c, win * win, p)
        ones = torch.ones(1, 1, h, w, device=x.device, dtype=x.dtype)
        valid = F.unfold(ones, win, padding=pad)
        scores = (theta.flatten(2)[:, :, None, :] * nb_phi).sum(1) / math.sqrt(d)  # (N, win², P)
        scores = scores.masked_fill(valid.view(1, win * win, p) == 0, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        return (weights[:, None] * nb_x).sum(2).view(n, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, C, H, W): ``x + BN(Conv1x1(D(x)))`` (switchable parts)."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise FortifyError(
                f"FD block built for {self.channels} channels got a tensor of shape "
                f"{tuple(x.shape)}; it needs (N, {self.channels}, H, W)"
            )
        y = self.denoise(x)
        if self.conv is not None and self.bn is not None:
            y = self.bn(self.conv(y))
        return x + y if self.opts.residual else y


def attach_fd(
    model: nn.Module,
    at: str | Sequence[str],
    input_shape: tuple[int, int, int],
    options: FDOptions | None = None,
) -> nn.Module:
    """Attach a denoising block after each module named in ``at``.

    Args:
        model: any CNN mapping (N, C, H, W) images to (N, K) logits.
        at: module names (ResNet default: every residual stage, ``layer1``..``layer4``).
        input_shape: (C, H, W) of one image.
        options: :class:`FDOptions`.
    Returns: the defended model.
    """
    opts = _checked_options(options)
    return attach(model, lambda shape: FDBlock(shape[0], opts), at, input_shape)


# Config builder; ``at=[]`` puts a block after every residual stage (release design).
build = register_block_defence(
    "fd",
    "FD",
    FDOptions,
    lambda model, at, num_classes, chw, opts: attach_fd(model, at, chw, opts),
    lambda model, model_name: stage_positions(model_name, "FD"),
)


def fd_blocks(model: nn.Module) -> dict[str, FDBlock]:
    """Every FD block in ``model``, keyed by the module name it is attached after."""
    return attached(model, FDBlock)

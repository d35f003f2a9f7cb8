"""The building blocks of FPD (:mod:`fortify.defenses.fpd`): the denoising operation, the
restoration decoder, the restoration loss (aux-loss contract), the back pass's own BatchNorm
statistics and the checks that refuse weights saved in an older FPD layout."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fortify.defenses.contract import AuxContext, CaptureMixin
from fortify.defenses.fpd_options import DecoderKind, DenoiseScale
from fortify.errors import DataError, FortifyError

FORMAT_VERSION = 2  # FPD state-dict layout: 2 = release structure (raw pyramid, linear decoder)
FORMAT_KEY = "fpd_format"
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------------------------
# The denoising operation
# --------------------------------------------------------------------------------------------


def denoise(feat: torch.Tensor, scale: DenoiseScale = "n") -> torch.Tensor:
    """The parameter-free dot-product non-local mean ``D(F) = F + (F Fᵀ F) / N'``.

    Per sample, ``F`` is reshaped to a C×N' matrix (N' = H·W). The C×C Gram matrix ``F Fᵀ`` is
    formed first, so the cost is O(C²·N') rather than the O(N'²·C) of the spatial N'×N'
    affinity ``Fᵀ F``; both give the same result by associativity.

    The non-local term grows with the cube of the features' scale and roughly linearly with C
    (each output channel sums C Gram-weighted channels), so on un-normalised stage outputs it
    can dominate ``F`` by orders of magnitude. ``scale="nc"`` divides by ``C·N'`` instead of
    ``N'`` (a fortify option, not in the paper), which keeps the term about as large as ``F``
    for unit-scale features.

    Args:
        feat: feature map (N, C, H, W), any floating dtype.
        scale: "n" (the paper: divide by N' = H·W) or "nc" (divide by C·N').
    Returns:
        tensor of the same shape and dtype.
    """
    if feat.dim() != 4:
        raise DataError(
            f"denoise expects a 4-D feature map (N, C, H, W), got shape {tuple(feat.shape)}"
        )
    n, c, h, w = feat.shape
    flat = feat.reshape(n, c, h * w)
    gram = torch.bmm(flat, flat.transpose(1, 2))  # (N, C, C)
    div = h * w * (c if scale == "nc" else 1)
    return feat + torch.bmm(gram, flat).reshape(n, c, h, w) / div


def middle_denoise(restored: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``x_mid = x′ + (s sᵀ s) / (H·W)`` where ``s`` is ``source`` reshaped to C×(H·W) per sample.

    The release uses the raw input as ``source`` (so the raw input reaches the classifier
    directly); ``source = restored`` gives the self-contained alternative ``D(x′)``.

    Args:
        restored: x′, (N, C, H, W) in pixel units.
        source: (N, C, H, W), same shape as ``restored``.
    """
    n, c, h, w = source.shape
    flat = source.reshape(n, c, h * w)
    gram = torch.bmm(flat, flat.transpose(1, 2))
    return restored + torch.bmm(gram, flat).reshape(n, c, h, w) / (h * w)


# --------------------------------------------------------------------------------------------
# The restoration decoder
# --------------------------------------------------------------------------------------------


def _act(kind: str) -> nn.Module:
    return nn.ELU() if kind == "elu" else nn.ReLU()


class FPDDecoder(nn.Module):
    """FPN-style top-down decoder from the stage outputs back to an image.

    1×1 lateral convs map every stage output to ``width`` channels; starting from the deepest,
    each level is bilinearly upsampled to the next shallower one and added; a 3×3 conv smooths
    the sum. Then, with ``kind="linear"`` (the release), ``n_up`` transposed convs of kernel 2,
    stride 2 (64, 16, 4, … channels, as the release's 64 and 16) bring it back to the input
    resolution and a 1×1 transposed conv outputs ``out_channels`` — no activation anywhere after
    the lateral sum, so the decoder is affine in the pyramid. Conv2d weights are drawn from
    N(0, 2 / (k²·C_out)) as in the release. ``kind="activated"`` is fortify's earlier decoder
    (kept to load its weights): an activation after the smoothing conv and after each
    kernel-4 transposed conv (halving the width, at least 8), then a 3×3 output conv.

    Any residual size mismatch (inputs whose side is not a multiple of the stride) is closed by
    bilinear interpolation to the input size before the output conv. There is no output
    non-linearity. With ``lateral_norm`` (a fortify option) each lateral conv is followed by
    BatchNorm.
    """

    def __init__(
        self,
        stage_channels: Sequence[int],
        out_channels: int,
        *,
        width: int = 256,
        n_up: int = 0,
        activation: str = "relu",
        lateral_norm: bool = False,
        kind: DecoderKind = "linear",
    ):
        super().__init__()
        self.kind: str = kind
        self.laterals = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 1), nn.BatchNorm2d(width))
            if lateral_norm
            else nn.Conv2d(c, width, 1)
            for c in stage_channels
        )
        self.smooth = nn.Conv2d(width, width, 3, padding=1)
        ups: list[nn.Module] = []
        ch = width
        if kind == "linear":
            self.act: nn.Module = nn.Identity()
            for i in range(n_up):
                nxt = max(64 // 4**i, 4)
                ups.append(nn.ConvTranspose2d(ch, nxt, 2, stride=2))
                ch = nxt
            self.upsample = nn.Sequential(*ups)
            self.head: nn.Module = nn.ConvTranspose2d(ch, out_channels, 1)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / k))
        else:
            self.act = _act(activation)
            for _ in range(n_up):
                nxt = max(ch // 2, 8)
                ups += [nn.ConvTranspose2d(ch, nxt, 4, stride=2, padding=1), _act(activation)]
                ch = nxt
            self.upsample = nn.Sequential(*ups)
            self.head = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, feats: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Args: feats: stage outputs shallow→deep, each (N, C_i, H_i, W_i); size: (H, W) of x.

        Returns: the restored image (N, out_channels, H, W).
        """
        top = self.laterals[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.laterals[i](feats[i])
            top = F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            top = top + lateral
        out = self.upsample(self.act(self.smooth(top)))
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return self.head(out)


# --------------------------------------------------------------------------------------------
# Contract: the restoration loss
# --------------------------------------------------------------------------------------------


class FPDAux(CaptureMixin, nn.Module):
    """Parameter-free child of :class:`FPD` implementing the auxiliary-loss contract.

    While capturing it records ``restored`` (x′, (N, C, H, W)), ``logits`` (pre-bound, (N, K))
    and ``bounded`` ((N, K)) of the latest FPD forward pass. :meth:`aux_losses` returns
    ``{"fpd_restore": weight · MSE(x′, x_clean)}`` (``ctx.x`` when ``x_clean`` is unknown).
    It is a child module (not the FPD wrapper itself) because ``aux_providers`` skips the root.
    """

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        return x

    def aux_losses(self, ctx: AuxContext) -> dict[str, torch.Tensor]:
        restored = self.recorded.get("restored")
        if restored is None or self.weight == 0:
            return {}
        target = ctx.x_clean if ctx.x_clean is not None else ctx.x
        if target is None:
            raise FortifyError("the FPD restoration loss needs AuxContext.x_clean or AuxContext.x")
        return {"fpd_restore": self.weight * F.mse_loss(restored, target)}


# --------------------------------------------------------------------------------------------
# Per-pass BatchNorm statistics
# --------------------------------------------------------------------------------------------


class BackPassStats(nn.Module):
    """The back pass's own running statistics for one BatchNorm layer of the backbone.

    The two passes share every weight, but their inputs differ (x versus
    x_mid = x′ + (x xᵀ x)/(H·W), which for RGB images is roughly 1.75·x), so one set of running
    statistics averaged over both passes normalises neither correctly in eval mode. The buffers
    here are swapped into the BatchNorm layer for the duration of the back pass.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        for name in BN_BUFFERS:
            self.register_buffer(name, getattr(bn, name).detach().clone())


def stat_key(module_name: str) -> str:
    return module_name.replace(".", "__")


def refuse_old_layouts(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``load_state_dict`` pre-hook of :class:`~fortify.defenses.fpd.FPD`: refuse, even with
    ``strict=False``, weights saved in an older FPD layout (:func:`_format_error`, then
    :func:`_back_stats_error`), with the options that load them."""
    for check in (_format_error, _back_stats_error):
        message = check(module, state_dict, prefix)
        if message is not None:
            error_msgs.append(message)


def _back_stats_error(module: nn.Module, state_dict: dict[str, Any], prefix: str) -> str | None:
    """Weights saved before FPD kept per-pass statistics: loading them would leave the back
    pass normalised with fresh (0, 1) statistics."""
    if len(module.back_stats) and not any(k.startswith(prefix + "back_stats.") for k in state_dict):
        return (
            "these FPD weights have no back-pass BatchNorm statistics (back_stats.*): they were "
            "saved with one set of statistics for both passes, before fortify's bn_stats / "
            "denoise_scale options existed. Rebuild the model with FPD options "
            "bn_stats: shared, denoise_scale: n (the behaviour they were trained with) to load them"
        )
    return None


def _format_error(module: nn.Module, state_dict: dict[str, Any], prefix: str) -> str | None:
    """FPD weights saved before the release structure (format 2): their decoder read the
    denoised first stage through an activated decoder, so loading them into the release
    structure would silently compute something else. Models built with the legacy options
    accept them (the format entry is then added to ``state_dict``)."""
    key = prefix + FORMAT_KEY
    if key in state_dict:
        return None
    legacy = module.pyramid == "denoised" and module.decoder.kind == "activated"
    if legacy:
        state_dict[key] = torch.tensor(FORMAT_VERSION)
        return None
    has_back = any(k.startswith(prefix + "back_stats.") for k in state_dict)
    old = (
        "bn_stats: per-pass, denoise_scale: nc (the defaults they were saved with, unless their "
        "run config says otherwise)"
        if has_back
        else "bn_stats: shared, denoise_scale: n"
    )
    return (
        "these FPD weights predate fortify's release-faithful FPD structure (no fpd_format "
        "entry): they were trained with the decoder reading the first stage after the denoising "
        "operation, through a decoder with activations. Rebuild the model with FPD options "
        f"pyramid: denoised, decoder: activated, {old} to load them"
    )

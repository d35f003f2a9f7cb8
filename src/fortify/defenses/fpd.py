"""Feature Pyramid Decoder (FPD; Li, Ding, Luo & Liu, CVPR 2020) as a whole-model defence.

FPD turns a block-based CNN into a two-pass network::

    x ──► backbone front pass (D after the stem and after the first stage) ──► c2..c5
          c2..c5 ──► FPN-style decoder ──► x′  (restored image, same shape as x)
    x_mid = x′ + (x xᵀ x) / (H·W)                      ("middle denoise")
    x_mid ──► the SAME backbone again (shared weights and BN, same D) ─► pool ─► [dropout] ─► linear
          ──► bounded output: tanh(logits)  (release)  or a spectrally normalised linear layer

``FPD.forward(x)`` returns the bounded logits (N, K) only, like every fortify model. The
restored image and the pre-bound logits are available through :meth:`FPD.forward_full`,
:meth:`FPD.unbounded_logits`, :meth:`FPD.restore` and, for training objectives, through the
auxiliary-loss contract (:mod:`fortify.defenses.contract`): the parameter-free child module
``FPD.aux`` records them while a ``capture_aux`` block is active and returns the weighted
restoration loss ``fpd_restore``.

The backbone is kept unchanged under ``FPD.net`` (so ``layer2.1.conv2`` becomes
``net.layer2.1.conv2``, the same convention as :class:`fortify.defenses.attach.Defended`); the
decoder's parameters live under ``FPD.decoder``. The backbone's own ``forward`` runs both
passes; FPD adds temporary hooks for the denoising operations, to collect the pyramid and to
apply dropout before the classifier, so it works on any backbone whose stages are named modules
(our ResNets: ``layer1..layer4``; the small CNN: ``features.0, features.1``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fortify.defenses.attach import infer_feature_shapes
from fortify.defenses.contract import AuxContext, CaptureMixin
from fortify.defenses.registry import register_defence
from fortify.errors import ConfigError, DataError, FortifyError

log = logging.getLogger(__name__)

Bound = Literal["tanh", "spectral", "none"]
MiddleGram = Literal["input", "restored"]
Activation = Literal["relu", "elu"]
Phase1Params = Literal["front", "decoder"]
BNStats = Literal["per-pass", "shared"]
DenoiseScale = Literal["n", "nc"]
DecoderKind = Literal["linear", "activated"]
PyramidSource = Literal["raw", "denoised"]

_BOUNDS = ("tanh", "spectral", "none")
_MIDDLE = ("input", "restored")
_ACTS = ("relu", "elu")
_BN_STATS = ("per-pass", "shared")
_SCALES = ("n", "nc")
_DECODERS = ("linear", "activated")
_PYRAMIDS = ("raw", "denoised")
FORMAT_VERSION = 2  # FPD state-dict layout: 2 = release structure (raw pyramid, linear decoder)
_FORMAT_KEY = "fpd_format"
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_CLASSIFIER_NAMES = ("linear", "fc", "classifier")
_PROBE = 64  # input side used to measure a backbone's total stride for small image shapes


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
        for name in _BN_BUFFERS:
            self.register_buffer(name, getattr(bn, name).detach().clone())


def _stat_key(module_name: str) -> str:
    return module_name.replace(".", "__")


def _explain_missing_back_stats(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Refuse (even with strict=False) weights saved before FPD kept per-pass statistics:
    loading them would leave the back pass normalised with fresh (0, 1) statistics."""
    if len(module.back_stats) and not any(k.startswith(prefix + "back_stats.") for k in state_dict):
        error_msgs.append(
            "these FPD weights have no back-pass BatchNorm statistics (back_stats.*): they were "
            "saved with one set of statistics for both passes, before fortify's bn_stats / "
            "denoise_scale options existed. Rebuild the model with FPD options "
            "bn_stats: shared, denoise_scale: n (the behaviour they were trained with) to load them"
        )


LEGACY_OPTIONS = {"pyramid": "denoised", "decoder": "activated"}


def _check_format(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Refuse (even with strict=False) FPD weights saved before the release structure
    (format 2): their decoder read the denoised first stage through an activated decoder, so
    loading them into the release structure would silently compute something else. Models built
    with the legacy options accept them."""
    key = prefix + _FORMAT_KEY
    if key in state_dict:
        return
    legacy = module.pyramid == "denoised" and module.decoder.kind == "activated"
    if legacy:
        state_dict[key] = torch.tensor(FORMAT_VERSION)
        return
    has_back = any(k.startswith(prefix + "back_stats.") for k in state_dict)
    old = (
        "bn_stats: per-pass, denoise_scale: nc (the defaults they were saved with, unless their "
        "run config says otherwise)"
        if has_back
        else "bn_stats: shared, denoise_scale: n"
    )
    error_msgs.append(
        "these FPD weights predate fortify's release-faithful FPD structure (no fpd_format "
        "entry): they were trained with the decoder reading the first stage after the denoising "
        "operation, through a decoder with activations. Rebuild the model with FPD options "
        f"pyramid: denoised, decoder: activated, {old} to load them"
    )


# --------------------------------------------------------------------------------------------
# The whole-model wrapper
# --------------------------------------------------------------------------------------------


class FPDOutput(NamedTuple):
    """Everything one FPD forward pass produces."""

    bounded: torch.Tensor  # (N, K) what ``forward`` returns
    logits: torch.Tensor  # (N, K) pre-bound logits (equal to ``bounded`` unless bound='tanh')
    restored: torch.Tensor  # (N, C, H, W) x′, the decoder's output in pixel units


class _Hooks:
    """Picklable hook callables; they look at the owning FPD's per-pass state."""

    def __init__(self, owner: FPD, kind: str, index: int = 0):
        self.owner = owner
        self.kind = kind
        self.index = index

    def __call__(self, module: nn.Module, args: Any, output: Any = None) -> Any:
        owner = self.owner
        if self.kind == "pre_denoise":
            return (denoise(args[0], owner.denoise_scale), *args[1:])
        if self.kind == "post_denoise":
            return denoise(output, owner.denoise_scale)
        if self.kind == "collect":
            owner._pyramid[self.index] = output
            return None
        if self.kind == "dropout":
            if owner.dropout > 0:
                return (F.dropout(args[0], owner.dropout, owner.training), *args[1:])
            return None
        raise AssertionError(self.kind)


class FPD(nn.Module):
    """A backbone wrapped with front denoising, the restoration decoder, back denoising and a
    bounded classification layer. ``forward(x)`` maps (N, C, H, W) images in [0, 1] to bounded
    logits (N, K).

    Args:
        backbone: a classifier mapping (N, C, H, W) → (N, K) whose stages are named modules.
        stages: module names of the residual stages, shallow to deep (the pyramid c2..c5).
        image_shape: (C, H, W) used to infer stage shapes and the decoder's upsampling.
        width: common width of the decoder's lateral convs (release: 256).
        bound: "tanh" (release), "spectral" (spectrally normalised classifier weight, the
            Lipschitz-constrained layer the paper describes) or "none".
        middle: "input" (release: Gram term of the raw input) or "restored" (of x′).
        denoise_at: where D is applied in both passes; ``None`` means the release's
            ("stem", stages[0]); "stem" means the input of ``stages[0]``; other entries are
            module names (D on their output).
        dropout: dropout probability before the classifier in the back pass (release: 0.5 for
            SVHN/Caltech, 0 for MNIST).
        activation: "relu" (keep the backbone's) or "elu" (replace every ``nn.ReLU`` of the
            backbone and the decoder's activations by ELU, as in the release).
        classifier: name of the backbone's final ``nn.Linear`` (default: first of linear/fc/
            classifier that exists).
        restore_weight: weight of ``fpd_restore`` returned through the aux-loss contract.
        bn_stats: "shared" (the release: one set of BatchNorm running statistics for both
            passes) or "per-pass" (the back pass keeps its own running statistics in
            ``FPD.back_stats``; affine parameters stay shared). See docs/fpd.md.
        denoise_scale: "n" (the paper and release: D's non-local term divided by H·W) or "nc"
            (divided by C·H·W, a fortify option).
        lateral_norm: BatchNorm after each decoder lateral conv (see :class:`FPDDecoder`).
        decoder: "linear" (the release: no activation after the lateral sum, kernel-2
            transposed convs, 1×1 output) or "activated" (fortify's earlier decoder; see
            :class:`FPDDecoder`).
        pyramid: "raw" (the release: the decoder reads every stage's output before D) or
            "denoised" (fortify's earlier wiring: the first level after D).
    """

    def __init__(
        self,
        backbone: nn.Module,
        stages: Sequence[str],
        image_shape: tuple[int, int, int],
        *,
        width: int = 256,
        bound: Bound = "tanh",
        middle: MiddleGram = "input",
        denoise_at: Sequence[str] | None = None,
        dropout: float = 0.0,
        activation: Activation = "relu",
        classifier: str | None = None,
        restore_weight: float = 1.0,
        bn_stats: BNStats = "shared",
        denoise_scale: DenoiseScale = "n",
        lateral_norm: bool = False,
        decoder: DecoderKind = "linear",
        pyramid: PyramidSource = "raw",
    ):
        super().__init__()
        if bound not in _BOUNDS:
            raise ConfigError(
                f"FPD option bound={bound!r} is not allowed; choose one of {list(_BOUNDS)}"
            )
        if middle not in _MIDDLE:
            raise ConfigError(
                f"FPD option middle={middle!r} is not allowed; choose one of {list(_MIDDLE)}"
            )
        if activation not in _ACTS:
            raise ConfigError(
                f"FPD option activation={activation!r} is not allowed; choose one of {list(_ACTS)}"
            )
        if bn_stats not in _BN_STATS:
            raise ConfigError(
                f"FPD option bn_stats={bn_stats!r} is not allowed; choose one of {list(_BN_STATS)}"
            )
        if denoise_scale not in _SCALES:
            raise ConfigError(
                f"FPD option denoise_scale={denoise_scale!r} is not allowed; choose one of "
                f"{list(_SCALES)}"
            )
        self.denoise_scale: str = denoise_scale
        if decoder not in _DECODERS:
            raise ConfigError(
                f"FPD option decoder={decoder!r} is not allowed; choose one of {list(_DECODERS)}"
            )
        if pyramid not in _PYRAMIDS:
            raise ConfigError(
                f"FPD option pyramid={pyramid!r} is not allowed; choose one of {list(_PYRAMIDS)}"
            )
        self.pyramid: str = pyramid
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"FPD option dropout must be in [0, 1), got {dropout}")
        if int(width) < 1:
            raise ConfigError(f"FPD option width must be >= 1, got {width}")
        if len(image_shape) != 3:
            raise ConfigError(f"FPD needs image_shape=(C, H, W), got {image_shape}")
        stages = list(stages)
        if not stages:
            raise ConfigError(
                "FPD needs the backbone's stage names (shallow to deep); the model registry has "
                "none for this backbone, so pass options.stages=[...], e.g. "
                "['layer1', 'layer2', 'layer3', 'layer4'] for a ResNet"
            )
        modules = dict(backbone.named_modules())
        missing = [s for s in stages if s not in modules or s == ""]
        if missing:
            top = ", ".join(n for n in modules if n and "." not in n)
            raise ConfigError(
                f"FPD expected backbone stages {stages} but {missing} not found; the backbone's "
                f"top-level modules are: {top}. Pass options.stages=[...] naming its stages"
            )
        self.net = backbone
        self.stages = stages
        self.image_shape = tuple(int(v) for v in image_shape)
        self.bound: str = bound
        self.middle: str = middle
        self.dropout = float(dropout)
        self.activation: str = activation
        self.denoise_at = list(denoise_at) if denoise_at is not None else ["stem", stages[0]]
        for pos in self.denoise_at:
            if pos != "stem" and pos not in modules:
                raise ConfigError(
                    f"FPD option denoise_at names {pos!r}, which is not a backbone module; use "
                    f"'stem' or module names such as {stages}"
                )
        self.classifier = classifier or next((n for n in _CLASSIFIER_NAMES if n in modules), "")
        if self.classifier not in modules or not isinstance(modules[self.classifier], nn.Linear):
            raise ConfigError(
                f"FPD needs the backbone's final nn.Linear; looked for "
                f"{[classifier] if classifier else list(_CLASSIFIER_NAMES)} and found "
                f"{type(modules.get(self.classifier)).__name__ if self.classifier else 'none'}. "
                "Pass options.classifier='<name>'"
            )

        if activation == "elu":
            n_relu = _replace_relu(backbone)
            if n_relu == 0 and not any(isinstance(m, nn.ELU) for m in backbone.modules()):
                raise ConfigError(
                    "FPD option activation='elu' replaces the backbone's nn.ReLU modules, but this "
                    "backbone has none (it uses functional ReLU); use activation='relu'"
                )
            log.info("FPD: replaced %d nn.ReLU modules of the backbone by ELU", n_relu)

        # Shapes of the pyramid (with the denoising hooks in place so nothing differs).
        self._pyramid: dict[int, torch.Tensor] = {}
        with self._denoise_hooks():
            shapes = infer_feature_shapes(backbone, stages, self.image_shape)
        c_in, h_in, w_in = self.image_shape
        stage_channels = [shapes[s][0] for s in stages]
        h2, w2 = shapes[stages[0]][1:]
        hl, wl = shapes[stages[-1]][1:]
        n_up = max(0, round(math.log2(max(h_in / h2, 1.0))))
        self.min_size = (_total_stride(h_in, hl), _total_stride(w_in, wl))
        if min(h_in, w_in) < _PROBE:
            # Below the backbone's total stride every deep level collapses to 1×1 and the
            # construction shapes cannot show it: measure the stride on a larger probe input.
            nominal = self._nominal_stride(backbone, stages[-1], c_in)
            if nominal is not None:
                self.min_size = (max(self.min_size[0], nominal), max(self.min_size[1], nominal))
            if h_in < self.min_size[0] or w_in < self.min_size[1]:
                raise self._too_small(
                    f"image_shape {h_in}×{w_in}",
                    " (or use a backbone with a smaller stride, e.g. the CIFAR stem, or fewer "
                    "stages)",
                )
        self.decoder = FPDDecoder(
            stage_channels,
            c_in,
            width=int(width),
            n_up=n_up,
            activation=activation,
            lateral_norm=bool(lateral_norm),
            kind=decoder,
        )
        self.aux = FPDAux(restore_weight)
        self.register_buffer(_FORMAT_KEY, torch.tensor(FORMAT_VERSION))
        self._register_load_state_dict_pre_hook(_check_format, with_module=True)
        self._register_load_state_dict_pre_hook(_explain_missing_back_stats, with_module=True)
        self.bn_stats: str = bn_stats
        self.back_stats = nn.ModuleDict()
        if bn_stats == "per-pass":
            for name, m in backbone.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    self.back_stats[_stat_key(name)] = BackPassStats(m)
        if bound == "spectral":
            lin = modules[self.classifier]
            parent_name, _, child = self.classifier.rpartition(".")
            parent = modules[parent_name] if parent_name else backbone
            setattr(parent, child, nn.utils.parametrizations.spectral_norm(lin))
        param = next(backbone.parameters(), None)
        if param is not None:
            self.decoder.to(param.device)
        log.info(
            "FPD on stages %s (channels %s), decoder width %d with %d upsamplings, bound=%s, "
            "min input %s",
            stages,
            stage_channels,
            width,
            n_up,
            bound,
            self.min_size,
        )

    def _nominal_stride(self, backbone: nn.Module, last: str, c_in: int) -> int | None:
        """Total stride before ``last`` measured on a ``_PROBE``² input (None if it cannot run)."""
        try:
            with self._denoise_hooks():
                shapes = infer_feature_shapes(backbone, [last], (c_in, _PROBE, _PROBE))
        except Exception as exc:  # e.g. a backbone with a fixed-size classifier input
            log.debug("FPD: stride probe at %d×%d failed (%s)", _PROBE, _PROBE, exc)
            return None
        h, w = shapes[last][1:]
        return max(_total_stride(_PROBE, h), _total_stride(_PROBE, w))

    # ---- hooks ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _denoise_hooks(self) -> Iterator[None]:
        modules = dict(self.net.named_modules())
        handles = []
        try:
            for pos in self.denoise_at:
                if pos == "stem":
                    handles.append(
                        modules[self.stages[0]].register_forward_pre_hook(
                            _Hooks(self, "pre_denoise")
                        )
                    )
                else:
                    handles.append(modules[pos].register_forward_hook(_Hooks(self, "post_denoise")))
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def _collect_hooks(self) -> Iterator[None]:
        modules = dict(self.net.named_modules())
        handles = [
            modules[s].register_forward_hook(_Hooks(self, "collect", i))
            for i, s in enumerate(self.stages)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._pyramid = {}

    @contextlib.contextmanager
    def _back_pass_stats(self) -> Iterator[None]:
        """Swap the back pass's BatchNorm statistics in (found by name each time, so layers
        replaced after construction, e.g. by ``SyncBatchNorm.convert_sync_batchnorm``, work)."""
        pairs = [
            (m, self.back_stats[_stat_key(name)])
            for name, m in self.net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and _stat_key(name) in self.back_stats
        ]

        def swap() -> None:
            for bn, stats in pairs:
                for b in _BN_BUFFERS:
                    bn._buffers[b], stats._buffers[b] = stats._buffers[b], bn._buffers[b]

        swap()
        try:
            yield
        finally:
            swap()

    @contextlib.contextmanager
    def _dropout_hook(self) -> Iterator[None]:
        lin = dict(self.net.named_modules())[self.classifier]
        handle = lin.register_forward_pre_hook(_Hooks(self, "dropout"))
        try:
            yield
        finally:
            handle.remove()

    # ---- passes --------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.image_shape[0]:
            raise DataError(
                f"FPD expects images (N, {self.image_shape[0]}, H, W), got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h < self.min_size[0] or w < self.min_size[1]:
            raise self._too_small(f"input {h}×{w}")

    def _too_small(self, what: str, hint: str = "") -> DataError:
        mh, mw = self.min_size
        return DataError(
            f"FPD {what} is smaller than the feature pyramid allows: this backbone downsamples "
            f"by {mh}×{mw} before its last stage {self.stages[-1]!r}, so inputs must be at "
            f"least {mh}×{mw}{hint}"
        )

    @contextlib.contextmanager
    def _front_hooks(self) -> Iterator[None]:
        """Denoising and pyramid collection for the front pass. Forward hooks run in the order
        they were registered: with ``pyramid="raw"`` the collection hooks come first, so they
        see each stage's output before D (the release's c2), and D then feeds the next stage."""
        if self.pyramid == "raw":
            with self._collect_hooks(), self._denoise_hooks():
                yield
        else:
            with self._denoise_hooks(), self._collect_hooks():
                yield

    def pyramid_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The front pass's pyramid c2..c5 (what the decoder reads), shallow → deep.

        Args: x: images (N, C, H, W) in [0, 1]. Returns: one (N, C_i, H_i, W_i) tensor per stage.
        """
        self._check_input(x)
        with self._front_hooks():
            self.net(x)
            return [self._pyramid[i] for i in range(len(self.stages))]

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Front pass + decoder only.

        Args: x: images (N, C, H, W) in [0, 1].
        Returns: the restored image x′ (N, C, H, W), in pixel units, unclamped.
        """
        self._check_input(x)
        with self._front_hooks():
            self.net(x)
            feats = [self._pyramid[i] for i in range(len(self.stages))]
        return self.decoder(feats, (x.shape[-2], x.shape[-1]))

    def forward_full(self, x: torch.Tensor) -> FPDOutput:
        """Both passes; returns bounded logits, pre-bound logits and x′ (see :class:`FPDOutput`)."""
        restored = self.restore(x)
        source = x if self.middle == "input" else restored
        x_mid = middle_denoise(restored, source)
        with self._denoise_hooks(), self._dropout_hook(), self._back_pass_stats():
            logits = self.net(x_mid)
        bounded = torch.tanh(logits) if self.bound == "tanh" else logits
        self.aux.record(restored=restored, logits=logits, bounded=bounded)
        return FPDOutput(bounded, logits, restored)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] → bounded logits (N, K)."""
        return self.forward_full(x).bounded

    def unbounded_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-bound logits (N, K) (before tanh); what honest white-box attacks should target."""
        return self.forward_full(x).logits

    # ---- parameter groups ----------------------------------------------------------------

    def phase1_parameters(self, which: Phase1Params = "front") -> list[nn.Parameter]:
        """The parameters updated in phase 1 (restoration loss above the threshold T).

        ``"front"`` (default): the decoder plus every backbone parameter that the front pass
        uses to build the pyramid — i.e. everything except the classification layer — because
        in FPD the front-denoising network *is* the shared backbone. ``"decoder"``: the decoder
        only (the backbone stays fixed until the restoration loss first drops below T).
        """
        if which == "decoder":
            return list(self.decoder.parameters())
        if which != "front":
            raise ConfigError(
                f"phase-1 parameter set {which!r} is not allowed; choose 'front' or 'decoder'"
            )
        head = {id(p) for p in dict(self.net.named_modules())[self.classifier].parameters()}
        backbone = [p for p in self.net.parameters() if id(p) not in head]
        return list(self.decoder.parameters()) + backbone

    def extra_repr(self) -> str:
        return (
            f"stages={self.stages}, bound={self.bound!r}, middle={self.middle!r}, "
            f"denoise_at={self.denoise_at}, dropout={self.dropout}, "
            f"activation={self.activation!r}, bn_stats={self.bn_stats!r}, "
            f"denoise_scale={self.denoise_scale!r}, decoder={self.decoder.kind!r}, "
            f"pyramid={self.pyramid!r}"
        )


def _total_stride(size_in: int, size_out: int) -> int:
    """Smallest power of two 2^k with ceil(size_in / 2^k) <= size_out: the downsampling factor
    of a chain of padded stride-2 layers that maps ``size_in`` to ``size_out``."""
    k = 0
    while math.ceil(size_in / 2**k) > size_out:
        k += 1
    return 2**k


def _replace_relu(module: nn.Module) -> int:
    """Replace every ``nn.ReLU`` child (recursively) by ``nn.ELU``; return how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.ELU())
            count += 1
        else:
            count += _replace_relu(child)
    return count


def find_fpd(model: nn.Module) -> FPD:
    """The :class:`FPD` inside ``model`` (itself, or wrapped by DDP / another wrapper)."""
    for m in model.modules():
        if isinstance(m, FPD):
            return m
    raise FortifyError(
        f"expected a model built with the 'fpd' defence, got a {type(model).__name__} without one"
    )


_OPTION_KEYS = {
    "stages",
    "width",
    "bound",
    "middle",
    "denoise_at",
    "dropout",
    "activation",
    "classifier",
    "restore_weight",
    "bn_stats",
    "denoise_scale",
    "lateral_norm",
    "decoder",
    "pyramid",
}


@register_defence("fpd")
def build_fpd(
    model: nn.Module,
    *,
    model_name: str,
    at: Sequence[str],
    options: dict[str, Any],
    num_classes: int,
    image_shape: tuple[int, int, int],
) -> FPD:
    """Defence builder for ``kind: fpd``: wrap ``model`` in :class:`FPD`.

    Stages come from ``options.stages``, else ``at``, else the registry's
    ``spec(model_name).stages``. Other options are the keyword arguments of :class:`FPD`.
    """
    unknown = sorted(set(options) - _OPTION_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown FPD option(s) {unknown}; allowed options: {sorted(_OPTION_KEYS)}"
        )
    opts = dict(options)
    stages = opts.pop("stages", None)
    if stages and at and list(stages) != list(at):
        raise ConfigError(f"FPD got stages twice (at={list(at)}, options.stages={list(stages)})")
    stages = list(stages or at or ())
    if not stages:
        from fortify.models import spec

        try:
            stages = list(spec(model_name).stages)
        except FortifyError:
            stages = []
    return FPD(model, stages, image_shape, **opts)

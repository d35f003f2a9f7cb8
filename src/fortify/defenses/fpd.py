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
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fortify.defenses.attach import infer_feature_shapes
from fortify.defenses.fpd_options import DenoiseScale, FPDOptions, Phase1Params
from fortify.defenses.fpd_parts import (
    BN_BUFFERS,
    FORMAT_KEY,
    FORMAT_VERSION,
    BackPassStats,
    FPDAux,
    FPDDecoder,
    denoise,
    middle_denoise,
    refuse_old_layouts,
    stat_key,
)
from fortify.defenses.registry import DefenceSpec, register_defence
from fortify.errors import ConfigError, DataError, FortifyError
from fortify.utils.shapes import as_chw, check_chw

log = logging.getLogger(__name__)

_CLASSIFIER_NAMES = ("linear", "fc", "classifier")
_PROBE = 64  # input side used to measure a backbone's total stride for small image shapes


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
        options, settings: :class:`~fortify.defenses.fpd_options.FPDOptions` (its ``stages``
            field is used by the builder only), or its fields as keyword arguments (which
            replace those of ``options`` when both are given).
    """

    def __init__(
        self,
        backbone: nn.Module,
        stages: Sequence[str],
        image_shape: tuple[int, int, int],
        *,
        options: FPDOptions | None = None,
        **settings: Any,
    ):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise ConfigError(
                f"FPD needs the backbone as an nn.Module, got {type(backbone).__name__}"
            )
        if (
            isinstance(stages, str)
            or not isinstance(stages, Sequence)
            or not all(isinstance(n, str) for n in stages)
        ):
            raise ConfigError(
                f"FPD stages must be a list of module names (shallow to deep), got {stages!r}"
            )
        check_chw(image_shape, "FPD image_shape")
        if options is None:
            opts = FPDOptions.from_dict(settings)
        elif not isinstance(options, FPDOptions):
            raise ConfigError(
                f"options must be an FPDOptions, got {type(options).__name__}; pass "
                "FPDOptions(...) or the options as keyword arguments"
            )
        else:
            opts = dataclasses.replace(options, **settings)
            opts.validate()
        self.options = opts
        width, bound, middle, denoise_at = opts.width, opts.bound, opts.middle, opts.denoise_at
        dropout, activation, classifier = opts.dropout, opts.activation, opts.classifier
        bn_stats, decoder, lateral_norm = opts.bn_stats, opts.decoder, opts.lateral_norm
        self.denoise_scale: DenoiseScale = opts.denoise_scale
        self.pyramid: str = opts.pyramid
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
            shapes = infer_feature_shapes(backbone, stages, as_chw(self.image_shape))
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
        self.aux = FPDAux(opts.restore_weight)
        self.register_buffer(FORMAT_KEY, torch.tensor(FORMAT_VERSION))
        self._register_load_state_dict_pre_hook(  # type: ignore[no-untyped-call]
            refuse_old_layouts, with_module=True
        )
        self.bn_stats: str = bn_stats
        self.back_stats = nn.ModuleDict()
        if bn_stats == "per-pass":
            for name, m in backbone.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    self.back_stats[stat_key(name)] = BackPassStats(m)
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
            (m, self.back_stats[stat_key(name)])
            for name, m in self.net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and stat_key(name) in self.back_stats
        ]

        def swap() -> None:
            for bn, stats in pairs:
                for b in BN_BUFFERS:
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


@register_defence("fpd")
def build_fpd(model: nn.Module, spec: DefenceSpec) -> FPD:
    """Defence builder for ``kind: fpd``: wrap ``model`` in :class:`FPD`.

    Stages come from ``options.stages``, else ``spec.at``, else the registry's
    ``spec(model_name).stages``. Other options: :class:`~fortify.defenses.fpd_options.FPDOptions`.
    """
    opts = FPDOptions.from_dict(spec.options)
    stages, at = opts.stages, spec.at
    if stages and at and list(stages) != list(at):
        raise ConfigError(f"FPD got stages twice (at={list(at)}, options.stages={list(stages)})")
    stages = list(stages or at or ())
    if not stages:
        from fortify.models import spec as model_spec

        try:
            stages = list(model_spec(spec.model_name).stages)
        except FortifyError:
            stages = []
    return FPD(model, stages, spec.image_shape, options=opts)

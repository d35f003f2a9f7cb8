"""FPD's options, written once: names, defaults (the release's), allowed values, meaning.

``defenses: [{kind: fpd, options: {...}}]`` in a config, ``FPD(backbone, stages, shape, **opts)``
and ``FPD(..., options=FPDOptions(...))`` all go through :class:`FPDOptions` and its
:meth:`~FPDOptions.validate`. See docs/fpd.md for what each option changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from fortify.defenses.registry import check_choice, check_number, options_from_dict
from fortify.errors import ConfigError, check_positive_int

Bound = Literal["tanh", "spectral", "none"]
MiddleGram = Literal["input", "restored"]
Activation = Literal["relu", "elu"]
Phase1Params = Literal["front", "decoder"]
BNStats = Literal["per-pass", "shared"]
DenoiseScale = Literal["n", "nc"]
DecoderKind = Literal["linear", "activated"]
PyramidSource = Literal["raw", "denoised"]

# option -> its allowed values (from the Literal types above), in the order they are checked
CHOICES: dict[str, tuple[str, ...]] = {
    "bound": get_args(Bound),
    "middle": get_args(MiddleGram),
    "activation": get_args(Activation),
    "bn_stats": get_args(BNStats),
    "denoise_scale": get_args(DenoiseScale),
    "decoder": get_args(DecoderKind),
    "pyramid": get_args(PyramidSource),
}

#: The options of FPD weights saved before the release structure (format 1).
LEGACY_OPTIONS = {"pyramid": "denoised", "decoder": "activated"}


@dataclass
class FPDOptions:
    """FPD options (defaults: the release).

    Attributes:
        stages: module names of the backbone's residual stages, shallow to deep (the pyramid
            c2..c5); None: the defence's ``at`` list, else the model registry's stages.
        width: common width of the decoder's lateral convs (release: 256).
        bound: "tanh" (release), "spectral" (spectrally normalised classifier weight, the
            Lipschitz-constrained layer the paper describes) or "none".
        middle: "input" (release: Gram term of the raw input) or "restored" (of x′).
        denoise_at: where D is applied in both passes; ``None`` means the release's
            ("stem", stages[0]); "stem" means the input of ``stages[0]``; other entries are
            module names (D on their output).
        dropout: dropout probability in [0, 1) before the classifier in the back pass
            (release: 0.5 for SVHN/Caltech, 0 for MNIST).
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
        lateral_norm: BatchNorm after each decoder lateral conv (see
            :class:`~fortify.defenses.fpd_parts.FPDDecoder`).
        decoder: "linear" (the release: no activation after the lateral sum, kernel-2
            transposed convs, 1×1 output) or "activated" (fortify's earlier decoder).
        pyramid: "raw" (the release: the decoder reads every stage's output before D) or
            "denoised" (fortify's earlier wiring: the first level after D).
    """

    stages: Sequence[str] | None = None
    width: int = 256
    bound: Bound = "tanh"
    middle: MiddleGram = "input"
    denoise_at: Sequence[str] | None = None
    dropout: float = 0.0
    activation: Activation = "relu"
    classifier: str | None = None
    restore_weight: float = 1.0
    bn_stats: BNStats = "shared"
    denoise_scale: DenoiseScale = "n"
    lateral_norm: bool = False
    decoder: DecoderKind = "linear"
    pyramid: PyramidSource = "raw"

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> FPDOptions:
        """Validated options from a config mapping (unknown keys: :class:`ConfigError`)."""
        return options_from_dict(cls, options, "FPD")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option and what it allows."""
        for name, allowed in CHOICES.items():
            check_choice("FPD", name, getattr(self, name), allowed)
        check_positive_int(self.width, "FPD option width")
        check_number("FPD", "dropout", self.dropout, low=0)
        if self.dropout >= 1:
            raise ConfigError(f"FPD option dropout must be in [0, 1), got {self.dropout!r}")
        check_number("FPD", "restore_weight", self.restore_weight, low=0)
        if not isinstance(self.lateral_norm, bool):
            raise ConfigError(
                f"FPD option lateral_norm must be true or false, got {self.lateral_norm!r}"
            )
        for name in ("stages", "denoise_at"):
            _check_names(name, getattr(self, name))
        if self.classifier is not None and (
            not isinstance(self.classifier, str) or not self.classifier
        ):
            raise ConfigError(
                "FPD option classifier must name the backbone's final nn.Linear (a module name) "
                f"or be null (found by name: linear, fc, classifier), got {self.classifier!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        """``{option: value}`` (values not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_names(option: str, value: object) -> None:
    """Raise :class:`ConfigError` unless ``value`` is None or a list of module names."""
    if value is None:
        return
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise ConfigError(
            f"FPD option {option} must be a list of module names (e.g. ['layer1', 'layer2']) "
            f"or null, got {value!r}"
        )


__all__ = ["CHOICES", "LEGACY_OPTIONS", "FPDOptions"]

"""Build a model (backbone + attached defences) from configuration; the one place that does it."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fortify.config.schema import DefenseConfig, ModelConfig
from fortify.defenses.registry import DefenceSpec, defence_builder
from fortify.models import create
from fortify.models.sources import check_logits, is_source
from fortify.utils.shapes import as_chw


def build_model(
    model_cfg: ModelConfig,
    defenses: Sequence[DefenseConfig],
    num_classes: int,
    image_shape: tuple[int, int, int],
    load_weights: bool = True,
) -> nn.Module:
    """Create the backbone named in ``model_cfg`` and apply each defence in order.

    Args:
        image_shape: (C, H, W) of one input image in [0, 1].
        load_weights: for model sources (``torchvision:…``, ``timm:…``, ``robustbench:…``,
            ``python:…``), load the source's pretrained weights; False builds the architecture
            only (rebuilding a checkpoint, whose tensors replace all weights).
    Raises:
        ConfigError: also when a model source does not map (2, C, H, W) images to (2, K) logits.
    """
    model = create(
        model_cfg.name,
        num_classes=num_classes,
        in_channels=image_shape[0],
        mean=model_cfg.mean,
        std=model_cfg.std,
        load_weights=load_weights,
        **model_cfg.kwargs,
    )
    if is_source(model_cfg.name):
        check_logits(model, model_cfg.name, num_classes, as_chw(image_shape))
    for d in defenses:
        chw = as_chw(image_shape)
        spec = DefenceSpec(model_cfg.name, list(d.at), dict(d.options), num_classes, chw)
        model = defence_builder(d.kind)(model, spec)
    return model

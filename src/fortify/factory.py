"""Build a model (backbone + attached defences) from configuration; the one place that does it."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fortify.config.schema import DefenseConfig, ModelConfig
from fortify.defenses.registry import DefenceSpec, defence_builder
from fortify.errors import ConfigError
from fortify.models import create
from fortify.models.sources import check_logits, is_source
from fortify.utils.shapes import check_chw


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
        ConfigError: a ``model_cfg`` that is not a :class:`ModelConfig`, ``defenses`` that are
            not :class:`DefenseConfig` s, an ``image_shape`` that is not three integers >= 1,
            or a model source that does not map (2, C, H, W) images to (2, K) logits.
    """
    if not isinstance(model_cfg, ModelConfig):
        raise ConfigError(
            f"model_cfg must be a ModelConfig (e.g. ModelConfig(name='resnet18')), got "
            f"{type(model_cfg).__name__}"
        )
    if isinstance(defenses, (str, bytes)) or not isinstance(defenses, Sequence):
        raise ConfigError(f"defenses must be a list of DefenseConfig, got {defenses!r}")
    for d in defenses:
        if not isinstance(d, DefenseConfig):
            raise ConfigError(f"defenses must hold DefenseConfig entries, got {d!r}")
        if isinstance(d.at, str) or not all(isinstance(n, str) for n in d.at):
            raise ConfigError(
                f"defence {d.kind!r}: at must be a list of module names (empty: the backbone's "
                f"default positions), got {d.at!r}"
            )
    image_shape = check_chw(image_shape, "image_shape")
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
        check_logits(model, model_cfg.name, num_classes, image_shape)
    for d in defenses:
        spec = DefenceSpec(model_cfg.name, list(d.at), dict(d.options), num_classes, image_shape)
        model = defence_builder(d.kind)(model, spec)
    return model

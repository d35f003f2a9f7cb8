"""A timm-style registry of backbones: ``create(name, num_classes, in_channels, **kwargs)``.

Every backbone maps images in [0, 1] of shape (N, C, H, W) to logits (N, K). Normalisation, if
any, is the model's own ``normalize`` submodule (identity by default), so ε is always measured
in pixel units.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fortify.errors import ConfigError, FortifyError
from fortify.models.sources import (
    available_sources,
    is_source,
    source_description,
    split_source,
)
from fortify.models.sources import build as build_source
from fortify.registry import Registry

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """Registry entry: the builder plus facts the rest of fortify may use."""

    name: str
    builder: Builder
    description: str = ""
    fsr_position: str | None = None  # default module name after which FSR is attached
    stages: tuple[str, ...] = ()  # names of the residual stages (used by FPD), shallow to deep


#: Every backbone; the modules of :mod:`fortify.models` register at import.
MODELS: Registry[ModelSpec] = Registry("model")


def register(
    name: str,
    *,
    description: str = "",
    fsr_position: str | None = None,
    stages: Sequence[str] = (),
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(num_classes=..., in_channels=..., **kwargs)``."""

    def deco(builder: Builder) -> Builder:
        MODELS.register(name, ModelSpec(name, builder, description, fsr_position, tuple(stages)))
        return builder

    return deco


def available() -> list[str]:
    """Names of all registered backbones."""
    return MODELS.available()


def spec(name: str) -> ModelSpec:
    """The registry entry for ``name`` (raises listing known names).

    A model source (``torchvision:resnet50``, see :mod:`fortify.models.sources`) gets an entry
    without default positions: defences on it name their modules explicitly.
    """
    if is_source(name):
        return ModelSpec(name, _source_builder(name), source_description(name))
    try:
        return MODELS.get(name)
    except FortifyError as err:
        raise type(err)(
            f"{err} Models from elsewhere: " + ", ".join(available_sources().values()) + "."
        ) from None


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` inside the model; buffers move with ``.to(device)``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    load_weights: bool = True,
    **kwargs: object,
) -> nn.Module:
    """Build backbone ``name``; with ``mean``/``std`` the model normalises its [0,1] input itself.

    Args:
        name: a registered name (see :func:`available`) or a model source
            (``torchvision:<name>``, ``timm:<name>``, ``robustbench:<dataset>/<threat>/<model>``,
            ``python:<module>:<callable>``; see :mod:`fortify.models.sources`).
        num_classes: K, the number of logits.
        in_channels: C of the (N, C, H, W) input images.
        mean, std: per-channel statistics in [0, 1] pixel units (``C`` values each); the model's
            ``normalize`` submodule then computes ``(x - mean) / std`` first in ``forward``.
        load_weights: for model sources, load the source's pretrained weights (False: the
            architecture only, e.g. when a fortify checkpoint overwrites every tensor anyway).
        kwargs: backbone options such as ``width`` (see :func:`describe_kwargs`); for model
            sources, the source's own options (passed through).
    Raises:
        FortifyError: unknown name (the message lists the known names).
        ConfigError: unknown keyword arguments, bad mean/std, bad option values.
    """
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model {name!r}: {what} must be an integer >= 1, got {value!r}")
    if not isinstance(load_weights, bool):
        raise ConfigError(f"load_weights must be True or False, got {load_weights!r}")
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std for in-model normalisation, or neither")
    if mean is not None and std is not None:
        for what, values in (("mean", mean), ("std", std)):
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
                raise ConfigError(
                    f"{what} must be a list of {in_channels} number(s), one per input channel "
                    f"(pixel units in [0, 1]), got {values!r}"
                )
        if len(mean) != in_channels or len(std) != in_channels:
            raise ConfigError(
                f"mean/std need {in_channels} values each (one per input channel), got "
                f"mean={list(mean)} std={list(std)}"
            )
        if not all(_number(s) and math.isfinite(s) and s > 0 for s in std):
            raise ConfigError(f"std values must be finite and > 0, got {list(std)}")
        if not all(_number(m) and math.isfinite(m) for m in mean):
            raise ConfigError(f"mean values must be finite numbers, got {list(mean)}")
    if is_source(name):
        return build_source(name, num_classes, in_channels, mean, std, dict(kwargs), load_weights)
    entry = spec(name)
    allowed = describe_kwargs(name)
    takes_any = any(
        prm.kind is inspect.Parameter.VAR_KEYWORD
        for prm in inspect.signature(entry.builder).parameters.values()
    )
    unknown = [] if takes_any else sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"model {name!r} does not accept option(s) {unknown}; allowed options: "
            f"{', '.join(f'{k}={v!r}' for k, v in allowed.items()) or 'none'}"
        )
    for option, given in kwargs.items():
        _check_option(name, option, given, allowed.get(option))
    try:
        model = entry.builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except FortifyError:
        raise
    except (TypeError, ValueError, ArithmeticError, AssertionError, RuntimeError) as exc:
        # e.g. a depth the architecture cannot have, reaching arithmetic inside the builder
        raise ConfigError(f"bad option for model {name!r} ({exc}); options: {allowed}") from exc
    if mean is not None and std is not None:
        model.normalize = Normalize(mean, std)
    return model


def _check_option(model: str, key: str, value: object, default: object) -> None:
    """Type and range of a backbone option, judged by its default: an integer option with a
    positive default (``width``, ``depth``, ...) must be an integer >= 1, a float option a
    finite number, a bool option a bool, a string option a string."""
    bad = None
    if isinstance(default, bool):
        bad = None if isinstance(value, bool) else "true or false"
    elif isinstance(default, int):
        least = 1 if default >= 1 else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            bad = f"an integer >= {least}"
    elif isinstance(default, float):
        finite = (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
        bad = None if finite else "a finite number"
    elif isinstance(default, str):
        bad = None if isinstance(value, str) else "a string"
    if bad is not None:
        raise ConfigError(
            f"model {model!r}: option {key}={value!r} is not allowed; {key} must be {bad} "
            f"(default {default!r})"
        )


def describe_kwargs(name: str) -> dict[str, object]:
    """Options of backbone ``name`` (beyond num_classes / in_channels) with their defaults.

    Model sources pass their options through to the source, so they list none here.
    """
    if is_source(name):
        split_source(name)
        return {}
    builder = spec(name).builder
    out: dict[str, object] = {}
    for pname, param in inspect.signature(builder).parameters.items():
        if pname in ("num_classes", "in_channels") or param.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            continue
        out[pname] = None if param.default is inspect.Parameter.empty else param.default
    return out


def _source_builder(name: str) -> Builder:
    def builder(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        return create(name, num_classes, in_channels, **kwargs)

    return builder

"""Model sources: networks that fortify does not define, under the one ``model.name`` syntax.

``create("<source>:<what>", num_classes, in_channels, mean=None, std=None, **kwargs)`` builds

=====================================  ==========================================================
name                                   network
=====================================  ==========================================================
``torchvision:<name>``                 ``torchvision.models.get_model(name, **kwargs)``;
                                       ``weights=<enum member>`` (e.g. ``DEFAULT``) for
                                       pretrained weights
``timm:<name>``                        ``timm.create_model(name, **kwargs)`` (``fortify[timm]``);
                                       ``pretrained=true`` with ``pretrained_file=PATH`` or
                                       ``download=true``
``robustbench:<dataset>/<threat>/<m>`` the ``robustbench`` package's own architecture of zoo
                                       entry ``m`` with the weights file from its local model
                                       directory (``model_dir``, default ``./models``)
``python:<module>:<callable>``         ``callable(**kwargs)`` from the user's code (also given
                                       ``num_classes`` / ``in_channels`` when it accepts them)
=====================================  ==========================================================

Every source becomes a normal fortify model: images in [0, 1] (N, C, H, W) → logits (N, K).
The network keeps its own module names (``layer4`` of a torchvision ResNet is still
``layer4``, so defences attach by those names) and its own state-dict keys; fortify adds a
``normalize`` submodule (a :class:`~fortify.models.registry.Normalize`, applied by a forward
pre-hook before the network's own ``forward``) and a forward hook that turns tuple/dict outputs
(torchvision's Inception/GoogLeNet in training mode) into plain logits. Plain containers
(``nn.Sequential`` …) are wrapped instead (:class:`SourceNet`, names gain ``net.``), because a
container would run an added child as a layer.

Normalisation comes from, in order: ``mean``/``std`` given to :func:`create` (config
``model.mean``/``model.std``); the source's pretrained configuration (torchvision weights'
transforms, timm's ``pretrained_cfg``) when its pretrained weights are loaded; otherwise none
(mean 0, std 1). RobustBench models normalise inside their own wrappers, so fortify adds none.
``normalize.mean``/``normalize.std`` are buffers, so a checkpoint carries them and rebuilding
does not need the pretrained weights again.

Nothing is downloaded unless the source's kwargs say ``download: true``; a missing file raises
:class:`~fortify.errors.CheckpointError` saying which file to put where.

``load_weights=False`` (used when a fortify checkpoint is rebuilt) builds the architecture only:
the checkpoint overwrites every tensor anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fortify.errors import ConfigError, DataError, FortifyError
from fortify.registry import Registry
from fortify.utils.probe import dry_forward

log = logging.getLogger(__name__)

SEPARATOR = ":"


@dataclass
class Built:
    """What a source builder returns: the network and the normalisation its weights expect."""

    module: nn.Module
    mean: list[float] | None = None
    std: list[float] | None = None
    origin: str = ""  # where mean/std came from, for the log


SourceBuilder = Callable[[str, int, int, dict[str, Any], bool], Built]


@dataclass(frozen=True)
class Source:
    """A registered source: ``builder(what, num_classes, in_channels, kwargs, load_weights)``."""

    prefix: str
    builder: SourceBuilder
    syntax: str
    description: str


#: Every model source, by prefix (the sources below register at import).
SOURCES: Registry[Source] = Registry("model source")


def register_source(
    prefix: str, *, syntax: str, description: str
) -> Callable[[SourceBuilder], SourceBuilder]:
    """Decorator registering a model source under ``<prefix>:...``."""

    def deco(fn: SourceBuilder) -> SourceBuilder:
        SOURCES.register(prefix, Source(prefix, fn, syntax, description))
        return fn

    return deco


def is_source(name: str) -> bool:
    """True for ``<source>:<...>`` names (registered backbones never contain ':')."""
    return isinstance(name, str) and SEPARATOR in name


def available_sources() -> dict[str, str]:
    """``{prefix: syntax}`` of every model source."""
    return {p: s.syntax for p, s in SOURCES.items()}


def split_source(name: str) -> tuple[Source, str]:
    """(source, the part after ``<prefix>:``) or a :class:`ConfigError` listing the sources."""
    prefix, _, what = name.partition(SEPARATOR)
    if prefix not in SOURCES:
        raise ConfigError(
            f"unknown model source {prefix!r} in model name {name!r}; sources: "
            + ", ".join(s.syntax for _, s in SOURCES.items())
            + " (or a registered backbone name without ':')"
        )
    if not what:
        raise ConfigError(
            f"model name {name!r} is incomplete; expected {SOURCES.get(prefix).syntax}"
        )
    return SOURCES.get(prefix), what


def source_description(name: str) -> str:
    """One line describing source model ``name`` (for listings and the ModelSpec)."""
    src, _ = split_source(name)
    return src.description


# --------------------------------------------------------------------------- the adaptation


class SourceNet(nn.Module):
    """Wrapper for a plain-container source (``nn.Sequential`` …): ``normalize`` then ``net``."""

    def __init__(self, net: nn.Module, normalize: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _normalize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: ``model(x)`` first computes ``model.normalize(x)``."""
    if not args:
        return None
    normalize: nn.Module = module.get_submodule("normalize")
    return (normalize(args[0]), *args[1:])


def plain_logits(module: nn.Module, inputs: tuple[Any, ...], output: object) -> torch.Tensor:
    """Forward hook: tuple / namedtuple / dict outputs → the logits tensor, else a DataError."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    raise DataError(
        f"{type(module).__name__} returned a {type(output).__name__}, not logits; fortify models "
        "must map images to a logits tensor (N, K) — wrap the network so forward returns logits"
    )


def adapt(
    net: nn.Module,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> nn.Module:
    """Give ``net`` fortify's in-model ``normalize`` and plain-logits output (see module doc)."""
    from fortify.models.registry import Normalize

    mean = list(mean) if mean is not None else [0.0] * in_channels
    std = list(std) if std is not None else [1.0] * in_channels
    normalize = Normalize(mean, std)
    if isinstance(net, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        model: nn.Module = SourceNet(net, normalize)
    else:
        taken = getattr(net, "normalize", None)
        if taken is not None:
            raise ConfigError(
                f"{type(net).__name__} already has an attribute 'normalize' "
                f"({type(taken).__name__}); fortify keeps its input normalisation there — rename "
                "the attribute in your network"
            )
        net.normalize = normalize
        net.register_forward_pre_hook(_normalize_input)
        model = net
    model.register_forward_hook(plain_logits)
    return model


def build(
    name: str,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    kwargs: dict[str, Any],
    load_weights: bool = True,
) -> nn.Module:
    """Build source model ``name``; see the module docstring. ``mean``/``std`` override the
    source's own normalisation."""
    src, what = split_source(name)
    try:
        built = src.builder(what, num_classes, in_channels, dict(kwargs), load_weights)
    except FortifyError:
        raise
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"cannot build model {name!r} with options {kwargs}: {exc}") from exc
    if not isinstance(built.module, nn.Module):
        raise ConfigError(
            f"model {name!r} produced a {type(built.module).__name__}, not a torch.nn.Module"
        )
    if mean is not None and std is not None:
        use_mean, use_std, origin = list(mean), list(std), "model.mean/model.std"
    elif built.mean is not None and built.std is not None:
        use_mean, use_std, origin = built.mean, built.std, built.origin
    else:
        use_mean, use_std, origin = None, None, "none"
    if use_mean is None:
        log.info("model %s: no input normalisation (inputs stay in [0, 1])", name)
    else:
        log.info(
            "model %s: input normalisation from %s: mean %s, std %s",
            name,
            origin,
            use_mean,
            use_std,
        )
    return adapt(built.module, in_channels, use_mean, use_std)


def check_logits(
    model: nn.Module, name: str, num_classes: int, image_shape: tuple[int, int, int]
) -> None:
    """One forward pass (eval mode, no grad): raise :class:`ConfigError` unless the output is
    (N, num_classes) logits for (N, C, H, W) = (2, *image_shape) inputs."""
    try:
        out = dry_forward(model, image_shape)
    except FortifyError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"model {name!r} cannot process images of shape (C, H, W) = {tuple(image_shape)}: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"model {name!r} returns {type(out).__name__} for a batch of images; expected a "
            f"tensor of logits of shape (2, {num_classes})"
        )
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(
            f"model {name!r} returns an output of shape {tuple(out.shape)} for 2 images; expected "
            f"logits of shape (2, {num_classes}) — check its num_classes / head"
        )


# The built-in sources (torchvision, timm, robustbench, python) register themselves on import.
from fortify.models.source_kinds import import_callable, robustbench_entry  # noqa: E402

__all__ = [
    "Built",
    "Source",
    "SourceNet",
    "adapt",
    "available_sources",
    "build",
    "check_logits",
    "import_callable",
    "is_source",
    "register_source",
    "robustbench_entry",
    "source_description",
    "split_source",
]

"""Registry of defence kinds. A builder takes a backbone and returns the defended model.

``builder(model, spec: DefenceSpec) -> nn.Module``; :class:`DefenceSpec` carries what the
config asks for (positions ``at``, empty: the backbone's default; the ``options`` dict) and the
facts of the backbone (registry name, number of classes, (C, H, W) image shape). The returned
model's ``forward(x)`` returns logits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from torch import nn

from fortify.errors import ConfigError
from fortify.registry import Registry
from fortify.utils.shapes import as_chw

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefenceSpec:
    """One ``defenses[]`` entry of a config applied to a backbone.

    Attributes:
        model_name: the backbone's registry name (for default positions).
        at: module names to attach after (empty: the defence's default for the backbone).
        options: the entry's ``options`` dict (validated by the defence's options dataclass).
        num_classes: number of classes of the backbone's logits.
        image_shape: (C, H, W) of one input image.
    """

    model_name: str
    at: Sequence[str]
    options: dict[str, Any]
    num_classes: int
    image_shape: tuple[int, int, int]


DefenceBuilder = Callable[[nn.Module, DefenceSpec], nn.Module]
_Opts = TypeVar("_Opts")

#: Every defence kind; the defence modules of :mod:`fortify.defenses` register at import.
DEFENCES: Registry[DefenceBuilder] = Registry("defence")


def register_defence(kind: str) -> Callable[[DefenceBuilder], DefenceBuilder]:
    """Decorator registering a defence builder as ``kind`` (the config's ``defenses[].kind``)."""

    def deco(fn: DefenceBuilder) -> DefenceBuilder:
        return DEFENCES.register(kind, fn)

    return deco


def defence_builder(kind: str) -> DefenceBuilder:
    """The builder of defence ``kind`` (an unknown kind raises listing the known ones)."""
    return DEFENCES.get(kind)


def available_defences() -> list[str]:
    """Every registered defence kind, sorted."""
    return DEFENCES.available()


def options_from_dict(cls: type[_Opts], options: dict[str, Any], kind: str) -> _Opts:
    """Build the options dataclass ``cls`` of defence ``kind`` from a config dict and validate it.

    Unknown keys raise :class:`ConfigError` listing the allowed ones.
    """
    allowed = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown {kind} option(s) {unknown}; allowed options: {allowed}")
    opts = cls(**options)
    opts.validate()  # type: ignore[attr-defined]
    return opts


BlockAttach = Callable[[nn.Module, list[str], int, tuple[int, int, int], Any], nn.Module]


def register_block_defence(
    kind: str,
    label: str,
    options_cls: type[Any],
    attach: BlockAttach,
    default_at: Callable[[nn.Module, str], list[str]],
) -> DefenceBuilder:
    """Register the config builder of a defence that attaches one block kind at named layers.

    The builder validates ``options`` into ``options_cls``, uses ``default_at(model,
    model_name)`` when the config's ``at`` is empty, logs where the blocks go and calls
    ``attach(model, positions, num_classes, (C, H, W), opts)``.
    """

    def build(model: nn.Module, spec: DefenceSpec) -> nn.Module:
        opts = options_from_dict(options_cls, spec.options, label)
        positions = list(spec.at) or default_at(model, spec.model_name)
        log.info("attaching %s after %s (%s)", label, positions, opts)
        return attach(model, positions, spec.num_classes, as_chw(spec.image_shape), opts)

    build.__doc__ = f"Config builder of ``kind: {kind}`` ({label} blocks)."
    return register_defence(kind)(build)


def check_number(kind: str, name: str, value: object, *, low: float, strict: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number ≥ ``low`` (> if strict)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(float(value))  # type: ignore[arg-type]
    ok = ok and (float(value) > low if strict else float(value) >= low)  # type: ignore[arg-type]
    if not ok:
        raise ConfigError(
            f"{kind} option {name} must be a finite number {'>' if strict else '>='} {low:g}, "
            f"got {value!r}"
        )


def check_choice(kind: str, name: str, value: object, allowed: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(
            f"{kind} option {name}={value!r} is not allowed; choose one of {list(allowed)}"
        )


def stage_positions(model_name: str, kind: str) -> list[str]:
    """The residual stages of a registered backbone (shallow to deep), for default placements.

    Backbones without stages fall back to their FSR position (the last feature block).
    """
    from fortify.models import spec

    entry = spec(model_name)
    if entry.stages:
        return list(entry.stages)
    if entry.fsr_position:
        return [entry.fsr_position]
    raise ConfigError(
        f"model {model_name!r} has no known stages, so {kind} has no default position; "
        "list module names in defenses[].at"
    )


def last_stage(kind: str) -> Callable[[nn.Module, str], list[str]]:
    """A ``default_at`` for :func:`register_block_defence`: the two blocks of the backbone's
    last stage (:func:`last_stage_blocks`; the CAS and CIFS papers' placement)."""
    return lambda model, model_name: last_stage_blocks(model, model_name, kind)


def last_stage_blocks(model: nn.Module, model_name: str, kind: str, count: int = 2) -> list[str]:
    """Names of the last ``count`` blocks of a backbone's last stage (e.g. layer4.0, layer4.1).

    Backbones without stages (or with a last stage of fewer blocks) give their last stage or FSR
    position alone.
    """
    from fortify.models import spec

    last = stage_positions(model_name, kind)[-1]
    if not spec(model_name).stages:
        return [last]
    module = dict(model.named_modules())[last]
    children = [f"{last}.{name}" for name, _ in module.named_children()]
    return children[-count:] if len(children) >= count else [last]

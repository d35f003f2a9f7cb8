"""Registry of defence kinds. A builder takes a backbone and returns the defended model.

``builder(model, *, model_name, at, options, num_classes, image_shape) -> nn.Module`` where
``at`` is the list of positions from the config (empty: the backbone's default) and
``image_shape`` is (C, H, W). The returned model's ``forward(x)`` returns logits.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fortify.errors import unknown_name

DefenceBuilder = Callable[..., nn.Module]
_BUILDERS: dict[str, DefenceBuilder] = {}


def register_defence(kind: str) -> Callable[[DefenceBuilder], DefenceBuilder]:
    def deco(fn: DefenceBuilder) -> DefenceBuilder:
        _BUILDERS[kind] = fn
        return fn

    return deco


def defence_builder(kind: str) -> DefenceBuilder:
    _ensure_loaded()
    if kind not in _BUILDERS:
        raise unknown_name("defence", kind, _BUILDERS)
    return _BUILDERS[kind]


def available_defences() -> list[str]:
    _ensure_loaded()
    return sorted(_BUILDERS)


def _ensure_loaded() -> None:
    import importlib

    for mod in ("fortify.defenses.fsr", "fortify.defenses.fpd"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # a defence module not written yet
            if exc.name != mod:
                raise

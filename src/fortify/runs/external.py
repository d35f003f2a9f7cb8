"""Models that are not fortify runs: a model name (backbone or source) plus an optional weights
file, turned into ``(model, meta)`` like :func:`fortify.runs.load_model` returns.

Weights files: ``.safetensors`` (read with safetensors) or a PyTorch ``.pth``/``.pt`` read with
``torch.load(weights_only=True)`` — a plain state dict, or one wrapped in
``{"state_dict"|"model"|"net": ...}``. DataParallel's ``module.`` and wrapper ``model.``
prefixes are removed when that makes the keys fit (see
:func:`fortify.importers._release.match_state_dict`). A file without ``normalize.mean/std``
keeps the model's normalisation (from the source, or ``mean``/``std``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fortify.errors import CheckpointError
from fortify.utils.shapes import as_chw

log = logging.getLogger(__name__)

NORMALIZE_KEYS = ("normalize.mean", "normalize.std")


def read_weights_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt`` (never arbitrary unpickling)."""
    from fortify.importers._release import read_release_state_dict

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{str(p)!r} is not a readable safetensors file: {exc}") from exc
        return {k: v for k, v in state.items() if not k.startswith("extra::")}
    return read_release_state_dict(
        p, "expected a state_dict saved with torch.save, or .safetensors"
    )


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> list[str]:
    """Load the weights file ``path`` into ``model`` (strict); return the key changes applied."""
    from fortify.importers._release import match_state_dict
    from fortify.runs.checkpoint import apply_state

    state = read_weights_file(path)
    own = model.state_dict()
    state, changes = match_state_dict(state, set(own))
    for key in NORMALIZE_KEYS:
        if key in own and key not in state:
            state[key] = own[key]
    apply_state(model, state, strict=True, source=f"weights file {Path(path).name}")
    return changes


def load_source_model(
    name: str,
    *,
    num_classes: int,
    image_shape: Sequence[int],
    weights: str | os.PathLike[str] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    data: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Build model ``name`` (a backbone or a source such as ``timm:resnet18``) for
    ``num_classes`` classes and (C, H, W) = ``image_shape`` inputs, load ``weights`` if given
    (otherwise the source's own pretrained weights, if its kwargs ask for them), and return
    ``(model.eval(), meta)`` with a checkpoint-style ``meta`` (``config``, ``num_classes``,
    ``image_shape``, ``source``).
    """
    from fortify.config import ExperimentConfig, from_dict, to_dict
    from fortify.factory import build_model
    from fortify.utils.runtime import resolve_device

    cfg = from_dict(
        ExperimentConfig,
        {
            "name": name.replace(":", "-").replace("/", "-"),
            "data": dict(data or {}),
            "model": {
                "name": name,
                "kwargs": dict(kwargs or {}),
                "mean": None if mean is None else [float(v) for v in mean],
                "std": None if std is None else [float(v) for v in std],
            },
        },
    )
    shape = as_chw(image_shape)
    model = build_model(cfg.model, [], num_classes, shape, load_weights=weights is None)
    changes: list[str] = []
    if weights is not None:
        changes = load_weights(model, weights)
        log.info("loaded %s into %s (%s)", weights, name, ", ".join(changes) or "keys as saved")
    model.to(resolve_device(device)).eval()
    meta = {
        "config": to_dict(cfg),
        "num_classes": num_classes,
        "image_shape": list(shape),
        "source": {
            "model": name,
            "weights": None if weights is None else str(Path(weights).resolve()),
            "key_changes": changes,
        },
    }
    return model, meta

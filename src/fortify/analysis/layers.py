"""Which modules of a model a defence can attach after, with their feature shapes.

A module is attachable when, in one forward pass, it runs exactly once and outputs a 4-D
feature map (N, C, H, W) — what :func:`fortify.defenses.attach` requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fortify.defenses.attach import DEFENSES_ATTR
from fortify.utils.probe import dry_forward_observed


@dataclass(frozen=True)
class Layer:
    """One named module: its type, output shape (C, H, W) or a description, calls per forward."""

    name: str
    kind: str
    shape: tuple[int, ...] | None
    calls: int

    @property
    def attachable(self) -> bool:
        return self.calls == 1 and self.shape is not None and len(self.shape) == 3

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind,
            "shape": None if self.shape is None else list(self.shape),
            "calls": self.calls,
            "attachable": self.attachable,
        }


def list_layers(model: nn.Module, input_shape: tuple[int, int, int]) -> list[Layer]:
    """Every named module (definition order) with its output shape for one (C, H, W) image.

    Runs one forward pass of two zero images in eval mode without gradients; the model's mode is
    restored. Modules of attached defences (``fortify_defenses.*``) and the input ``normalize``
    are skipped.
    """
    modules = [
        (n, m)
        for n, m in model.named_modules()
        if n and not n.startswith(DEFENSES_ATTR) and n.split(".")[0] != "normalize"
    ]
    seen: dict[str, list[Any]] = {n: [0, None] for n, _ in modules}  # [calls, output shape]

    def observe(name: str, out: object) -> None:
        seen[name][0] += 1
        if isinstance(out, torch.Tensor) and out.dim() >= 2:
            seen[name][1] = tuple(out.shape[1:])

    dry_forward_observed(model, input_shape, modules, observe)
    return [Layer(n, type(m).__name__, seen[n][1], seen[n][0]) for n, m in modules]


def layers_table(layers: list[Layer], all_layers: bool = False) -> str:
    """Markdown table of the attachable layers (``all_layers``: every module, marked)."""
    rows = [x for x in layers if all_layers or x.attachable]
    lines = ["| layer | type | output (C, H, W) | attachable |", "|---|---|---|---|"]
    for x in rows:
        shape = "—" if x.shape is None else "×".join(str(v) for v in x.shape)
        note = (
            "yes"
            if x.attachable
            else (
                "not run"
                if x.calls == 0
                else f"no ({x.calls} calls)"
                if x.calls > 1
                else "no (not 4-D)"
            )
        )
        lines.append(f"| `{x.name}` | {x.kind} | {shape} | {note} |")
    return "\n".join(lines)

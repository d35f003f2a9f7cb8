"""One dry forward pass to learn a model's shapes (hooks, output checks)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def dry_forward(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2) -> object:
    """``model(zeros(batch, *input_shape))`` on the model's device in eval mode without
    gradients; the training mode is restored afterwards, whatever happens. Returns the output."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return model(torch.zeros(batch, *input_shape, device=device))
    finally:
        model.train(was_training)


def dry_forward_observed(
    model: nn.Module,
    input_shape: tuple[int, ...],
    watch: Iterable[tuple[str, nn.Module]],
    observe: Callable[[str, object], None],
) -> object:
    """:func:`dry_forward` calling ``observe(name, output)`` after every forward of each watched
    ``(name, module)``; the hooks are removed afterwards, whatever happens."""

    def hook_for(name: str) -> Callable[[nn.Module, tuple[object, ...], object], None]:
        return lambda _module, _inputs, out: observe(name, out)

    handles = [module.register_forward_hook(hook_for(name)) for name, module in watch]
    try:
        return dry_forward(model, input_shape)
    finally:
        for h in handles:
            h.remove()

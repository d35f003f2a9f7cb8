"""One dry forward pass to learn a model's shapes (hooks, output checks)."""

from __future__ import annotations

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

"""Helpers shared by the backbones: input checks, activations, weight initialisation."""

from __future__ import annotations

import torch
from torch import nn

from fortify.errors import ConfigError, DataError

ACTIVATIONS = ("relu", "elu")


def make_activation(name: str) -> nn.Module:
    """A fresh activation module: ``"relu"`` (default everywhere) or ``"elu"`` (FPD release)."""
    if name == "relu":
        return nn.ReLU(inplace=False)
    if name == "elu":
        return nn.ELU(inplace=False)
    raise ConfigError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")


def check_input(x: torch.Tensor, in_channels: int, model_name: str) -> None:
    """Raise :class:`DataError` unless ``x`` is an (N, in_channels, H, W) tensor.

    Catches the common mistake of feeding RGB images to a 1-channel model (or vice versa) with a
    message that says what the model expects, instead of a low-level convolution error.
    """
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{model_name} expects a tensor of images, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise DataError(
            f"{model_name} expects images of shape (N, {in_channels}, H, W) in [0, 1], got a "
            f"tensor of shape {tuple(x.shape)}; build the model with in_channels matching the "
            "data (e.g. 1 for MNIST / digits, 3 for CIFAR / SVHN)"
        )


def init_conv_bn_linear(model: nn.Module, linear_std: float | None = None) -> None:
    """Kaiming-normal (fan_out) convolutions, BN weight 1 / bias 0, linear biases 0.

    With ``linear_std`` the linear weights are drawn from N(0, linear_std²); otherwise PyTorch's
    default linear initialisation is kept.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_parameters(model: nn.Module, exclude_prefixes: tuple[str, ...] = ()) -> int:
    """Number of parameter elements, skipping parameters whose name starts with a prefix.

    Shared (tied) parameters are counted once.
    """
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if any(name == pre or name.startswith(pre + ".") for pre in exclude_prefixes):
            continue
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total

"""Small CNNs sized for 28×28 (MNIST / Fashion-MNIST) and 8×8 (digits) inputs."""

from __future__ import annotations

import torch
from torch import nn

from fortify.models._common import check_input
from fortify.models.registry import register


class SmallCNN(nn.Module):
    """conv-bn-relu ×2 → pool → conv-bn-relu ×2 → pool → linear head.

    Module names: ``normalize``, ``features`` (Sequential of two stages ``features.0``,
    ``features.1``), ``pool``, ``linear``. Works for any input ≥ 8×8 via adaptive pooling.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        w = width
        self.in_channels = in_channels
        self.normalize: nn.Module = nn.Identity()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(stage(in_channels, w), stage(w, 2 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, "small-cnn")
        out = self.features(self.normalize(x))
        return self.linear(torch.flatten(self.pool(out), 1))


@register("small-cnn", description="4-conv CNN for 28×28 / 8×8 inputs", fsr_position="features.1")
def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width)

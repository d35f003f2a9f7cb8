"""Pre-activation ResNet-18 (He et al. 2016) in the layout common in adversarial-training code.

Module names: ``normalize``, ``conv1`` (3×3 stem, no BN), ``layer1..layer4`` of
:class:`PreActBlock` (``bn1, conv1, bn2, conv2, shortcut``; ``shortcut`` is a Sequential holding
one 1×1 conv ``shortcut.0`` when the shape changes, else empty), then the final ``bn`` and
``relu`` (an ``nn.ReLU`` module, so a hook after ``relu`` sees the final activated features:
512×4×4 at 32×32 input), ``avgpool`` (adaptive) and ``linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fortify.errors import check_positive_int
from fortify.models._common import check_input, init_conv_bn_linear
from fortify.models.registry import register


class PreActBlock(nn.Module):
    """BN-ReLU-conv ×2; the projection shortcut (if any) takes the first activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            )
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if len(self.shortcut) > 0 else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Pre-activation ResNet: [0, 1] images (N, C, H, W) → logits (N, num_classes)."""

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        name: str = "preact-resnet18",
    ):
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(in_channels, "in_channels")
        check_positive_int(width, f"{name} width")
        self.model_name = name
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.normalize: nn.Module = nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self._in_planes = width
        self.layer1 = self._make_layer(width, num_blocks[0], 1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], 2)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], 2)
        self.feature_dim = 8 * width
        self.bn = nn.BatchNorm2d(self.feature_dim)
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(self.feature_dim, num_classes)
        init_conv_bn_linear(self)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self._in_planes, planes, s))
            self._in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) → final activated features (N, feature_dim, h, w)."""
        check_input(x, self.in_channels, self.model_name)
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.relu(self.bn(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] → logits (N, num_classes)."""
        return self.linear(torch.flatten(self.avgpool(self.forward_features(x)), 1))


@register(
    "preact-resnet18",
    description="pre-activation ResNet-18 with final bn+relu; kwargs: width (64)",
    fsr_position="relu",
    stages=("layer1", "layer2", "layer3", "layer4"),
)
def preact_resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> PreActResNet:
    """Pre-activation ResNet-18: 11,172,170 parameters for 10 classes at width 64."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, width)

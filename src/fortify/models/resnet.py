"""CIFAR-style ResNets (3×3 stem, no max-pool) with the module names of the FSR / RiFT releases.

Module names (ResNet-18): ``normalize``, ``conv1``, ``bn1``, ``act`` (stem activation),
``maxpool`` (identity for the CIFAR stem), ``layer1..layer4`` (each a Sequential of blocks, so
``layer2.1.conv2`` is the second 3×3 conv of the second block of stage 2), ``avgpool``
(adaptive, 1×1), ``linear``. A :class:`BasicBlock` holds ``conv1, bn1, conv2, bn2, shortcut``;
``shortcut`` is a Sequential (``shortcut.0`` 1×1 conv, ``shortcut.1`` BN) or empty for identity.
:class:`Bottleneck` adds ``conv3, bn3``. Each block's activation module is ``act`` (used after
every conv-BN and after the residual sum, so a hook on ``layerK.i.act`` fires several times per
forward; hook ``layerK`` or ``layerK.i`` for the block output). The output of ``layer4`` is
post-activation: a hook after ``layer4`` sees the final features, e.g. 512×4×4 at 32×32 input.

``stem="imagenet"`` uses a 7×7 stride-2 ``conv1`` and a 3×3 stride-2 ``maxpool`` (input 224×224 →
56×56 after the stem); ``activation="elu"`` swaps every ReLU for ELU (FPD release). Adaptive
pooling means any input of at least 8×8 works (CIFAR stem: 32×32 → layer4 is 4×4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fortify.errors import ConfigError, check_positive_int
from fortify.models._common import check_input, init_conv_bn_linear
from fortify.models._common import make_activation as _act
from fortify.models.registry import register

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN pairs plus a (projection) shortcut; output channels = ``planes``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, activation: str = "relu"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)
        self.act = _act(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (strided) → 1×1 expand (×4) with a (projection) shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, activation: str = "relu"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)
        self.act = _act(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class ResNet(nn.Module):
    """A 4-stage ResNet mapping [0, 1] images (N, C, H, W) to logits (N, num_classes).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        num_blocks: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        width: channels of the first stage (64 in the papers; 8–16 for CPU experiments); stage k
            has ``width·2^(k-1)·block.expansion`` output channels.
        stem: ``"cifar"`` (3×3 stride-1 conv, no max-pool) or ``"imagenet"`` (7×7 stride-2 conv
            and 3×3 stride-2 max-pool).
        activation: ``"relu"`` or ``"elu"``.
        pool_grid: the head pools ``layer4`` to a ``pool_grid``×``pool_grid`` grid (adaptive
            average) and its ``linear`` takes ``feature_dim·pool_grid²`` inputs (flattened
            channel-major). 1 (default) is global average pooling. 2 is the RiFT release's
            Tiny-ImageNet head: ``avg_pool2d(·, 4)`` of the 8×8 ``layer4`` at 64×64 input
            feeding a 2048-input linear (ResNet-18/34).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        stem: str = "cifar",
        activation: str = "relu",
        name: str = "resnet",
        pool_grid: int = 1,
    ):
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(in_channels, "in_channels")
        check_positive_int(width, f"{name} width")
        if len(num_blocks) != 4:
            raise ConfigError(f"{name} needs 4 stage depths, got {list(num_blocks)}")
        for n in num_blocks:
            check_positive_int(n, f"{name} blocks per stage")
        check_positive_int(pool_grid, f"{name} pool_grid")
        if stem not in STEMS:
            raise ConfigError(f"{name} stem {stem!r} is not allowed; choose one of {list(STEMS)}")
        self.model_name = name
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.normalize: nn.Module = nn.Identity()
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = _act(activation)
        self._in_planes = width
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1, activation)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], 2, activation)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], 2, activation)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], 2, activation)
        self.feature_dim = 8 * width * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(pool_grid)
        self.linear = nn.Linear(self.feature_dim * pool_grid * pool_grid, num_classes)
        init_conv_bn_linear(self)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, n: int, stride: int, act: str
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self._in_planes, planes, s, act))
            self._in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Check and normalise ``x`` (N, C, H, W) in [0, 1] → stem output (N, width, h, w)."""
        check_input(x, self.in_channels, self.model_name)
        out = self.act(self.bn1(self.conv1(self.normalize(x))))
        return self.maxpool(out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) → ``layer4`` output (N, feature_dim, h, w), before pooling."""
        out = self.forward_stem(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = stage(out)
        return out

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``layer4`` output (N, feature_dim, h, w) → logits (N, num_classes)."""
        return self.linear(torch.flatten(self.avgpool(features), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] → logits (N, num_classes)."""
        return self.forward_head(self.forward_features(x))


_RESNET_DOC = (
    "kwargs: width (64), stem ('cifar' | 'imagenet'), activation ('relu' | 'elu'), pool_grid (1)"
)


def _variant(
    name: str,
    block: type[BasicBlock] | type[Bottleneck],
    blocks: tuple[int, int, int, int],
    doc: str,
    *,
    description: str,
    in_channels_default: int = 3,
    width_default: int = 64,
) -> Callable[..., ResNet]:
    """Define and register the builder of one ResNet depth (the module names, stages and FSR
    position are those of every fortify ResNet)."""

    def builder(
        num_classes: int = 10,
        in_channels: int = in_channels_default,
        width: int = width_default,
        stem: str = "cifar",
        activation: str = "relu",
        pool_grid: int = 1,
    ) -> ResNet:
        return ResNet(
            block, blocks, num_classes, in_channels, width, stem, activation, name, pool_grid
        )

    builder.__name__ = builder.__qualname__ = name.replace("-", "_")
    builder.__doc__ = doc
    register(name, description=description, fsr_position="layer4", stages=RESNET_STAGES)(builder)
    return builder


resnet18 = _variant(
    "resnet18",
    BasicBlock,
    (2, 2, 2, 2),
    "ResNet-18: 11,173,962 parameters for 10 classes at width 64 (CIFAR stem).",
    description=f"ResNet-18 (BasicBlock 2-2-2-2); {_RESNET_DOC}",
)
resnet34 = _variant(
    "resnet34",
    BasicBlock,
    (3, 4, 6, 3),
    "ResNet-34: 21,282,122 parameters for 10 classes at width 64 (CIFAR stem).",
    description=f"ResNet-34 (BasicBlock 3-4-6-3); {_RESNET_DOC}",
)
resnet50 = _variant(
    "resnet50",
    Bottleneck,
    (3, 4, 6, 3),
    "ResNet-50: 23,520,842 parameters for 10 classes at width 64 (CIFAR stem).",
    description=f"ResNet-50 (Bottleneck 3-4-6-3); {_RESNET_DOC}",
)
resnet101 = _variant(
    "resnet101",
    Bottleneck,
    (3, 4, 23, 3),
    "ResNet-101: 42,512,970 parameters for 10 classes at width 64 (CIFAR stem).",
    description=f"ResNet-101 (Bottleneck 3-4-23-3), the FPD backbone; {_RESNET_DOC}",
)
small_resnet = _variant(
    "small-resnet",
    BasicBlock,
    (2, 2, 2, 2),
    "ResNet-18 layout at width 16: 701,178 parameters (1 channel); layer4 is 128×4×4 at 28×28.",
    description="narrow ResNet-18 (BasicBlock 2-2-2-2, width 16) for CPU runs on 28×28 / 8×8 "
    "inputs; same names as resnet18 (layer2.1.conv2, ...); kwargs: width, stem, activation",
    in_channels_default=1,
    width_default=16,
)

"""Wide ResNets (Zagoruyko & Komodakis) in the key layout of the TRADES / FSR / RiFT releases.

Module names: ``normalize``, ``conv1`` (3×3, 16 channels), ``block1``, ``sub_block1``,
``block2``, ``block3`` (each a group whose blocks live in ``.layer.<i>``, e.g.
``block1.layer.3.conv2``), then ``bn1``, ``relu`` (an ``nn.ReLU`` module: a hook after ``relu``
sees the final BN+ReLU features, 640×8×8 for WRN-34-10 at 32×32 input), ``avgpool`` (adaptive,
equal to the release's ``avg_pool2d(·, 8)`` at 32×32) and ``fc``.
Each block holds ``bn1, relu1, conv1, bn2, relu2, conv2`` and ``convShortcut`` (1×1) only where
the channel count changes.

``sub_block1`` is a copy of ``block1`` that the releases construct but never call; it is present
by default so release checkpoints load with ``strict=True`` (pass ``sub_block1=False`` to drop
it). Its parameters never receive gradients: the model lists it in ``unused_modules`` so that
DDP (``find_unused_parameters``), RiFT's criticality scan and parameter counts can skip it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fortify.errors import ConfigError, check_positive_int
from fortify.models._common import check_input
from fortify.models.registry import register


class WideBasic(nn.Module):
    """Pre-activation block. When in ≠ out channels, the shortcut is ``convShortcut`` applied to
    the *activated* input (as in the releases); otherwise the identity of the raw input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Module | None = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        skip = x if self.convShortcut is None else self.convShortcut(act)
        return out + skip


class WideGroup(nn.Module):
    """``n`` blocks as ``self.layer`` (a Sequential); the first one may stride / widen."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasic(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    dropout,
                )
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen: [0, 1] images (N, C, H, W) → logits (N, num_classes).

    Args:
        depth: total depth, ``6n + 4`` (34 → 5 blocks per group, 28 → 4).
        widen: width multiplier k; groups have 16k, 32k, 64k channels.
        dropout: dropout probability between the two convs of each block (0 in the releases).
        sub_block1: build the release's unused ``sub_block1`` (for strict checkpoint loading).
    """

    def __init__(
        self,
        depth: int = 34,
        widen: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
        sub_block1: bool = True,
        name: str = "wide-resnet",
        pool_grid: int = 1,
    ):
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(in_channels, "in_channels")
        check_positive_int(widen, f"{name} widen")
        check_positive_int(pool_grid, f"{name} pool_grid")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ConfigError(
                f"{name} depth must be 6n+4 with n >= 1 (e.g. 16, 22, 28, 34, 40), got {depth!r}"
            )
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{name} dropout must be in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        ch = (16, 16 * widen, 32 * widen, 64 * widen)
        self.model_name = name
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.normalize: nn.Module = nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideGroup(n, ch[0], ch[1], 1, dropout)
        if sub_block1:
            self.sub_block1 = WideGroup(n, ch[0], ch[1], 1, dropout)
        self.block2 = WideGroup(n, ch[1], ch[2], 2, dropout)
        self.block3 = WideGroup(n, ch[2], ch[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=False)
        # pool_grid 2: the RiFT release's Tiny-ImageNet head (avg_pool2d(·, 8) of the 16×16 map at
        # 64×64 input → 2×2, flattened channel-major into a 4·64·widen-input fc)
        self.avgpool = nn.AdaptiveAvgPool2d(pool_grid)
        self.fc = nn.Linear(ch[3] * pool_grid * pool_grid, num_classes)
        self.feature_dim = ch[3]
        self.unused_modules: tuple[str, ...] = ("sub_block1",) if sub_block1 else ()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) → final BN+ReLU features (N, 64·widen, H/4, W/4)."""
        check_input(x, self.in_channels, self.model_name)
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        return self.relu(self.bn1(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] → logits (N, num_classes)."""
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


_WRN_STAGES = ("block1", "block2", "block3")


@register(
    "wide-resnet",
    description="Wide ResNet, release layout; kwargs: depth (34), widen (10), dropout (0.0), "
    "sub_block1 (False), pool_grid (1)",
    fsr_position="relu",
    stages=_WRN_STAGES,
)
def wide_resnet(
    num_classes: int = 10,
    in_channels: int = 3,
    depth: int = 34,
    widen: int = 10,
    dropout: float = 0.0,
    sub_block1: bool = False,
    pool_grid: int = 1,
) -> WideResNet:
    """Generic WRN-depth-widen (without the unused ``sub_block1`` unless asked for)."""
    return WideResNet(
        depth, widen, num_classes, in_channels, dropout, sub_block1, "wide-resnet", pool_grid
    )


@register(
    "wrn-34-10",
    description="WRN-34-10 (TRADES / FSR / RiFT release layout); kwargs: dropout, "
    "sub_block1 (True), pool_grid (1)",
    fsr_position="relu",
    stages=_WRN_STAGES,
)
def wrn_34_10(
    num_classes: int = 10,
    in_channels: int = 3,
    dropout: float = 0.0,
    sub_block1: bool = True,
    pool_grid: int = 1,
) -> WideResNet:
    """WRN-34-10: 46,160,474 used parameters for 10 classes (+ 2,102,112 in ``sub_block1``)."""
    return WideResNet(34, 10, num_classes, in_channels, dropout, sub_block1, "wrn-34-10", pool_grid)


@register(
    "wrn-28-10",
    description="WRN-28-10; kwargs: dropout, sub_block1 (False), pool_grid (1)",
    fsr_position="relu",
    stages=_WRN_STAGES,
)
def wrn_28_10(
    num_classes: int = 10,
    in_channels: int = 3,
    dropout: float = 0.0,
    sub_block1: bool = False,
    pool_grid: int = 1,
) -> WideResNet:
    """WRN-28-10: 36,479,194 used parameters for 10 classes."""
    return WideResNet(28, 10, num_classes, in_channels, dropout, sub_block1, "wrn-28-10", pool_grid)

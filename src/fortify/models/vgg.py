"""VGG-16 with batch norm in the layout of the FSR release.

Module names: ``normalize``; ``block0..block4`` are Sequentials of conv-BN-ReLU triples
(``block0.0`` conv, ``block0.1`` BN, ``block0.2`` ReLU, ``block0.3`` conv, ...) with 64×2,
128×2, 256×3, 512×3, 512×3 channels (3×3 convs with bias); ``pool0..pool4`` are separate 2×2
max-pools after each block, so a hook after ``block3`` sees the fourth conv group *before* its
pool (512×4×4 at 32×32 input); ``avgpool`` (adaptive, 1×1); ``classifier`` =
Sequential(Linear(512, 512), ReLU, Linear(512, 512), ReLU, Linear(512, K)), i.e. parameters
``classifier.0``, ``classifier.2``, ``classifier.4``. 15,253,578 parameters for 10 classes.

The pools use ``ceil_mode=True`` so inputs of any size work (28×28 → 14, 7, 4, 2, 1); for
sides divisible by 32 (CIFAR's 32×32, ImageNet's 224×224) this is identical to the release's
floor-mode pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from fortify.errors import check_positive_int
from fortify.models._common import check_input, init_conv_bn_linear
from fortify.models.registry import register

VGG16_CFG = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(nn.Module):
    """VGG with BN: [0, 1] images (N, C, H, W) → logits (N, num_classes).

    Args:
        cfg: output channels of each conv, grouped into the five blocks (at width 64).
        width: channels of the first block (64 in the paper); all convs and the classifier's
            hidden layers scale by ``width / 64``.
    """

    def __init__(
        self,
        cfg: tuple[tuple[int, ...], ...] = VGG16_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        name: str = "vgg16",
    ):
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(in_channels, "in_channels")
        check_positive_int(width, f"{name} width")
        self.model_name = name
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_blocks = len(cfg)
        self.normalize: nn.Module = nn.Identity()
        cin = in_channels
        for b, group in enumerate(cfg):
            layers: list[nn.Module] = []
            for c in group:
                cout = max(1, c * width // 64)
                layers += [
                    nn.Conv2d(cin, cout, 3, padding=1),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                ]
                cin = cout
            setattr(self, f"block{b}", nn.Sequential(*layers))
            setattr(self, f"pool{b}", nn.MaxPool2d(2, 2, ceil_mode=True))
        self.feature_dim = cin
        hidden = max(1, 512 * width // 64)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(cin, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        init_conv_bn_linear(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images → output of the last pool (N, feature_dim, ⌈H/32⌉, ⌈W/32⌉)."""
        check_input(x, self.in_channels, self.model_name)
        out = self.normalize(x)
        for b in range(self.num_blocks):
            out = getattr(self, f"pool{b}")(getattr(self, f"block{b}")(out))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] → logits (N, num_classes)."""
        return self.classifier(torch.flatten(self.avgpool(self.forward_features(x)), 1))


@register(
    "vgg16",
    description="VGG-16 with BN, FSR-release layout (block0..block4, classifier.0/2/4); "
    "kwargs: width (64)",
    fsr_position="block3",
    stages=("block0", "block1", "block2", "block3", "block4"),
)
def vgg16(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> VGG:
    """VGG-16 (BN): 15,253,578 parameters for 10 classes at width 64."""
    return VGG(VGG16_CFG, num_classes, in_channels, width)

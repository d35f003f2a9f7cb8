"""Backbones: shapes, parameter counts vs published figures, release module names, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fortify.defenses.attach import attach, find_module, infer_feature_shapes
from fortify.errors import ConfigError, DataError, FortifyError
from fortify.models import available, count_parameters, create, describe_kwargs, spec
from fortify.models.wide_resnet import WideBasic

# Tiny configurations of every backbone for forward tests on CPU.
TINY = {
    "resnet18": {"width": 4},
    "resnet34": {"width": 2},
    "resnet50": {"width": 2},
    "resnet101": {"width": 2},
    "small-resnet": {"width": 4},
    "preact-resnet18": {"width": 4},
    "vgg16": {"width": 4},
    "wide-resnet": {"depth": 10, "widen": 1},
    "wrn-34-10": None,  # too big for a forward test; checked on the meta device
    "wrn-28-10": None,
    "small-cnn": {"width": 4},
}


def _meta(name: str, **kw: object) -> nn.Module:
    """Build without allocating memory (parameter counts and names need no forward pass)."""
    with torch.device("meta"):
        return create(name, num_classes=10, in_channels=3, **kw)


def test_every_registered_model_has_a_tiny_config() -> None:
    assert set(available()) == set(TINY)


@pytest.mark.parametrize("name", [n for n, kw in TINY.items() if kw is not None])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (1, 8, 8)])
def test_forward_shapes(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = create(name, num_classes=7, in_channels=shape[0], **TINY[name]).eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(TINY))
def test_spec_positions_name_real_modules(name: str) -> None:
    entry = spec(name)
    model = _meta(name, **(TINY[name] or {}))
    assert entry.fsr_position is not None
    find_module(model, entry.fsr_position)
    for stage in entry.stages:
        find_module(model, stage)
    assert isinstance(model.normalize, nn.Identity)


# (name, published figure, what it counts) — tolerance 0.5 %.
PUBLISHED = [
    ("resnet18", 11.17e6),  # FSR Table 7
    ("vgg16", 15.25e6),  # FSR Table 7
    ("resnet34", 21.28e6),
    ("resnet50", 23.52e6),
    ("wrn-34-10", 46.2e6),  # excluding the unused sub_block1 (see next test)
]


@pytest.mark.parametrize("name,published", PUBLISHED)
def test_parameter_counts_match_published(name: str, published: float) -> None:
    model = _meta(name)
    n = count_parameters(model, getattr(model, "unused_modules", ()))
    assert abs(n - published) / published < 0.005, (name, n)


def test_wrn_34_10_published_count_excludes_sub_block1() -> None:
    model = _meta("wrn-34-10")
    assert model.unused_modules == ("sub_block1",)
    used = count_parameters(model, ("sub_block1",))
    total = count_parameters(model)
    sub = sum(p.numel() for p in model.sub_block1.parameters())
    assert total == used + sub and sub > 0
    assert abs(used - 46.2e6) / 46.2e6 < 0.005
    assert abs(total - 46.2e6) / 46.2e6 > 0.03  # with sub_block1 the figure would be ~48.3M
    assert count_parameters(_meta("wrn-34-10", sub_block1=False)) == used


def test_resnet_release_names() -> None:
    model = _meta("resnet18")
    names = dict(model.named_modules())
    for n in ("conv1", "bn1", "layer2.1.conv2", "layer4.1.bn2", "linear", "avgpool"):
        assert n in names, n
    assert isinstance(names["layer2.0.shortcut.0"], nn.Conv2d)
    assert isinstance(names["layer2.0.shortcut.1"], nn.BatchNorm2d)
    assert (
        isinstance(names["layer1.0.shortcut"], nn.Sequential)
        and len(names["layer1.0.shortcut"]) == 0
    )
    keys = set(model.state_dict())
    assert {"layer3.0.shortcut.0.weight", "layer3.0.shortcut.1.running_var", "linear.bias"} <= keys
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)
    bottleneck = dict(_meta("resnet50").named_modules())
    assert "layer3.5.conv3" in bottleneck and "layer1.0.shortcut.0" in bottleneck  # 64 → 256


def test_vgg_release_layout() -> None:
    torch.manual_seed(0)
    model = create("vgg16", width=8).eval()
    keys = set(model.state_dict())
    assert {
        "block0.0.weight",
        "block0.0.bias",
        "block3.7.running_mean",
        "classifier.4.weight",
    } <= keys
    assert {k.split(".")[1] for k in keys if k.startswith("classifier.")} == {"0", "2", "4"}
    assert [len(getattr(model, f"block{b}")) for b in range(5)] == [6, 6, 9, 9, 9]
    shapes = infer_feature_shapes(model, ["block3", "pool3"], (3, 32, 32))
    assert shapes == {"block3": (64, 4, 4), "pool3": (64, 2, 2)}  # block3 is before its pool


def test_wrn_release_names_and_shortcuts() -> None:
    model = _meta("wrn-34-10")
    names = dict(model.named_modules())
    for n in (
        "conv1",
        "block1.layer.3.conv2",
        "block1.layer.4.relu2",
        "sub_block1.layer.0.conv1",
        "block3.layer.4.bn2",
        "bn1",
        "relu",
        "fc",
    ):
        assert n in names, n
    assert isinstance(names["relu"], nn.ReLU)
    with_shortcut = sorted(n for n in names if n.endswith("convShortcut"))
    assert with_shortcut == [
        "block1.layer.0.convShortcut",
        "block2.layer.0.convShortcut",
        "block3.layer.0.convShortcut",
        "sub_block1.layer.0.convShortcut",
    ]
    assert "block1.layer.5" not in names and "block1.layer.4" in names  # (34 - 4) / 6 = 5 blocks
    assert "sub_block1" not in dict(_meta("wide-resnet").named_children())


def test_wrn_fsr_position_shape_and_unused_sub_block() -> None:
    torch.manual_seed(0)
    model = create("wide-resnet", depth=10, widen=2, sub_block1=True)
    assert infer_feature_shapes(model, ["relu"], (3, 32, 32)) == {"relu": (128, 8, 8)}
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.sub_block1.parameters())
    assert model.conv1.weight.grad is not None


def test_wide_block_matches_release_semantics() -> None:
    """In ≠ out: the 1×1 shortcut sees the activated input; in = out: identity of raw input."""
    torch.manual_seed(0)
    for cin, cout, stride in [(4, 8, 2), (8, 8, 1)]:
        block = WideBasic(cin, cout, stride).eval()
        for bn in (block.bn1, block.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, cin, 8, 8)

        def bn(m: nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
            return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False)

        act = F.relu(bn(block.bn1, x))
        out = F.conv2d(act, block.conv1.weight, stride=stride, padding=1)
        out = F.conv2d(F.relu(bn(block.bn2, out)), block.conv2.weight, padding=1)
        skip = x if cin == cout else F.conv2d(act, block.convShortcut.weight, stride=stride)
        with torch.no_grad():
            assert torch.allclose(block(x), out + skip, atol=1e-5)


def test_hook_after_fsr_position_sees_final_features() -> None:
    """Zeroing the output of fsr_position must leave only the classifier bias in the logits."""
    torch.manual_seed(0)
    for name, head in [
        ("resnet18", "linear"),
        ("wide-resnet", "fc"),
        ("preact-resnet18", "linear"),
    ]:
        kw = TINY[name]
        model = create(name, num_classes=5, **kw).eval()
        for p in getattr(model, head).parameters():
            nn.init.normal_(p)
        model = attach(model, _Zero(), at=spec(name).fsr_position)
        with torch.no_grad():
            out = model(torch.rand(3, 3, 16, 16))
        assert torch.allclose(out, getattr(model, head).bias.expand(3, 5)), name


class _Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_imagenet_stem_and_elu() -> None:
    torch.manual_seed(0)
    model = create("resnet50", width=2, stem="imagenet", activation="elu").eval()
    assert isinstance(model.maxpool, nn.MaxPool2d) and model.conv1.kernel_size == (7, 7)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert infer_feature_shapes(model, ["layer1", "layer4"], (3, 64, 64)) == {
        "layer1": (8, 16, 16),
        "layer4": (64, 2, 2),
    }
    cifar = create("resnet18", width=4)
    assert isinstance(cifar.maxpool, nn.Identity) and cifar.conv1.kernel_size == (3, 3)


def test_normalisation_is_inside_the_model() -> None:
    mean, std = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
    torch.manual_seed(0)
    plain = create("resnet18", width=4).eval()
    torch.manual_seed(0)
    normed = create("resnet18", width=4, mean=mean, std=std).eval()
    assert "normalize.mean" in normed.state_dict() and "normalize.std" in normed.state_dict()
    x = torch.rand(2, 3, 16, 16)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(normed(x), plain(manual), atol=1e-5)
        assert not torch.allclose(normed(x), plain(x), atol=1e-3)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(FortifyError) as info:
        create("resnet-18")
    msg = str(info.value)
    assert "resnet-18" in msg and "Did you mean: resnet18" in msg and "wrn-34-10" in msg


def test_bad_options_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="depth_factor.*allowed options.*width=64"):
        create("resnet18", depth_factor=2)
    with pytest.raises(ConfigError, match="stem 'tiny'.*cifar"):
        create("resnet18", width=4, stem="tiny")
    with pytest.raises(ConfigError, match="6n\\+4"):
        create("wide-resnet", depth=33)
    with pytest.raises(ConfigError, match="width must be an integer >= 1"):
        create("vgg16", width=0)
    with pytest.raises(ConfigError, match="3 values each"):
        create("resnet18", width=4, mean=[0.5], std=[0.5])
    with pytest.raises(ConfigError, match="both mean and std"):
        create("resnet18", width=4, mean=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="activation"):
        create("resnet18", width=4, activation="gelu")
    assert describe_kwargs("wrn-34-10") == {"dropout": 0.0, "sub_block1": True, "pool_grid": 1}


@pytest.mark.parametrize(
    "name", ["resnet18", "vgg16", "wide-resnet", "preact-resnet18", "small-resnet", "small-cnn"]
)
def test_wrong_in_channels_is_a_clear_error_at_forward(name: str) -> None:
    model = create(name, num_classes=10, in_channels=1, **TINY[name])
    with pytest.raises(DataError, match=r"\(N, 1, H, W\).*\(2, 3, 16, 16\)"):
        model(torch.rand(2, 3, 16, 16))
    with pytest.raises(DataError):
        model(torch.rand(1, 16, 16))

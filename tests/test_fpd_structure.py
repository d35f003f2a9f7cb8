"""FPD's structure pinned against a plain re-statement of the release's forward pass.

The function ``_release_forward`` below spells the release network out step by step with the
FPD model's own weights and nothing of ``fortify.defenses.fpd``: D after the stem and after the
first stage; the pyramid read from the RAW stage outputs (c2 before D); a linear FPN decoder
(1×1 laterals, bilinear upsample-and-add, one 3×3 smoothing conv, kernel-2 stride-2 transposed
convs, a 1×1 transposed conv to the image channels, no activation after the lateral sum);
x_mid = x′ + Gram term of the raw input; the same backbone again; average pool; linear; tanh.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fortify.models.resnet  # noqa: F401  (registers the ResNets)
from fortify.defenses.fpd import FPD, build_fpd
from fortify.defenses.registry import DefenceSpec
from fortify.models import create


def _nonlocal(f: torch.Tensor) -> torch.Tensor:
    """f + (f fᵀ f)/(H·W), written with einsum over channel pairs as in the release."""
    g = torch.einsum("nihw,njhw->nij", f, f)
    return torch.einsum("nij,nihw->njhw", g, f) / (f.shape[2] * f.shape[3]) + f


def _backbone_pass(net, x: torch.Tensor) -> list[torch.Tensor]:
    """Stem → D → layer1 (c2) → D → layer2 (c3) → layer3 (c4) → layer4 (c5); returns c2..c5."""
    s = net.maxpool(net.act(net.bn1(net.conv1(x))))
    c2 = net.layer1(_nonlocal(s))
    c3 = net.layer2(_nonlocal(c2))
    c4 = net.layer3(c3)
    c5 = net.layer4(c4)
    return [c2, c3, c4, c5]


def _release_forward(model: FPD, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    net, dec = model.net, model.decoder
    c2, c3, c4, c5 = _backbone_pass(net, x)  # raw stage outputs feed the laterals

    def up_add(top: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
        return F.interpolate(top, size=lat.shape[-2:], mode="bilinear", align_corners=False) + lat

    lat = dec.laterals
    p = lat[3](c5)
    p = up_add(p, lat[2](c4))
    p = up_add(p, lat[1](c3))
    p = up_add(p, lat[0](c2))
    p = dec.smooth(p)
    for t in dec.upsample:  # no activation in between
        p = F.conv_transpose2d(p, t.weight, t.bias, stride=2)
    restored = F.conv_transpose2d(p, dec.head.weight, dec.head.bias)
    x_mid = restored + (_nonlocal(x) - x)  # Gram term of the RAW input
    *_, c5b = _backbone_pass(net, x_mid)
    logits = net.linear(c5b.mean(dim=(2, 3)))
    return restored, torch.tanh(logits)


def _model(**options) -> FPD:
    torch.manual_seed(0)
    net = create("resnet18", num_classes=10, in_channels=3, width=4, stem="imagenet")
    m = build_fpd(
        net,
        DefenceSpec("resnet18", [], {"width": 8, "activation": "elu", **options}, 10, (3, 64, 64)),
    )
    with torch.no_grad():  # "given weights": every parameter and BN statistic set from a seed
        g = torch.Generator().manual_seed(1)
        for p in m.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return m


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fpd_matches_the_release_forward(mode):
    m = _model()
    m.train(mode == "train")
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = m.forward_full(x)
        restored, bounded = _release_forward(m, x)
    assert [len(m.decoder.upsample), m.decoder.upsample[0].out_channels] == [2, 64]
    assert m.decoder.upsample[1].out_channels == 16  # the release's 64 → 16 → 3
    torch.testing.assert_close(out.restored, restored, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.bounded, bounded, rtol=1e-4, atol=1e-5)
    assert out.restored.abs().max() > 1e-2 and out.logits.abs().max() > 1e-2


def test_the_earlier_structure_differs_from_the_release():
    """The check can fail: the pre-release wiring (denoised first level, activated decoder)
    gives another restored image from the same backbone weights."""
    m = _model(pyramid="denoised").eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        restored, _ = _release_forward(m, x)
        assert not torch.allclose(m.restore(x), restored, rtol=1e-3, atol=1e-3)


def test_pyramid_levels_are_raw_stage_outputs():
    m = _model().eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        feats = m.pyramid_features(x)
        ref = _backbone_pass(m.net, x)
    for got, want in zip(feats, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

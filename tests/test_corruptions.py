"""Generated common corruptions: determinism, range, monotone severity, small/grey images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fortify.errors import ConfigError, DataError, FortifyError
from fortify.evaluate import corruptions as C


def _smooth(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, max(2, size // 4), max(2, size // 4), generator=g)
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def _digits(n: int = 64) -> torch.Tensor:
    from fortify.data import load_dataset

    x, _ = load_dataset("digits", val_size=100).test.head(n).floats()
    return x


CASES = [("digits8", 1), ("grey28", 1), ("rgb32", 3)]


@pytest.fixture(scope="module")
def images():
    return {"digits8": _digits(), "grey28": _smooth(16, 1, 28), "rgb32": _smooth(16, 3, 32)}


@pytest.mark.parametrize("case,channels", CASES)
def test_each_corruption_deterministic_in_range_and_monotone(images, case, channels):
    x = images[case]
    names = C.available(channels)
    assert ("saturate" in names) == (channels == 3)
    for name in names:
        diffs = []
        for s in range(1, 6):
            out = C.corrupt(x, name, s, seed=3)
            assert out.shape == x.shape and out.dtype == x.dtype
            assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
            assert torch.equal(out, C.corrupt(x, name, s, seed=3)), f"{name} not deterministic"
            diffs.append(float((out - x).abs().mean()))
        assert all(a < b for a, b in zip(diffs, diffs[1:])), f"{name} on {case}: {diffs}"
        assert diffs[0] > 0


def test_seed_changes_random_corruptions(images):
    x = images["grey28"]
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur"):
        assert not torch.equal(C.corrupt(x, name, 3, seed=0), C.corrupt(x, name, 3, seed=1))


def test_families_cover_cifar_c_groups():
    assert set(C.FAMILIES) >= {"noise", "blur", "digital"}
    assert {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"} <= set(
        C.FAMILIES["noise"]
    )
    assert {"gaussian_blur", "defocus_blur", "motion_blur", "zoom_blur"} <= set(C.FAMILIES["blur"])
    assert {"contrast", "brightness", "jpeg_compression", "pixelate", "saturate"} <= set(
        C.FAMILIES["digital"]
    )
    assert "differs" in C.describe("saturate") or "CIFAR-10-C" in C.describe("saturate")


def test_bad_inputs():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="severity"):
        C.corrupt(x, "contrast", 0)
    with pytest.raises(ConfigError, match="severity"):
        C.corrupt(x, "contrast", 6)
    with pytest.raises(FortifyError, match="unknown corruption"):
        C.corrupt(x, "fogg", 1)
    with pytest.raises(DataError, match="3-channel"):
        C.corrupt(x, "saturate", 1)
    with pytest.raises(DataError, match="float"):
        C.corrupt((x * 255).to(torch.uint8), "contrast", 1)

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


RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur")
ADDED = ("glass_blur", "elastic_transform", "fog", "snow", "spatter")


@pytest.mark.parametrize("case", ["grey28", "rgb32"])
def test_seed_changes_random_corruptions(images, case):
    x = images[case]
    for name in RANDOM + ADDED:
        a = C.corrupt(x, name, 3, seed=0)
        assert not torch.equal(a, C.corrupt(x, name, 3, seed=1)), name
        same = C.corrupt(x, name, 3, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, same), f"{name}: generator and seed disagree"


def test_families_cover_cifar_c_groups():
    assert set(C.FAMILIES) >= {"noise", "blur", "digital", "weather"}
    assert {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"} <= set(
        C.FAMILIES["noise"]
    )
    assert {"gaussian_blur", "defocus_blur", "motion_blur", "zoom_blur", "glass_blur"} <= set(
        C.FAMILIES["blur"]
    )
    assert {
        "contrast",
        "brightness",
        "jpeg_compression",
        "pixelate",
        "saturate",
        "elastic_transform",
    } <= set(C.FAMILIES["digital"])
    assert set(C.FAMILIES["weather"]) == {"fog", "snow", "spatter"}
    assert "differs" in C.describe("saturate") or "CIFAR-10-C" in C.describe("saturate")
    for name in ADDED:
        assert name in C.available(1) and name in C.available(3)
        assert "CIFAR-10-C" in C.describe(name)


def test_benchmark_corruptions_all_generated_except_frost():
    from fortify.evaluate import ood_readers

    assert set(ood_readers.BENCHMARK_CORRUPTIONS) - set(C.available()) == {"frost"}
    assert set(ood_readers.EXTRA_CORRUPTIONS) <= set(C.available())


def test_frost_is_refused_with_the_reason():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ConfigError, match="'frost' is not generated") as err:
        C.corrupt(x, "frost", 1)
    msg = str(err.value)
    assert "ImageNet-C" in msg and "read_cifar_c" in msg and "glass_blur" in msg
    assert "frost" not in C.available() and C.family("frost") == "weather"
    assert "not generated" in C.describe("frost") and "frost (weather)" in C.describe()


def test_generated_ood_refuses_frost_before_evaluating():
    from fortify.evaluate import ood

    calls = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return torch.zeros(len(x), 10)

    x, y = torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ConfigError, match="frost"):
        ood.generated_ood(Spy(), x, y, corruptions=["contrast", "frost"])
    assert calls == []


def _sorted_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sort(dim=1).values


@pytest.mark.parametrize("name", ["glass_blur", "elastic_transform"])
@pytest.mark.parametrize("case", ["grey28", "rgb32"])
def test_geometric_corruptions_move_pixels_rather_than_change_them(images, name, case):
    x = images[case]
    out = C.corrupt(x, name, 5, seed=3)
    change = float((out - x).abs().mean())
    # the sorted pixel values (the histogram) barely move although the pixels do
    histogram_shift = float((_sorted_pixels(out) - _sorted_pixels(x)).abs().mean())
    assert histogram_shift < 0.03 and histogram_shift < 0.25 * change, (histogram_shift, change)
    mean_shift = float((out.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))).abs().max())
    assert mean_shift < (0.002 if name == "glass_blur" else 0.05), mean_shift


def test_glass_blur_shuffle_is_a_local_permutation():
    n, h, w = 4, 9, 7
    perm = C._local_shuffle(n, h, w, 1, 2, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(perm.sort(dim=1).values, torch.arange(h * w).expand(n, -1))
    pos = torch.arange(h * w)
    moved = torch.maximum((perm // w - pos // w).abs(), (perm % w - pos % w).abs())
    assert 0.5 < float(moved.float().mean()) < 3.0


def _low_frequency_share(x: torch.Tensor, radius: float = 4.0) -> tuple[float, float]:
    """(share, energy per image) of the non-DC spectral energy within ``radius`` cycles."""
    d = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(d).abs() ** 2
    fy = torch.fft.fftfreq(x.shape[-2]) * x.shape[-2]
    fx = torch.fft.fftfreq(x.shape[-1]) * x.shape[-1]
    low = fy[:, None] ** 2 + fx[None, :] ** 2 <= radius**2
    return float(power[..., low].sum() / power.sum()), float(power[..., low].sum()) / len(x)


def test_fog_adds_low_frequency_energy():
    flat = torch.full((8, 1, 32, 32), 0.5)
    shares, energies = zip(*(_low_frequency_share(C.corrupt(flat, "fog", s)) for s in (1, 3, 5)))
    assert min(shares) > 0.9  # white noise would put ~5% of its energy there
    assert _low_frequency_share(C.corrupt(flat, "gaussian_noise", 5))[0] < 0.2
    assert energies[0] < energies[1] < energies[2]


def test_snow_and_water_only_brighten_mud_darkens(images):
    x = images["rgb32"]
    assert float((C.corrupt(x, "snow", 5, seed=1) - x).min()) > -1e-5
    assert float((C.corrupt(x, "spatter", 3, seed=1) - x).min()) > -1e-5
    white = torch.ones(4, 3, 32, 32)
    mud = C.corrupt(white, "spatter", 5, seed=1)
    dark = mud.mean(dim=1) < 0.5
    assert bool(dark.any())
    r, g, b = (mud[:, i][dark] for i in range(3))
    assert bool(((r > g) & (g > b)).all())  # brown


def test_snow_streaks_use_the_motion_blur_taps():
    import math

    x = torch.rand(3, 2, 40, 40, generator=torch.Generator().manual_seed(0))
    ref = C.corrupt(x, "motion_blur", 5, seed=4)
    g = torch.Generator().manual_seed(4)
    angles = (torch.rand(3, generator=g) * 90.0 - 45.0) * (math.pi / 180.0)
    out = C._sample_taps(x, *C._motion_taps(angles, 3.0, 9))
    assert torch.allclose(out[..., 9:-9, 9:-9], ref[..., 9:-9, 9:-9], atol=1e-5)


def test_bad_inputs():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="severity"):
        C.corrupt(x, "contrast", 0)
    with pytest.raises(ConfigError, match="severity"):
        C.corrupt(x, "contrast", 6)
    with pytest.raises(FortifyError, match="unknown corruption") as err:
        C.corrupt(x, "fogg", 1)
    assert "Did you mean: fog" in str(err.value)
    assert all(n in str(err.value) for n in ADDED)
    for name in ADDED:
        for severity in (0, 6):
            with pytest.raises(ConfigError, match=r"severity must be an integer 1\.\.5"):
                C.corrupt(x, name, severity)
    with pytest.raises(DataError, match="3-channel"):
        C.corrupt(x, "saturate", 1)
    with pytest.raises(DataError, match="float"):
        C.corrupt((x * 255).to(torch.uint8), "contrast", 1)

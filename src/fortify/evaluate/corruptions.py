"""Common image corruptions (CIFAR-10-C style) generated on the fly, batched on the tensors' device.

Use these for datasets that have no published corrupted test set (Fashion-MNIST, digits, SVHN,
your own data). They follow Hendrycks & Dietterich (ICLR 2019, "CIFAR-10-C") family by family,
re-implemented with torch operations so that they

* run on whole batches on the input's device (CPU or GPU),
* are deterministic under a seed (a :class:`torch.Generator` on the input's device),
* accept any channel count (1 or 3; the colour-only ``saturate`` needs 3) and any size ≥ 4 px
  (the ``imagecorruptions`` package refuses images under 32 px),
* return images clamped to [0, 1].

Parameters are the CIFAR-10-C ones in pixel units, *not* rescaled with image size, so on 8×8
digits a blur is relatively much stronger than on 32×32 CIFAR. Differences from the original
definitions are listed per function (``describe()`` returns them as text) and in ``docs/rift.md``.

Every corruption grows monotonically with severity 1–5 (mean ``|x_c − x|`` increases for a fixed
seed); where the original is not monotone (``saturate``) or cannot be on tiny images
(``pixelate``) the schedule is adapted, as documented.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fortify.errors import ConfigError, DataError, unknown_name

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]

_CORRUPTIONS: dict[str, Corruption] = {}
_NOTES: dict[str, str] = {}
_FAMILY: dict[str, str] = {}
_NEEDS_COLOUR: set[str] = set()


def _register(
    name: str, family: str, note: str, colour: bool = False
) -> Callable[[Corruption], Corruption]:
    def deco(fn: Corruption) -> Corruption:
        _CORRUPTIONS[name] = fn
        _NOTES[name] = note
        _FAMILY[name] = family
        if colour:
            _NEEDS_COLOUR.add(name)
        return fn

    return deco


# ----------------------------------------------------------------------------------------------
# helpers


def _gauss_kernel1d(sigma: float, radius: int | None, device: torch.device) -> torch.Tensor:
    if radius is None:
        radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    return k / k.sum()


def _conv_same(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 2-D convolution of (N, C, H, W) with one (kh, kw) kernel, reflect padding."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    mode = "reflect" if ph < h and pw < w else "replicate"
    xp = F.pad(x, (pw, pw, ph, ph), mode=mode)
    weight = kernel.to(x.dtype).expand(c, 1, kh, kw).contiguous()
    return F.conv2d(xp, weight, groups=c)


def _gaussian_blur(x: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    k = _gauss_kernel1d(sigma, radius, x.device)
    return _conv_same(x, torch.outer(k, k))


def _rgb_to_hsv_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Value V = max over channels and saturation S = (V − min)/V (0 where V = 0)."""
    v = x.amax(dim=1, keepdim=True)
    mn = x.amin(dim=1, keepdim=True)
    s = torch.where(v > 0, (v - mn) / v.clamp_min(1e-12), torch.zeros_like(v))
    return v, s


# ----------------------------------------------------------------------------------------------
# noise


@_register(
    "gaussian_noise",
    "noise",
    "x + N(0, σ²), σ = 0.04, 0.06, 0.08, 0.09, 0.10 (as CIFAR-10-C).",
)
def gaussian_noise(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    return x + noise * c


@_register(
    "shot_noise",
    "noise",
    "Poisson(λ·x)/λ, λ = 500, 250, 100, 75, 50 (as CIFAR-10-C).",
)
def shot_noise(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    c = [500.0, 250.0, 100.0, 75.0, 50.0][severity - 1]
    return torch.poisson(x.clamp(0, 1) * c, generator=g) / c


@_register(
    "impulse_noise",
    "noise",
    "salt-and-pepper on each element with probability 0.01, 0.02, 0.03, 0.05, 0.07 (half salt, "
    "half pepper), as skimage's random_noise('s&p') used by CIFAR-10-C.",
)
def impulse_noise(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    amount = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    u = torch.rand(x.shape, generator=g, device=x.device)
    salt = torch.rand(x.shape, generator=g, device=x.device) < 0.5
    hit = u < amount
    out = x.clone()
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


@_register(
    "speckle_noise",
    "noise",
    "x + x·N(0, σ²), σ = 0.06, 0.10, 0.12, 0.16, 0.20 (as CIFAR-10-C).",
)
def speckle_noise(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    c = [0.06, 0.10, 0.12, 0.16, 0.20][severity - 1]
    noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    return x + x * noise * c


# ----------------------------------------------------------------------------------------------
# blur


@_register(
    "gaussian_blur",
    "blur",
    "Gaussian blur, σ = 0.4, 0.6, 0.7, 0.8, 1.0 px (as CIFAR-10-C); reflect padding, kernel "
    "radius ⌈3σ⌉ (replicate padding when the image is smaller than the kernel).",
)
def gaussian_blur(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    sigma = [0.4, 0.6, 0.7, 0.8, 1.0][severity - 1]
    return _gaussian_blur(x, sigma)


@_register(
    "defocus_blur",
    "blur",
    "disk kernel of radius r followed by a 3×3 Gaussian of σ_alias, (r, σ_alias) = (0.3, 0.4), "
    "(0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1) (as CIFAR-10-C; OpenCV's anti-aliasing "
    "replaced by an explicit 3×3 Gaussian).",
)
def defocus_blur(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)][severity - 1]
    r = max(1, math.ceil(radius))
    t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).float()
    disk = disk / disk.sum()
    out = _conv_same(x, disk)
    return _gaussian_blur(out, alias, radius=1)


@_register(
    "motion_blur",
    "blur",
    "one-sided line blur at a random angle in [−45°, 45°] per image with Gaussian tap weights, "
    "σ = 1, 1.5, 2, 2.5, 3 px and length ⌈3σ⌉ (CIFAR-10-C calls ImageMagick's motion_blur with "
    "radius 10–12 and the same σ; here the kernel is built in torch and taps are bilinearly "
    "splatted).",
)
def motion_blur(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    sigma = [1.0, 1.5, 2.0, 2.5, 3.0][severity - 1]
    n, c, h, w = x.shape
    length = math.ceil(3 * sigma)
    size = 2 * length + 1
    angles = (torch.rand(n, generator=g, device=x.device) * 90.0 - 45.0) * (math.pi / 180.0)
    taps = torch.arange(0, length + 1, device=x.device, dtype=torch.float32)
    tap_w = torch.exp(-0.5 * (taps / sigma) ** 2)
    tap_w = tap_w / tap_w.sum()
    # positions of each tap (n, T) relative to the kernel centre
    px = taps[None] * torch.cos(angles)[:, None] + length
    py = taps[None] * torch.sin(angles)[:, None] + length
    kernel = torch.zeros(n, size * size, device=x.device)
    x0, y0 = px.floor(), py.floor()
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - (px - xi).abs()) * (1 - (py - yi).abs()) * tap_w[None]
            ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
            idx = (yi.clamp(0, size - 1) * size + xi.clamp(0, size - 1)).long()
            kernel.scatter_add_(1, idx, torch.where(ok, wgt, torch.zeros_like(wgt)))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = (
        kernel.view(n, 1, 1, size, size).expand(n, c, 1, size, size).reshape(n * c, 1, size, size)
    )
    mode = "reflect" if length < h and length < w else "replicate"
    xp = F.pad(x.reshape(1, n * c, h, w), (length,) * 4, mode=mode)
    return F.conv2d(xp, kernel.to(x.dtype), groups=n * c).view(n, c, h, w)


@_register(
    "zoom_blur",
    "blur",
    "mean of the image and centre zooms by factors 1.00–1.05, 1.00–1.10, 1.00–1.15, 1.00–1.20, "
    "1.00–1.25 in steps of 0.01 (CIFAR-10-C's schedule); zooms by bilinear resampling with "
    "torch's grid_sample instead of scipy's spline zoom.",
)
def zoom_blur(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    top = [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1]
    factors = torch.arange(1.0, top - 1e-9, 0.01).tolist()[1:]
    n = x.shape[0]
    out = x.clone()
    for z in factors:
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = 1.0 / z
        theta[:, 1, 1] = 1.0 / z
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = out + F.grid_sample(
            x, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
    return out / (len(factors) + 1)


# ----------------------------------------------------------------------------------------------
# digital


@_register(
    "contrast",
    "digital",
    "(x − m)·c + m with m the per-image mean, c = 0.75, 0.5, 0.4, 0.3, 0.15 (CIFAR-10-C uses "
    "c = 0.75, 0.5, 0.4, 0.3, 0.15 as well).",
)
def contrast(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * c + m


@_register(
    "brightness",
    "digital",
    "add c = 0.05, 0.1, 0.15, 0.2, 0.3 to the HSV value (hue and saturation kept; computed "
    "directly in RGB); grey images: x + c.",
)
def brightness(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    if x.shape[1] != 3:
        return x + c
    v, _ = _rgb_to_hsv_parts(x)
    v_new = (v + c).clamp(max=1.0)
    return torch.where(v > 0, x * (v_new / v.clamp_min(1e-12)), v_new.expand_as(x))


@_register(
    "saturate",
    "digital",
    "HSV saturation S → clip(S·a + b) with (a, b) = (1.5, 0), (2, 0), (3, 0), (5, 0.1), "
    "(20, 0.2). CIFAR-10-C desaturates at severities 1–2 (a = 0.3, 0.1), which is not monotone "
    "in severity; here every level saturates more than the previous one. Colour images only.",
    colour=True,
)
def saturate(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    if x.shape[1] != 3:
        raise DataError(f"saturate needs 3-channel colour images, got {x.shape[1]} channel(s)")
    a, b = [(1.5, 0.0), (2.0, 0.0), (3.0, 0.0), (5.0, 0.1), (20.0, 0.2)][severity - 1]
    v, s = _rgb_to_hsv_parts(x)
    s_new = (s * a + b).clamp(0, 1)
    scaled = v - (v - x) * (s_new / s.clamp_min(1e-12))
    # grey pixels have no hue; skimage assigns hue 0 (red) to them
    grey = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], dim=1)
    return torch.where(s > 0, scaled, grey)


@_register(
    "jpeg_compression",
    "digital",
    "JPEG re-encoding at quality 80, 65, 58, 50, 40 (as CIFAR-10-C) with torchvision's "
    "encode_jpeg/decode_jpeg on uint8 CPU tensors (libjpeg instead of PIL; results come back "
    "to the input's device).",
)
def jpeg_compression(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():  # torchvision >= 0.29 deprecates its codecs
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import decode_jpeg, encode_jpeg

        quality = [80, 65, 58, 50, 40][severity - 1]
        u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        encoded = encode_jpeg(list(u8), quality=quality)
        decoded = decode_jpeg(encoded)
    out = torch.stack(list(decoded)).to(x.device, x.dtype) / 255.0
    return out


def _pixelate_sizes(size: int) -> list[int]:
    """Target side lengths per severity: round(size·c), forced strictly decreasing (≥ 1)."""
    out, prev = [], size
    for c in [0.95, 0.9, 0.85, 0.75, 0.65]:
        s = max(1, min(round(size * c), prev - 1))
        out.append(s)
        prev = s
    return out


def _box_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) PIL-BOX resampling matrix: output pixels average the input area they cover."""
    scale = n_in / n_out
    lo = torch.arange(n_out, device=device, dtype=torch.float64)[:, None] * scale
    hi = lo + scale
    i = torch.arange(n_in, device=device, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(hi, i + 1) - torch.maximum(lo, i)).clamp_min(0)
    return (overlap / overlap.sum(dim=1, keepdim=True)).float()


def _box_resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    mh = _box_matrix(x.shape[-2], h, x.device).to(x.dtype)
    mw = _box_matrix(x.shape[-1], w, x.device).to(x.dtype)
    return torch.einsum("oh,nchw,pw->ncop", mh, x, mw)


@_register(
    "pixelate",
    "digital",
    "area-weighted (PIL-BOX) downsampling to round(c·side), c = 0.95, 0.9, 0.85, 0.75, 0.65, then "
    "bilinear upsampling. CIFAR-10-C resizes back with BOX as well, which aliases and is not "
    "monotone in severity (e.g. side 24 vs 21 of 32); bilinear upsampling is. Side lengths are "
    "forced to decrease by at least one pixel per severity (8×8 images: 7, 6, 5, 4, 3; at that "
    "size monotonicity holds on natural images but is not guaranteed for every image).",
)
def pixelate(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    sh, sw = _pixelate_sizes(h)[severity - 1], _pixelate_sizes(w)[severity - 1]
    small = _box_resize(x, sh, sw)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------
# public API

FAMILIES: dict[str, list[str]] = {}
for _name, _fam in _FAMILY.items():
    FAMILIES.setdefault(_fam, []).append(_name)


def available(channels: int = 3) -> list[str]:
    """Names of the corruptions usable on images with ``channels`` channels, in family order."""
    return [n for n in _CORRUPTIONS if channels == 3 or n not in _NEEDS_COLOUR]


def family(name: str) -> str:
    """The family (noise, blur, digital) of corruption ``name``."""
    if name not in _FAMILY:
        raise unknown_name("corruption", name, _CORRUPTIONS)
    return _FAMILY[name]


def describe(name: str | None = None) -> str:
    """How corruption ``name`` (or each one) is defined and differs from CIFAR-10-C."""
    names = [name] if name is not None else list(_CORRUPTIONS)
    lines = []
    for n in names:
        if n not in _NOTES:
            raise unknown_name("corruption", n, _CORRUPTIONS)
        lines.append(f"{n} ({_FAMILY[n]}): {_NOTES[n]}")
    return "\n".join(lines)


def corrupt(
    x: torch.Tensor,
    name: str,
    severity: int,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1–5) to a batch of images.

    Args:
        x: float images (N, C, H, W) in [0, 1] on any device.
        name: one of :func:`available`.
        severity: 1 (mild) … 5 (strong).
        seed: seeds a fresh :class:`torch.Generator` on ``x.device`` (ignored with ``generator``).
        generator: optional generator on ``x.device`` for callers that chain draws.

    Returns:
        Corrupted images, same shape/dtype/device as ``x``, clamped to [0, 1].
    """
    if name not in _CORRUPTIONS:
        raise unknown_name("corruption", name, _CORRUPTIONS)
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ConfigError(f"corruption severity must be an integer 1..5, got {severity!r}")
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        raise DataError(
            "corrupt() needs float images of shape (N, C, H, W) in [0, 1]; got "
            f"{getattr(x, 'dtype', type(x))} with shape {tuple(getattr(x, 'shape', ()))}"
        )
    if name in _NEEDS_COLOUR and x.shape[1] != 3:
        raise DataError(
            f"corruption {name!r} needs 3-channel colour images, got {x.shape[1]} channel(s); "
            f"usable here: {', '.join(available(x.shape[1]))}"
        )
    if min(x.shape[-2:]) < 4:
        raise DataError(
            f"corruptions need images of at least 4×4 pixels, got {tuple(x.shape[-2:])}"
        )
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(int(seed))
    with torch.no_grad():
        out = _CORRUPTIONS[name](x, severity, generator)
    return out.clamp_(0.0, 1.0)

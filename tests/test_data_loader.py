"""TensorLoader and batched augmentation: determinism, coverage, sharding, crop/flip correctness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fortify.data import ImageSet, TensorLoader, augment_batch
from fortify.data.augment import AugmentParams, apply_augment, sample_augment_params
from fortify.errors import DataError, FortifyError


def make_set(n: int = 37, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> ImageSet:
    """Random uint8 images; labels are the sample ids so batches can be traced back."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n))


def epoch_batches(loader: TensorLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def reference_augment(x: torch.Tensor, p: AugmentParams, pad: int, mode: str) -> torch.Tensor:
    """Per-image reference: F.pad, slice the window, flip — the slow obvious way."""
    out = []
    for i in range(len(x)):
        img = x[i : i + 1].float()
        if pad:
            img = F.pad(img, (pad, pad, pad, pad), mode="constant" if mode == "zeros" else mode)
        dy, dx = int(p.dy[i]), int(p.dx[i])
        img = img[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
        if bool(p.flip[i]):
            img = img.flip(3)
        out.append(img)
    return torch.cat(out).to(x.dtype)


def test_batches_are_float_in_unit_range_and_match_data_without_augmentation():
    data = make_set(n=37)
    loader = TensorLoader(data, 10, shuffle=False, device="cpu")
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [len(y) for _, y in batches] == [10, 10, 10, 7]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (37, 3, 8, 8)
    assert torch.equal(y, data.labels)
    assert torch.equal(x, data.images.float() / 255.0)


def test_drop_last_drops_incomplete_batch():
    loader = TensorLoader(make_set(n=37), 10, shuffle=True, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert all(len(y) == 10 for _, y in batches)


def test_shuffle_is_a_permutation_deterministic_per_seed_and_epoch():
    data = make_set(n=50)
    a = TensorLoader(data, 16, shuffle=True, seed=3, augment="crop-flip", crop_padding=2)
    b = TensorLoader(data, 16, shuffle=True, seed=3, augment="crop-flip", crop_padding=2)
    ea0, eb0 = epoch_batches(a, 0), epoch_batches(b, 0)
    for (xa, ya), (xb, yb) in zip(ea0, eb0):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    ids0 = torch.cat([y for _, y in ea0])
    assert sorted(ids0.tolist()) == list(range(50))  # every sample exactly once
    assert not torch.equal(ids0, torch.arange(50))  # actually shuffled
    ids1 = torch.cat([y for _, y in epoch_batches(a, 1)])
    assert not torch.equal(ids0, ids1)  # a different order next epoch
    other_seed = TensorLoader(data, 16, shuffle=True, seed=4)
    assert not torch.equal(ids0, torch.cat([y for _, y in epoch_batches(other_seed, 0)]))


def test_resume_needs_only_set_epoch():
    data = make_set(n=40)
    kw = dict(shuffle=True, seed=11, augment="crop-flip", crop_padding=3)
    run = TensorLoader(data, 8, **kw)
    for e in range(3):
        seen = epoch_batches(run, e)
    fresh = TensorLoader(data, 8, **kw)
    again = epoch_batches(fresh, 2)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(seen, again))
    # Iterating twice in the same epoch repeats the epoch exactly (no hidden state advances).
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(again, epoch_batches(fresh, 2)))


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("mode", ["crop-flip", "crop", "flip"])
def test_apply_augment_matches_per_image_reference(mode, pad_mode):
    x = make_set(n=64, c=3, h=7, w=9).images
    g = torch.Generator().manual_seed(5)
    params = sample_augment_params(len(x), mode, 3, g)
    out = apply_augment(x, params, 3, pad_mode)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, reference_augment(x, params, 3, pad_mode))
    # Float input gives the same result.
    assert torch.equal(apply_augment(x.float(), params, 3, pad_mode), out.float())
    if "crop" in mode:
        assert (params.dy != 3).any() and (params.dx != 3).any()
    else:
        assert (params.dy == 3).all() and (params.dx == 3).all()
    if "flip" in mode:
        assert 0 < int(params.flip.sum()) < len(x)
    else:
        assert not params.flip.any()


def test_crop_keeps_shape_and_moves_content():
    data = make_set(n=64, c=1, h=10, w=10)
    loader = TensorLoader(data, 64, shuffle=False, augment="crop", crop_padding=4, seed=1)
    ((x, y),) = list(loader)
    orig = data.images.float() / 255.0
    assert x.shape == orig.shape
    moved = (x != orig).flatten(1).any(1)
    assert moved.float().mean() > 0.8  # almost all windows are shifted (P(no shift) = 1/81)
    # zero padding shows up as black borders in shifted images
    assert (x == 0).float().mean() > (orig == 0).float().mean()
    index, params = loader.epoch_plan(0)
    assert torch.equal(x, reference_augment(orig, params, 4, "zeros"))


def test_flip_mirrors_about_half_the_images_and_nothing_else():
    data = make_set(n=200, c=3, h=6, w=6)
    loader = TensorLoader(data, 50, shuffle=False, augment="flip", seed=2)
    x = torch.cat([b for b, _ in loader])
    orig = data.images.float() / 255.0
    same = (x == orig).flatten(1).all(1)
    mirrored = (x == orig.flip(3)).flatten(1).all(1)
    assert bool((same ^ mirrored).all())
    assert 60 < int(mirrored.sum()) < 140


@pytest.mark.parametrize("n,world", [(48, 3), (50, 4), (7, 2)])
def test_ddp_shards_are_equal_sized_disjoint_and_cover(n, world):
    data = make_set(n=n)
    kw = dict(shuffle=True, seed=9, augment="crop-flip", crop_padding=2)
    loaders = [TensorLoader(data, 5, rank=r, world_size=world, **kw) for r in range(world)]
    shards = [torch.cat([y for _, y in epoch_batches(ld, 1)]) for ld in loaders]
    assert len({len(ld) for ld in loaders}) == 1  # the same number of batches on every rank
    assert len({len(s) for s in shards}) == 1
    all_ids = torch.cat(shards).tolist()
    assert set(all_ids) == set(range(n))  # covering
    per_rank = -(-n // world)
    assert len(all_ids) == per_rank * world
    assert len(all_ids) - len(set(all_ids)) == per_rank * world - n  # only the padding repeats
    single = TensorLoader(data, 5, **kw)
    ids_single = torch.cat([y for _, y in epoch_batches(single, 1)])
    if n % world == 0:
        for r in range(world):  # a shard of the same permutation, interleaved
            assert torch.equal(shards[r], ids_single[r::world])


def test_augmentation_is_independent_of_world_size():
    data = make_set(n=24)
    kw = dict(shuffle=True, seed=1, augment="crop-flip", crop_padding=3)
    x1 = torch.cat([x for x, _ in epoch_batches(TensorLoader(data, 4, **kw), 0)])
    for r in range(2):
        xr = torch.cat(
            [x for x, _ in epoch_batches(TensorLoader(data, 4, rank=r, world_size=2, **kw), 0)]
        )
        assert torch.equal(xr, x1[r::2])


def test_augment_batch_helper_uses_generator():
    x = make_set(n=16).images.float()
    a = augment_batch(x, "crop-flip", padding=2, generator=torch.Generator().manual_seed(0))
    b = augment_batch(x, "crop-flip", padding=2, generator=torch.Generator().manual_seed(0))
    c = augment_batch(x, "crop-flip", padding=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert augment_batch(x, "none") is x


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(augment="rotate"), "crop-flip"),
        (dict(pad_mode="edge", augment="crop"), "reflect"),
        (dict(augment="crop", pad_mode="reflect", crop_padding=8), "padding"),
        (dict(crop_padding=-1), "crop_padding"),
        (dict(rank=2, world_size=2), "rank"),
        (dict(world_size=0), "world_size"),
    ],
)
def test_bad_loader_arguments_raise_data_error(kwargs, needle):
    args = dict(batch_size=4, shuffle=True) | kwargs
    with pytest.raises(DataError, match=needle):
        TensorLoader(make_set(n=8), **args)


def test_bad_epoch_and_empty_set():
    loader = TensorLoader(make_set(n=8), 4, shuffle=False)
    with pytest.raises(FortifyError, match="epoch"):
        loader.set_epoch(-1)
    empty = ImageSet(torch.zeros(0, 1, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="empty"):
        TensorLoader(empty, 4, shuffle=False)

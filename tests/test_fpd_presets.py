"""FPD presets: the release ones build the release's network shape; the CPU one matches
`fortify replicate fpd-table`; the data options they rely on resize and copy channels."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from fortify.config.loader import load_config, to_dict
from fortify.config.schema import ExperimentConfig
from fortify.data.base import ImageSet
from fortify.data.readers._common import reshape_set
from fortify.errors import DataError

ROOT = Path(__file__).resolve().parents[1] / "configs" / "fpd"
RELEASE = {"mnist.yaml": (3, 64), "svhn.yaml": (3, 64), "svhn-adv-finetune.yaml": (3, 64)}


@pytest.mark.parametrize("name", sorted(RELEASE))
def test_release_presets_use_the_release_input_and_stem(name):
    cfg = load_config(ExperimentConfig, ROOT / name)
    channels, size = RELEASE[name]
    assert cfg.model.kwargs["stem"] == "imagenet"
    assert cfg.data.options["image_size"] == size
    if cfg.data.name == "mnist":
        assert cfg.data.options["channels"] == channels
    opts = cfg.defenses[0].options
    assert (opts["decoder"], opts["pyramid"], opts["bn_stats"], opts["denoise_scale"]) == (
        "linear",
        "raw",
        "shared",
        "n",
    )
    if cfg.train.objective == "fpd":
        assert cfg.train.options["threshold"] == 3.0
        assert cfg.train.options["phase1_optimizer"] == "separate"


def test_release_preset_shape_puts_the_pyramid_at_16x16():
    """resnet with the ImageNet stem at 64×64 (narrowed to run in a test): D and the first
    pyramid level at 16×16, two kernel-2 transposed convs back to 64×64, as the release."""
    from fortify.factory import build_model

    cfg = load_config(ExperimentConfig, ROOT / "svhn.yaml")
    cfg.model.name, cfg.model.kwargs["width"] = "resnet18", 4
    cfg.defenses[0].options["width"] = 8
    model = build_model(cfg.model, cfg.defenses, 10, (3, 64, 64)).eval()
    with torch.no_grad():
        feats = model.pyramid_features(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert len(model.decoder.upsample) == 2


def test_cpu_preset_matches_the_replication():
    from fortify.replicate import fpd_table

    p = argparse.ArgumentParser()
    fpd_table.add_arguments(p)
    ours = to_dict(fpd_table._configs(p.parse_args([]))["fpd"])
    preset = to_dict(load_config(ExperimentConfig, ROOT / "fashion-mnist-cpu.yaml"))
    assert preset["model"] == ours["model"]
    assert preset["defenses"][0]["options"] == ours["defenses"][0]["options"]
    for key in ("objective", "optimizer", "lr", "batch_size", "epochs"):
        assert preset["train"][key] == ours["train"][key], key
    for key in ("threshold", "noise", "second_weight"):
        assert preset["train"]["options"][key] == ours["train"]["options"][key], key


def test_reshape_set_resizes_and_copies_grey_channels():
    g = torch.Generator().manual_seed(0)
    imgs = ImageSet(
        torch.randint(0, 256, (5, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(5)
    )
    out = reshape_set(imgs, "mnist", image_size=64, channels=3)
    assert out.images.shape == (5, 3, 64, 64) and out.images.dtype == torch.uint8
    assert torch.equal(out.images[:, 0], out.images[:, 2])
    assert torch.equal(out.labels, imgs.labels)
    flat = ImageSet(torch.full((2, 1, 28, 28), 77, dtype=torch.uint8), torch.arange(2))
    assert (reshape_set(flat, "mnist", image_size=64).images == 77).all()
    same = reshape_set(imgs, "mnist", channels=1)
    assert torch.equal(same.images, imgs.images)
    with pytest.raises(DataError, match="channels"):
        reshape_set(imgs, "mnist", channels=2)
    rgb = ImageSet(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.arange(1))
    with pytest.raises(DataError, match="channels"):
        reshape_set(rgb, "svhn", channels=1)
    with pytest.raises(DataError, match="image_size"):
        reshape_set(imgs, "mnist", image_size=0)

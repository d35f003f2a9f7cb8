"""FSR presets load, build, and the CPU-scale ones match `fortify replicate fsr-table1`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fortify.config.loader import load_config, to_dict
from fortify.config.schema import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1] / "configs" / "fsr"
PRESETS = sorted(p for p in ROOT.rglob("*.yaml") if p.name != "base.yaml")


def test_release_grid_is_complete():
    for ds in ("cifar10", "svhn"):
        for arch in ("resnet18", "vgg16", "wrn-34-10"):
            for obj in ("at", "trades", "mart"):
                assert (ROOT / ds / f"{arch}-{obj}-fsr.yaml").is_file()


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(ROOT)))
def test_preset_loads(path):
    cfg = load_config(ExperimentConfig, path)
    fsr = [d for d in cfg.defenses if d.kind == "fsr"]
    if path.stem.endswith("fsr") or "-fsr-" in path.stem:
        assert len(fsr) == 1
    if path.parent.name in ("cifar10", "svhn"):
        assert cfg.train.select == "last" and abs(cfg.train.attack.eps - 8 / 255) < 1e-9


def test_fmnist_presets_match_replication_defaults():
    from fortify.replicate import _fsr_recipe as recipe
    from fortify.replicate import fsr_table1 as t1

    parser = argparse.ArgumentParser()
    t1.add_arguments(parser)
    args = parser.parse_args([])
    for row in t1.ROWS:
        preset = to_dict(load_config(ExperimentConfig, ROOT / "fmnist" / f"{row}.yaml"))
        ours = to_dict(recipe.row_config(row, args))
        for section in ("model", "defenses"):
            assert preset[section] == ours[section], (row, section)
        for key in ("objective", "epochs", "lr", "milestones", "batch_size", "precision", "select"):
            assert preset["train"][key] == ours["train"][key], (row, key)
        for key in ("eps", "step_size", "steps"):
            assert preset["train"]["attack"][key] == pytest.approx(ours["train"]["attack"][key])
        assert preset["data"]["train_subset"] == ours["data"]["train_subset"]


def test_fmnist_fsr_preset_builds_and_runs():
    import torch

    from fortify.defenses.fsr import fsr_blocks
    from fortify.factory import build_model

    cfg = load_config(ExperimentConfig, ROOT / "fmnist" / "at-fsr.yaml")
    model = build_model(cfg.model, cfg.defenses, 10, (1, 28, 28))
    assert list(fsr_blocks(model)) == ["layer4"]
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)

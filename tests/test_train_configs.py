"""Presets in configs/ and the ``fortify train`` command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fortify.cli.main import main
from fortify.config import ExperimentConfig, load_config
from fortify.factory import build_model
from fortify.runs import RunDir, load_model

ROOT = Path(__file__).resolve().parents[1]
# configs/rift/ holds options of `fortify rift` (its own schema, tested with fortify.rift);
# every other YAML under configs/ is an experiment preset.
OTHER_SCHEMAS = ("rift",)
CONFIGS = sorted(
    p
    for p in (ROOT / "configs").rglob("*.yaml")
    if p.relative_to(ROOT / "configs").parts[0] not in OTHER_SCHEMAS
)
TRAIN = sorted((ROOT / "configs" / "train").rglob("*.yaml"))


def test_train_presets_exist():
    names = {p.relative_to(ROOT / "configs" / "train").as_posix() for p in TRAIN}
    for ds in ("cifar10", "svhn"):
        for arch in ("resnet18", "vgg16", "wrn-34-10"):
            for obj in ("at", "trades", "mart"):
                assert f"{ds}/{arch}-{obj}.yaml" in names
                # the FSR recipe lives in one file, configs/fsr/, on top of this preset
                assert not (ROOT / "configs/train" / ds / f"{arch}-{obj}-fsr.yaml").exists()
                assert (ROOT / "configs/fsr" / ds / f"{arch}-{obj}-fsr.yaml").is_file()
    assert "rift/cifar10-resnet18-at.yaml" in names
    assert any(n.startswith("cpu/fmnist") for n in names)


def test_no_recipe_name_stands_in_two_trees():
    """``configs/<tree>/<dataset>/<name>.yaml``: one file per recipe name and dataset (a variant
    of another tree's recipe is an overlay with its own name)."""
    where: dict[tuple[str, ...], list[str]] = {}
    for p in CONFIGS:
        parts = p.relative_to(ROOT / "configs").parts
        if len(parts) >= 3 and parts[-1] != "base.yaml":
            where.setdefault(parts[1:], []).append(parts[0])
    assert where, "no configs/<tree>/<dataset>/ files found"
    twice = {"/".join(k): trees for k, trees in where.items() if len(trees) > 1}
    assert not twice, twice


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_yaml_in_configs_loads(path):
    cfg = load_config(ExperimentConfig, path)
    assert isinstance(cfg, ExperimentConfig)


def test_paper_recipes_carry_the_papers_numbers():
    fsr = load_config(ExperimentConfig, ROOT / "configs/fsr/cifar10/resnet18-trades-fsr.yaml")
    assert fsr.train.objective == "trades" and fsr.train.beta == 6.0
    assert fsr.train.attack.eps == pytest.approx(8 / 255)
    assert fsr.train.attack.step_size == 0.007  # the TRADES paper / release inner step
    assert fsr.train.milestones == [75, 90] and fsr.train.epochs == 100
    assert [d.kind for d in fsr.defenses] == ["fsr"]
    svhn = load_config(ExperimentConfig, ROOT / "configs/train/svhn/vgg16-at.yaml")
    assert svhn.train.lr == 0.01 and svhn.train.attack.step_size == pytest.approx(1 / 255)
    assert svhn.defenses == []
    rift = load_config(ExperimentConfig, ROOT / "configs/train/rift/cifar10-resnet18-at.yaml")
    assert rift.train.epochs == 110 and rift.train.milestones == [100, 105]


@pytest.mark.parametrize("arch", ["resnet18", "vgg16", "wrn-34-10"])
@pytest.mark.parametrize("objective", ["trades", "mart"])
def test_cifar10_trades_and_mart_presets_use_the_release_inner_step(arch, objective):
    """TRADES and MART presets (with and without FSR) craft with the releases' 10 steps of
    0.007; the AT rows keep the FSR release's 2/255."""
    for tree, suffix in (("train", ""), ("fsr", "-fsr")):
        cfg = load_config(
            ExperimentConfig, ROOT / f"configs/{tree}/cifar10/{arch}-{objective}{suffix}.yaml"
        )
        assert cfg.train.objective == objective
        assert cfg.train.attack.step_size == 0.007 and cfg.train.attack.steps == 10
        assert cfg.train.attack.eps == pytest.approx(8 / 255)
    at = load_config(ExperimentConfig, ROOT / f"configs/train/cifar10/{arch}-at.yaml")
    assert at.train.attack.step_size == pytest.approx(2 / 255)


@pytest.mark.parametrize(
    "preset", ["fsr/cifar10/resnet18-at-fsr.yaml", "fsr/svhn/vgg16-mart-fsr.yaml"]
)
def test_paper_presets_build_their_model(preset):
    cfg = load_config(ExperimentConfig, ROOT / "configs" / preset)
    model = build_model(cfg.model, cfg.defenses, 10, (3, 32, 32)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


TINY = [
    "data.name=digits", "data.val_size=300", "data.train_subset=256", "device=cpu",
    "model.kwargs={width: 4}", "train.batch_size=64", "train.attack.eps=0.1",
    "train.attack.step_size=0.05", "train.attack.steps=1", "train.val_points=32",
    "train.val_attack_steps=1",
]  # fmt: skip


def test_cli_trains_resumes_and_reports_errors(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--no-progress", "--set", "train.epochs=1",
                 *TINY]) == 0  # fmt: skip
    assert "best checkpoint: epoch 1" in capsys.readouterr().out
    load_model(run, tag="best")
    # a changed config is refused on resume, naming the field; --force accepts it
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs: 1 -> 2" in err and "--force" in err
    assert main(["train", "--resume", str(run), "--force", "--no-progress", "train.epochs=2"]) == 0
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1, 2]
    # a new run into the same folder is refused; bad values name the field and the choices
    assert main(["train", "--run-dir", str(run), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(tmp_path / "x"), "train.optimizer=adagrad"]) == 2
    assert "train.optimizer" in (err := capsys.readouterr().err) and "'adamax'" in err
    assert main(["train", "--run-dir", str(tmp_path / "y"), "train.objective=madry"]) == 2
    assert "unknown objective 'madry'" in capsys.readouterr().err


def test_cli_help_shows_options_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for opt in ("--config", "--run-dir", "--resume", "--overwrite", "--force", "--set"):
        assert opt in out
    assert "default" in out
    # every config field is listed with its built-in default, one per line
    lines = {line.split("=")[0].strip(): line for line in out.splitlines() if " = " in line}
    from fortify.config import ExperimentConfig, describe_fields

    for name, _, _ in describe_fields(ExperimentConfig):
        assert name in lines, f"config field {name} missing from fortify train --help"
    assert "= 100 " in lines["train.epochs"] and "= sgd " in lines["train.optimizer"]
    assert "'sgd' | 'adam' | 'adamax'" in lines["train.optimizer"]
    assert "0.0313725 (=8/255)" in lines["train.attack.eps"]
    assert "= null " in lines["train.grad_clip"] and "= [75, 90] " in lines["train.milestones"]


def test_training_fingerprint_ignores_labels_and_follows_training_changes():
    from fortify.config.loader import from_dict, to_dict
    from fortify.config.schema import ExperimentConfig
    from fortify.train.resume import training_changes, training_fingerprint

    base = to_dict(ExperimentConfig())
    renamed = from_dict(ExperimentConfig, {**base, "name": "another-label", "device": "cpu"})
    longer = from_dict(ExperimentConfig, {**base, "train": {**base["train"], "epochs": 7}})
    assert training_changes(base, renamed) == []
    assert training_fingerprint(renamed) == training_fingerprint(ExperimentConfig())
    assert [c.split(":")[0] for c in training_changes(base, longer)] == ["train.epochs"]
    assert training_fingerprint(longer) != training_fingerprint(ExperimentConfig())

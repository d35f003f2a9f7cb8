"""The config loader: YAML + overrides into the typed schema, with errors naming the field."""

from __future__ import annotations

import pytest

from fortify.config import ExperimentConfig, load_config, to_dict
from fortify.errors import ConfigError


def test_defaults_round_trip():
    cfg = load_config(ExperimentConfig)
    assert cfg.train.attack.steps == 10
    again = load_config(ExperimentConfig, overrides=[])
    assert to_dict(cfg) == to_dict(again)


def test_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\ntrain:\n  epochs: 3\n  attack:\n    eps: 0.1\n")
    cfg = load_config(ExperimentConfig, f, ["train.lr=0.05", "model.kwargs={width: 8}"])
    assert (cfg.name, cfg.train.epochs, cfg.train.lr) == ("x", 3, 0.05)
    assert cfg.train.attack.eps == pytest.approx(0.1)
    assert cfg.model.kwargs == {"width": 8}


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\n  lr: 0.2\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\ntrain:\n  lr: 0.3\n")
    cfg = load_config(ExperimentConfig, tmp_path / "top.yaml")
    assert (cfg.train.epochs, cfg.train.lr) == (7, 0.3)


def test_base_is_relative_to_the_overlay_and_merges_nested_sections(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "variants" / "deep").mkdir(parents=True)
    (tmp_path / "recipes" / "r.yaml").write_text(
        "name: r\ntrain:\n  epochs: 7\n  attack:\n    eps: 0.1\n    steps: 5\n"
        "eval:\n  suite: quick\n"
    )
    (tmp_path / "variants" / "mid.yaml").write_text(
        "base: ../recipes/r.yaml\nname: mid\ntrain:\n  attack:\n    steps: 3\n"
    )
    (tmp_path / "variants" / "deep" / "top.yaml").write_text(
        "base: ../mid.yaml\ntrain:\n  attack:\n    eps: 0.2\n"
    )
    cfg = load_config(ExperimentConfig, tmp_path / "variants" / "deep" / "top.yaml")
    # each overlay replaces only the leaves it names; the rest comes from further down
    assert cfg.name == "mid" and cfg.train.epochs == 7 and cfg.eval.suite == "quick"
    assert (cfg.train.attack.eps, cfg.train.attack.steps) == (pytest.approx(0.2), 3)


def test_base_cycle_is_refused_naming_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: ./a.yaml\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml") as e:
        load_config(ExperimentConfig, tmp_path / "a.yaml")
    assert "base:" in str(e.value)
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(ExperimentConfig, tmp_path / "self.yaml")


def test_base_must_exist(tmp_path):
    (tmp_path / "top.yaml").write_text("base: ../nowhere.yaml\n")
    with pytest.raises(ConfigError, match="base '../nowhere.yaml' does not exist"):
        load_config(ExperimentConfig, tmp_path / "top.yaml")


@pytest.mark.parametrize(
    "override, needle",
    [
        (["train.epoch=3"], "unknown field(s) ['epoch']"),
        (["train.epochs=three"], "train.epochs: expected an integer"),
        (["train.optimizer=rmsprop"], "choose one of ['sgd', 'adam', 'adamax']"),
        (["train.attack.eps=2"], "train.attack.eps must be in (0, 1]"),
        (["bogus=1"], "allowed fields"),
        (["train.epochs"], "must look like section.field=value"),
    ],
)
def test_bad_fields_are_named(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentConfig, overrides=override)
    assert needle in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ExperimentConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(ExperimentConfig, bad)


@pytest.mark.parametrize(
    "text, needles",
    [
        ("train:\n  epoch: 3\n", ["unknown field(s) ['epoch']", "'epochs'"]),
        ("modle:\n  name: resnet18\n", ["unknown field(s) ['modle']", "'model'"]),
        ("train:\n  epochs: three\n", ["train.epochs: expected an integer, got 'three'"]),
        ("train:\n  epochs: 3.5\n", ["train.epochs: expected an integer, got 3.5"]),
        ("train:\n  lr: [0.1]\n", ["train.lr: expected a number"]),
        ("train:\n  attack: {random_start: 1}\n", ["train.attack.random_start", "true/false"]),
        ("data: fashion-mnist\n", ["data: expected a mapping"]),
        ("train:\n  milestones: 75\n", ["train.milestones: expected a list"]),
    ],
)
def test_config_file_with_unknown_fields_or_wrong_types(tmp_path, text, needles):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentConfig, f)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg
    assert str(f) in msg  # the message says which file


def test_error_in_base_file_and_override_on_file(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: many\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(ExperimentConfig, tmp_path / "top.yaml")
    (tmp_path / "ok.yaml").write_text("train:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="plus command-line overrides"):
        load_config(ExperimentConfig, tmp_path / "ok.yaml", ["train.epochs=-1"])

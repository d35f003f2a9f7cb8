"""Numbers in config files and ``--set`` overrides are read as YAML 1.2 / Python read them
(``5e-4``, ``1E6``, ``+1e3``, ``.5``), one loader for both; text fields keep their text."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tiny_runs import cli_err

from fortify.cli._source import parse_model_args
from fortify.config import ConfigDumper, ExperimentConfig, load_config, parse_yaml, to_dict
from fortify.errors import ConfigError

# field -> (written as, expected value): float, int and text fields
SPELLINGS = {
    "train.lr": ("5e-4", 5e-4),
    "train.weight_decay": ("1E-4", 1e-4),
    "train.gamma": ("+.5", 0.5),
    "train.beta": ("+1e3", 1000.0),
    "train.attack.eps": (".5e-1", 0.05),
    "train.grad_clip": ("1_0e-1", 1.0),  # float | None
    "eval.eps": ("2.5e-2", 0.025),  # float | None
    "train.epochs": ("1e3", 1000),  # int: a whole number written with an exponent
    "eval.n_points": ("2.5E3", 2500),
    "data.train_subset": ("5e+4", 50000),  # int | None
    "name": ("1e3", "1e3"),  # str: the text as written, never a number
    "device": ("cpu", "cpu"),
    "data.root": ("5e-4", "5e-4"),  # str | None
}


def _get(cfg: ExperimentConfig, dotted: str) -> object:
    value: object = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _yaml_text(items: dict[str, str]) -> str:
    """``{"train.attack.eps": "1e-2"}`` as a nested YAML mapping, values written verbatim."""
    tree: dict = {}
    for dotted, text in items.items():
        *sections, leaf = dotted.split(".")
        node = tree
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = text

    def lines(node: dict, indent: str) -> list[str]:
        out = []
        for k, v in node.items():
            if isinstance(v, dict):
                out += [f"{indent}{k}:", *lines(v, indent + "  ")]
            else:
                out.append(f"{indent}{k}: {v}")
        return out

    return "\n".join(lines(tree, "")) + "\n"


def _check(cfg: ExperimentConfig) -> None:
    for dotted, (text, want) in SPELLINGS.items():
        got = _get(cfg, dotted)
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, dotted
        assert type(got) is type(want), f"{dotted}: {text} gave {got!r}"


def test_exponent_spellings_in_a_config_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(_yaml_text({k: t for k, (t, _) in SPELLINGS.items()}))
    _check(load_config(ExperimentConfig, f))


def test_exponent_spellings_in_overrides() -> None:
    _check(load_config(ExperimentConfig, None, [f"{k}={t}" for k, (t, _) in SPELLINGS.items()]))


def test_set_with_an_exponent_reaches_the_cli_validation(tmp_path, capsys, monkeypatch) -> None:
    """``--set train.lr=1e6`` is a number: the run is refused for a range, not for a type."""
    monkeypatch.chdir(tmp_path)
    rc, err = cli_err(capsys, "train", "--set", "train.lr=1e6", "--set", "train.min_lr=2E6")
    assert rc == 2 and "train.min_lr must be in [0, lr=1000000.0], got 2000000.0" in err, err
    assert list(tmp_path.iterdir()) == []


def test_integer_fields_take_exact_whole_numbers_only() -> None:
    cfg = load_config(ExperimentConfig, None, ["train.epochs=1e23", "seed=1_0e1"])
    assert cfg.train.epochs == 10**23 and cfg.seed == 100  # exact, not float(1e23)
    for text, why in [("1e-3", "not a whole number"), ("2.55e1", "not a whole number")]:
        with pytest.raises(ConfigError, match=rf"train\.epochs: expected an integer, got {text} "):
            load_config(ExperimentConfig, None, [f"train.epochs={text}"])
        with pytest.raises(ConfigError, match=why):
            load_config(ExperimentConfig, None, [f"train.epochs={text}"])
    with pytest.raises(ConfigError, match=r"got 1e400 \(beyond the float range\)"):
        load_config(ExperimentConfig, None, ["train.epochs=1e400"])
    # without an exponent a fraction point still means a float, as before
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got 3\.0$"):
        load_config(ExperimentConfig, None, ["train.epochs=3.0"])


@pytest.mark.parametrize(
    "text, needle",
    [
        (".nan", "expected a finite number"),
        (".inf", "expected a finite number"),
        ("-.inf", "expected a finite number"),
        ("1e400", "expected a finite number, got 1e400 (beyond the float range: inf)"),
        ("-1.0e+400", "expected a finite number, got -1.0e+400 (beyond the float range: -inf)"),
        ("nan", "expected a number, got 'nan'"),
        ("inf", "expected a number, got 'inf'"),
        ("Infinity", "expected a number, got 'Infinity'"),
        ("'5e-4'", "expected a number, got '5e-4'"),  # quoted: a string, as written
        ("5e", "expected a number, got '5e'"),
        ("1e3e3", "expected a number, got '1e3e3'"),
        ("1.2.3", "expected a number, got '1.2.3'"),
        ("1__0e3", "expected a number, got '1__0e3'"),
    ],
)
def test_non_numbers_and_non_finite_numbers_are_still_refused(text: str, needle: str) -> None:
    for field in ("train.lr", "eval.eps"):  # float, float | None
        with pytest.raises(ConfigError) as info:
            load_config(ExperimentConfig, None, [f"{field}={text}"])
        assert f"{field}: {needle}" in str(info.value)


def test_text_fields_keep_number_like_text(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("name: 1e3\ndefenses:\n  - kind: fsr\n    at: [+.5, 2E-1]\n")
    cfg = load_config(ExperimentConfig, f, ["data.root=1_0e3"])
    assert (cfg.name, cfg.defenses[0].at, cfg.data.root) == ("1e3", ["+.5", "2E-1"], "1_0e3")
    # what YAML 1.1 already read as a number is still refused where text is asked for
    with pytest.raises(ConfigError, match=r"name: expected a string, got 1\.5"):
        load_config(ExperimentConfig, None, ["name=1.5"])
    # and a literal choice is not a number either
    with pytest.raises(ConfigError, match=r"train\.optimizer: 1e3 is not allowed"):
        load_config(ExperimentConfig, None, ["train.optimizer=1e3"])


def test_untyped_options_get_plain_floats() -> None:
    cfg = load_config(ExperimentConfig, None, ["train.options={lr: 5e-4, nested: [1E2, x]}"])
    assert cfg.train.options == {"lr": 5e-4, "nested": [100.0, "x"]}
    assert type(cfg.train.options["lr"]) is float and type(cfg.train.options["nested"][0]) is float
    args = parse_model_args(["eps=1e-3", "sizes=[1e1, 2]", "name=abc"])
    assert args == {"eps": 1e-3, "sizes": [10.0, 2], "name": "abc"}
    assert type(args["eps"]) is float and type(args["sizes"][0]) is float
    # the config that leaves the loader holds only plain Python values
    assert all(type(v) is float for v in (cfg.train.lr, cfg.train.weight_decay))


def test_yaml_11_readings_other_than_decimal_numbers_are_unchanged() -> None:
    text = (
        "a: 010\nb: 0x1F\nc: 1_000\nd: 1:30\ne: 1.5\nf: 5.0e-4\ng: yes\nh: ~\ni: 2024-01-02\n"
        "j: .inf\nk: '1e3'\nl: 1.2.3\nm: nan\nn: -7\n"
    )
    assert parse_yaml(text) == yaml.safe_load(text)


def test_config_dumper_quotes_number_like_text_so_it_reads_back_equal() -> None:
    cfg = load_config(ExperimentConfig, None, ["name=1e3", "train.lr=5e-4", "seed=1e18"])
    data = to_dict(cfg)
    data["train"]["options"] = {"tag": "+.5", "x": 1e-5}
    text = yaml.dump(data, Dumper=ConfigDumper, sort_keys=False)
    assert "name: '1e3'" in text
    assert parse_yaml(text) == data

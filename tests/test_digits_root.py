"""The bundled ``digits`` dataset and the data root: digits ship inside scikit-learn, so an
explicitly given root (``root=``, ``data.root``, ``--data-root``) is refused with a clear error
instead of being silently ignored; no root (the default) and ``$FORTIFY_DATA`` keep working."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_runs import cli_err

from fortify.data import load_dataset, load_from_config
from fortify.errors import DataError

WORDS = r"digits.*scikit-learn.*data root.*data\.root.*--data-root"


def test_digits_load_without_a_root():
    splits = load_dataset("digits", val_size=100)
    assert splits.image_shape == (1, 8, 8) and len(splits.test) == 359
    assert len(load_from_config({"name": "digits", "root": None, "val_size": 100}).test) == 359


@pytest.mark.parametrize("root", ["data", "/nonexistent/digits", ""])
def test_an_explicit_data_root_for_digits_is_refused(root, tmp_path):
    with pytest.raises(DataError, match=WORDS) as e:
        load_dataset("digits", root)
    assert repr(root) in str(e.value)  # names the value it refuses
    with pytest.raises(DataError, match=WORDS):
        load_dataset("digits", str(tmp_path))  # also an existing folder: never read
    with pytest.raises(DataError, match=WORDS):
        load_from_config({"name": "digits", "root": str(tmp_path)})
    with pytest.raises(DataError, match=WORDS):  # the --data-root override of a config
        load_from_config({"name": "digits"}, str(tmp_path))


def test_the_data_env_variable_does_not_concern_digits(tmp_path, monkeypatch):
    """``$FORTIFY_DATA`` is where every dataset is searched, not an option given for digits."""
    monkeypatch.setenv("FORTIFY_DATA", str(tmp_path / "elsewhere"))
    assert len(load_dataset("digits", val_size=100).test) == 359


def test_cli_data_root_for_digits_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", "small-cnn", "--dataset", "digits", "--n-points", "4"]
    rc, err = cli_err(capsys, *argv, "--data-root", str(tmp_path / "data"))
    assert rc == 2 and "--data-root" in err and "scikit-learn" in err, err
    (tmp_path / "tiny.yaml").write_text(
        "name: tiny\ndata: {name: digits, val_size: 100, train_subset: 64}\n"
        "model: {name: small-cnn, kwargs: {width: 4}}\ntrain: {epochs: 1}\n"
    )
    rc, err = cli_err(capsys, "train", "--config", "tiny.yaml", "--set", "data.root=data")
    assert rc == 2 and "data.root" in err and "'data'" in err, err
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["tiny.yaml"]


def test_demo_with_a_data_root_does_not_fall_back_to_digits(tmp_path, capsys):
    """``fortify demo --set data.root=DIR`` looks for Fashion-MNIST in DIR; when it is not there
    that is the error, not a silent switch to digits (which take no root)."""
    from fortify.cli.cmd_demo import _pick_dataset

    with pytest.raises(
        DataError,
        match=r"(?s)fashion-mnist.*nope \(does not exist\).*digits only without a data root",
    ):
        _pick_dataset("auto", str(tmp_path / "nope"))
    assert "digits instead" not in capsys.readouterr().out

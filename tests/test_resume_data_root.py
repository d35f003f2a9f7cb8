"""``fortify train --resume RUN --set data.root=NEW``: where the data are read from is not part
of what is trained, so a run whose data folder moved resumes without ``--force``, bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_data_readers import write_idx_set
from tiny_runs import cli_err

from fortify.config import ExperimentConfig, load_config
from fortify.runs import RunDir
from fortify.train import fit

CONFIG = """\
name: moved
device: cpu
data: {{name: fashion-mnist, root: {root}, val_size: 32}}
model: {{name: small-cnn, kwargs: {{width: 4}}}}
train:
  epochs: 2
  batch_size: 32
  lr: 0.05
  milestones: [1]
  attack: {{eps: 0.1, step_size: 0.04, steps: 1}}
  val_points: 16
  val_attack_steps: 1
"""


class Crash(RuntimeError):
    pass


def _crash_after_epoch_1(epoch: int, record: dict) -> None:
    if epoch == 1:
        raise Crash("simulated kill")


def _last(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "last.safetensors")


def test_resume_with_a_moved_data_root_needs_no_force_and_is_bit_identical(
    tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    old, new = tmp_path / "data-old", tmp_path / "moved" / "data"
    write_idx_set(old / "fashion-mnist", n_train=160, n_test=16)  # Fashion-MNIST IDX files
    (tmp_path / "c.yaml").write_text(CONFIG.format(root=old))

    rc, err = cli_err(capsys, "train", "--config", "c.yaml", "--run-dir", "full", "--no-progress")
    assert rc == 0, err
    with pytest.raises(Crash):
        fit(load_config(ExperimentConfig, tmp_path / "c.yaml"), tmp_path / "cut",
            progress=False, callbacks=[_crash_after_epoch_1])  # fmt: skip
    assert RunDir(tmp_path / "cut").state == "failed"

    # the data folder moves: the old place is gone
    new.parent.mkdir()
    shutil.copytree(old, new)
    shutil.rmtree(old)

    # a change to what is trained is still refused, and names only that field
    rc, err = cli_err(capsys, "train", "--resume", "cut", "--set", f"data.root={new}",
                      "--set", "data.val_size=31")  # fmt: skip
    assert rc == 2 and "data.val_size: 32 -> 31" in err and "--force" in err, err
    assert "data.root" not in err.split("cannot resume", 1)[-1], err

    rc, err = cli_err(capsys, "train", "--resume", "cut", "--set", f"data.root={new}",
                      "--no-progress")  # fmt: skip
    assert rc == 0, err
    assert RunDir(tmp_path / "cut").state == "finished"
    stored = RunDir(tmp_path / "cut").read_config()
    assert stored is not None and stored["data"]["root"] == str(new)  # the new place is kept
    assert [r["epoch"] for r in RunDir(tmp_path / "cut").read_metrics()] == [1, 2]

    full, cut = _last(tmp_path / "full"), _last(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for k in full:
        assert torch.equal(full[k], cut[k]), f"{k} differs after resuming from the moved data"


def test_where_the_data_are_found_is_not_what_is_trained() -> None:
    """``data.root``, ``data.download`` and the cache folder may differ; the fingerprint of a
    config with them at their defaults is unchanged (committed results keep matching)."""
    from fortify.config import to_dict
    from fortify.train.resume import training_changes, training_fingerprint

    base = load_config(ExperimentConfig, None, ["data.options={image_size: 32}"])
    moved = load_config(
        ExperimentConfig, None,
        ["data.root=/new/place", "data.download=true",
         "data.options={image_size: 32, cache_dir: /tmp/cache}"],
    )  # fmt: skip
    assert training_changes(to_dict(base), moved) == []
    assert training_changes(to_dict(moved), base) == []
    assert training_fingerprint(moved) == training_fingerprint(base)
    other = load_config(ExperimentConfig, None, ["data.root=/new/place", "data.train_subset=10"])
    changes = training_changes(to_dict(base), other)
    assert [c.split(":")[0] for c in changes] == ["data.options.image_size", "data.train_subset"]

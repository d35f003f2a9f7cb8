"""Epochs are numbered from 1 wherever people see them, and every place agrees.

The ``fortify train`` print, :class:`FitResult`, ``metrics.jsonl``, checkpoint metadata, the
training-state file names, the per-epoch and resume log lines, and RiFT's fine-tuning summary
all name the same epoch by the same number. Runs written when epochs counted from 0 resume.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fortify.cli.main import main
from fortify.config import ExperimentConfig, load_config
from fortify.runs import RunDir, read_checkpoint
from fortify.train import fit
from fortify.train.state import load_state

BASE = [
    "data.name=digits",
    "data.val_size=300",
    "data.train_subset=256",
    "model.kwargs={width: 4}",
    "device=cpu",
    "train.batch_size=64",
    "train.lr=0.05",
    "train.attack.eps=0.1",
    "train.attack.step_size=0.04",
    "train.attack.steps=2",
    "train.val_points=100",
    "train.val_attack_steps=2",
    "train.select=clean",
    "train.epochs=3",
]


class Crash(RuntimeError):
    pass


def _crash_after(last: int):
    def callback(epoch: int, record: dict) -> None:
        if epoch == last:
            raise Crash(f"stopped after epoch {epoch}")

    return callback


def _meta(run: Path, tag: str) -> dict:
    return read_checkpoint(run / "checkpoints" / f"{tag}.safetensors")[2]


def test_cli_print_metrics_checkpoints_state_files_and_logs_agree(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="fortify.train"):
        assert main(["train", "--no-progress", "--run-dir", str(run), *BASE]) == 0
    out = capsys.readouterr().out
    printed = int(re.search(r"best checkpoint: epoch (\d+) of 3", out)[1])
    records = RunDir(run).read_metrics()
    assert [r["epoch"] for r in records] == [1, 2, 3]
    cleans = [r["val/clean"] for r in records]
    assert printed == 1 + cleans.index(max(cleans))  # the first epoch with the best accuracy
    assert records[-1]["best_epoch"] == printed
    assert _meta(run, "best")["epoch"] == printed
    assert _meta(run, "last")["epoch"] == 3
    assert [p.name for p in (run / "checkpoints").glob("*.pt")] == ["last.state-3.pt"]
    assert re.findall(r"epoch (\d)/3 \|", caplog.text) == ["1", "2", "3"]


def test_fit_result_and_resume_logs_use_the_same_numbers(tmp_path, caplog):
    cfg = load_config(ExperimentConfig, None, BASE)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        fit(cfg, run, progress=False, callbacks=[_crash_after(2)])
    assert _meta(run, "last")["epoch"] == 2
    assert [p.name for p in (run / "checkpoints").glob("*.pt")] == ["last.state-2.pt"]
    caplog.clear()
    with caplog.at_level("INFO", logger="fortify.train"):
        result = fit(cfg, run, mode="resume", progress=False)
    assert "after epoch 2 of 3" in caplog.text
    assert re.findall(r"epoch (\d)/3 \|", caplog.text) == ["3"]
    assert result.epochs_run == 1 and result.last_epoch == 3
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert result.best_epoch == _meta(run, "best")["epoch"] == result.history[-1]["best_epoch"]
    assert 1 <= result.best_epoch <= 3


def _make_legacy(run: Path) -> None:
    """Rewrite a run stopped after its 2nd epoch as fortify wrote it when epochs counted from 0."""
    ck = run / "checkpoints"
    for tag in ("last", "best"):
        side = ck / f"{tag}.json"
        meta = json.loads(side.read_text())
        meta["epoch"] -= 1
        meta.pop("epoch_base")
        side.write_text(json.dumps(meta))
    state = load_state(ck / "last.safetensors", 2)
    state["epoch"] = 1
    state["best_epoch"] -= 1
    for r in state["history"]:
        r["epoch"] -= 1
        r["best_epoch"] -= 1
    torch.save(state, ck / "last.state-1.pt")
    (ck / "last.state-2.pt").unlink()
    RunDir(run).write_metrics(state["history"])


def test_a_run_written_with_epochs_from_0_resumes_and_is_renumbered(tmp_path, caplog):
    cfg = load_config(ExperimentConfig, None, BASE)
    full = fit(cfg, tmp_path / "full", progress=False)
    run = tmp_path / "old"
    with pytest.raises(Crash):
        fit(cfg, run, progress=False, callbacks=[_crash_after(2)])
    _make_legacy(run)
    with caplog.at_level("INFO", logger="fortify.train"):
        result = fit(cfg, run, mode="resume", progress=False)
    assert "after epoch 2 of 3" in caplog.text
    assert result.epochs_run == 1
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1, 2, 3]
    assert result.best_epoch == full.best_epoch
    assert [r["best_epoch"] for r in result.history] == [r["best_epoch"] for r in full.history]
    a = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.safetensors")[0]
    b = read_checkpoint(run / "checkpoints" / "last.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in (run / "checkpoints").glob("*.pt")] == ["last.state-3.pt"]

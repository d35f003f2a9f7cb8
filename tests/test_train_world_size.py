"""Resuming a run with a different number of processes than it was started with (2 → 1, 1 → 2).

The continuation must be a correct run (epochs, samples, learning-rate position, best checkpoint)
that says why it is not bit-identical to the original, and must itself be reproducible.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_ddp import TINY, _run, kill_two_process_run
from test_train_loop import assert_same_state

from fortify.cli.main import main
from fortify.config import ExperimentConfig, load_config
from fortify.errors import ConfigError
from fortify.runs import RunDir, read_checkpoint
from fortify.train import LRSchedule, fit
from fortify.train.loop import check_resume_world_size
from fortify.train.state import load_state

# 400 images, global batch 64: 7 steps per epoch with 1 process (64 each) and with 2 (32 each)
CONFIG = [*TINY, "data.train_subset=400", "train.schedule=cosine"]
STEPS = 7
NOT_EXACT = "will NOT be bit-identical"


def _changed(stored: int, current: int) -> str:
    return f"the run was trained with {stored} process(es) and continues with {current}"


def _cfg(*overrides: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, None, [*CONFIG, *overrides])


def _check_continuation(run: Path, epochs: int, sizes: list[int]) -> None:
    """``run`` finished ``epochs`` epochs with ``sizes[e]`` processes in epoch ``e``, each
    epoch logged once, a full epoch of samples each, the LR schedule at the right position and
    the ``best`` checkpoint the first epoch with the highest validation robustness."""
    assert RunDir(run).state == "finished"
    records = RunDir(run).read_metrics()
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    assert [r["world_size"] for r in records] == sizes
    assert all(r["train/samples"] == 400 and r["val/n"] == 100 for r in records)
    tc = _cfg(f"train.epochs={epochs}").train
    schedule = LRSchedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), tc, STEPS)
    expected_lr = [tc.lr * schedule.factor(e, STEPS - 1) for e in range(epochs)]  # last step
    assert [r["lr"] for r in records] == pytest.approx(expected_lr, rel=1e-12)
    robust = [r["val/robust"] for r in records]
    best = robust.index(max(robust)) + 1  # epochs are numbered from 1
    assert records[-1]["best_epoch"] == best
    assert read_checkpoint(run / "checkpoints" / "best.safetensors")[2]["epoch"] == best
    last_meta = read_checkpoint(run / "checkpoints" / "last.safetensors")[2]
    assert last_meta["epoch"] == epochs and last_meta["world_size"] == sizes[-1]
    state = load_state(run / "checkpoints" / "last.safetensors", epochs)
    assert state["global_step"] == epochs * STEPS
    assert state["history"] == records


def _assert_same_run(a: Path, b: Path, epochs: int) -> None:
    """Two resumes of copies of one interrupted run ended bit for bit alike."""
    wa, _, _ = read_checkpoint(a / "checkpoints" / "last.safetensors")
    wb, _, _ = read_checkpoint(b / "checkpoints" / "last.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between two identical resumes"
    sa, sb = (load_state(r / "checkpoints" / "last.safetensors", epochs) for r in (a, b))
    for key in ("optimizer", "schedule", "rng", "best_metric", "best_epoch"):
        assert_same_state(sa[key], sb[key], key)
    losses = [[r["train/loss"] for r in RunDir(r).read_metrics()] for r in (a, b)]
    assert losses[0] == losses[1]


def test_two_process_run_resumes_with_one_process(tmp_path, caplog):
    cut, epochs, killed_at = kill_two_process_run(tmp_path, CONFIG)
    again = tmp_path / "again"
    shutil.copytree(cut, again)
    for run in (cut, again):  # plain `fortify train --resume`, no torchrun
        caplog.clear()
        with caplog.at_level("WARNING", logger="fortify.train"):
            assert main(["train", "--no-progress", "--resume", str(run)]) == 0
        assert _changed(2, 1) in caplog.text and NOT_EXACT in caplog.text
        assert "global batch stays 64 images (64 per process instead of 32)" in caplog.text
    sizes = [2] * killed_at + [1] * (epochs - killed_at)
    _check_continuation(cut, epochs, sizes)
    _assert_same_run(cut, again, epochs)


class Crash(RuntimeError):
    pass


def _crash_after(last: int) -> Callable[[int, dict[str, Any]], None]:
    """An epoch callback that stops training (like a kill) once epoch ``last`` is saved."""

    def callback(epoch: int, record: dict[str, Any]) -> None:
        if epoch == last:
            raise Crash(f"simulated kill after epoch {epoch}")

    return callback


def test_one_process_run_resumes_with_two_processes(tmp_path):
    epochs = 4
    cut = tmp_path / "cut"
    with pytest.raises(Crash):
        fit(_cfg(f"train.epochs={epochs}"), cut, progress=False, callbacks=[_crash_after(2)])
    again = tmp_path / "again"
    shutil.copytree(cut, again)
    for run in (cut, again):
        proc = _run("--resume", str(run))
        assert f"epochs trained now: {epochs - 2} (of {epochs})" in proc.stdout
        assert proc.stderr.count(_changed(1, 2)) == 1  # rank 0 warns, once
        assert NOT_EXACT in proc.stderr
    _check_continuation(cut, epochs, [1, 1, 2, 2])
    _assert_same_run(cut, again, epochs)


def test_resume_refuses_a_changed_global_batch_unless_forced(tmp_path, caplog):
    run = tmp_path / "run"
    with pytest.raises(Crash):
        fit(_cfg("train.epochs=2"), run, progress=False, callbacks=[_crash_after(1)])
    # as if the run had been trained by 3 processes of 21 images (global batch 63)
    sidecar = run / "checkpoints" / "last.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "world_size": 3}))
    pattern = (
        r"cannot resume with 1 process\(es\): the run was trained with 3 process\(es\) of 21 "
        r"images each \(global batch 63\).* gives 64 each \(global batch 64\).*keeps the "
        r"global batch at 63 \(3, 7, 9, 21, 63\), or pass --force"
    )
    with pytest.raises(ConfigError, match=pattern):
        fit(_cfg("train.epochs=2"), run, mode="resume", progress=False)
    with caplog.at_level("WARNING", logger="fortify.train"):
        result = fit(_cfg("train.epochs=2"), run, mode="resume", progress=False, force=True)
    assert result.epochs_run == 1
    assert "global batch changes from 63 to 64 images (forced)" in caplog.text


def test_check_resume_world_size():
    assert check_resume_world_size(2, 2, 64) is None
    assert check_resume_world_size(None, 2, 64) is None  # unknown: nothing to compare
    note = check_resume_world_size(1, 4, 64)
    assert note is not None and _changed(1, 4) in note and "ranks 0..3" in note
    assert "16 per process instead of 64" in note and NOT_EXACT in note
    with pytest.raises(ConfigError, match=r"global batch 64\).*3 process\(es\) gives 21"):
        check_resume_world_size(2, 3, 64)
    assert "changes from 64 to 63" in check_resume_world_size(2, 3, 64, force=True)

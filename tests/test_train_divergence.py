"""Adversarial training that diverges (an absurd learning rate): one clear error saying that
training diverged, where, and what to do — not the inner attack's complaint about NaN logits —
and nothing already saved is lost or overwritten with the diverged weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_runs import cli_err, snapshot, tiny_config

from fortify.config import ExperimentConfig, load_config
from fortify.runs import RunDir
from fortify.train import NonFiniteLossError, fit

HUGE_LR = "train.lr=1e6"
ADVICE = r"train\.lr.*train\.grad_clip"


def _no_attack_complaint(message: str) -> None:
    assert "logits" not in message and "attack on non-finite outputs" not in message, message


def _saved(run: Path) -> dict[str, bytes]:
    """Checkpoints, training state and metrics: what a failed epoch must leave as they were
    (``status.json`` records the failure; a forced resume rewrites ``config.yaml``)."""
    return {k: v for k, v in snapshot(run).items() if k not in ("status.json", "config.yaml")}


def test_divergence_after_a_good_epoch_keeps_its_checkpoints(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _saved(run)
    assert "checkpoints/last.safetensors" in before and "metrics.jsonl" in before
    (tmp_path / "tiny.yaml").write_text(tiny_config(3))
    cfg = load_config(ExperimentConfig, tmp_path / "tiny.yaml", [HUGE_LR])
    with pytest.raises(NonFiniteLossError) as e:
        fit(cfg, run, mode="resume", force=True, progress=False)
    msg = str(e.value)
    assert "training diverged at epoch 2/3, step 2/2" in msg, msg
    assert "last good checkpoint is kept" in msg and "epoch 1" in msg, msg
    # the schedule's lr at that step (milestone 1: x 0.1) and how to continue
    assert "lower train.lr (1e+05 at that step)" in msg and f"--resume {run} --force" in msg, msg
    _no_attack_complaint(msg)
    assert _saved(run) == before  # byte for byte: nothing lost, truncated or replaced
    assert RunDir(run).state == "failed"
    # the advice works: resume from epoch 1 with a sane learning rate
    cfg = load_config(ExperimentConfig, tmp_path / "tiny.yaml", ["train.lr=0.05"])
    result = fit(cfg, run, mode="resume", force=True, progress=False)
    assert result.epochs_run == 2 and RunDir(run).state == "finished"


@pytest.mark.parametrize(
    "extra",
    [
        [],  # the inner attack of step 2 meets the blown-up model
        # one step per epoch, no validation attack: the end-of-epoch check stops it before the
        # diverged weights are saved as 'last' and 'best'
        ["data.train_subset=64", "train.val_attack_steps=0"],
        ["data.train_subset=64"],  # ... or before validation's attack meets them
    ],
)
def test_cli_divergence_in_the_first_epoch_is_one_clear_error(extra, tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(tiny_config(2))
    run = tmp_path / "run"
    sets = [a for item in [HUGE_LR, *extra] for a in ("--set", item)]
    argv = ["train", "--config", str(tmp_path / "tiny.yaml"), "--run-dir", str(run)]
    rc, err = cli_err(capsys, *argv, *sets, "--no-progress")
    assert rc == 2, err
    assert err.startswith("fortify train: error: training diverged at epoch 1/2, "), err
    assert "no checkpoint had been written yet" in err and "--overwrite" in err, err
    assert len(err.strip().splitlines()) == 1, err
    _no_attack_complaint(err)
    assert not list((run / "checkpoints").glob("*")), "diverged weights were checkpointed"
    assert RunDir(run).state == "failed"


def test_a_non_finite_loss_at_the_first_step_is_not_called_divergence(tmp_path):
    """Before any update the weights cannot have diverged: the message says so."""
    from fortify.models import create

    model = create("small-cnn", 10, 1, width=4)
    with torch.no_grad():
        model.linear.bias.fill_(float("nan"))
    (tmp_path / "tiny.yaml").write_text(tiny_config(1))
    cfg = load_config(ExperimentConfig, tmp_path / "tiny.yaml", ["train.objective=standard"])
    with pytest.raises(NonFiniteLossError, match="before any parameter update") as e:
        fit(cfg, tmp_path / "run", model=model, progress=False)
    assert "diverged" not in str(e.value)


def test_outputs_blowing_up_during_validation_are_reported_as_divergence(tmp_path, monkeypatch):
    """Validation's attack refusing NaN/Inf logits becomes the same divergence error."""
    import fortify.train.loop as loop

    real = loop.validate

    def blow_up_then_validate(model, *args, **kwargs):
        with torch.no_grad():
            model.linear.bias.fill_(float("inf"))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(loop, "validate", blow_up_then_validate)
    (tmp_path / "tiny.yaml").write_text(tiny_config(1))
    cfg = load_config(ExperimentConfig, tmp_path / "tiny.yaml")
    with pytest.raises(NonFiniteLossError) as e:
        fit(cfg, tmp_path / "run", progress=False)
    msg = str(e.value)
    assert msg.startswith("training diverged at epoch 1/1, while validating it: "), msg
    assert "the weights are NaN/Inf (linear.bias)" in msg, msg
    _no_attack_complaint(msg)
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))

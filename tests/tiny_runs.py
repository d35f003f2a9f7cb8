"""Shared by the bad-input tests: a tiny training config, a byte snapshot of a run folder, a tiny
CNN and a guard that fails a test if a replicate command starts work before checking its options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: digits, small-cnn width 4, PGD-1 AT; ``epochs`` is filled in by :func:`tiny_config`.
_TINY = """\
name: tiny
device: cpu
data: {{name: digits, val_size: 100, train_subset: 128}}
model: {{name: small-cnn, kwargs: {{width: 4}}}}
train:
  epochs: {epochs}
  batch_size: 64
  lr: 0.05
  milestones: [1]
  attack: {{eps: 0.1, step_size: 0.04, steps: 1}}
  val_points: 32
  val_attack_steps: 1
"""


def tiny_config(epochs: int) -> str:
    """The tiny config's YAML text with ``epochs`` epochs."""
    return _TINY.format(epochs=epochs)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (hidden lock files excluded)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".fortify.lock"
    }


def cli_err(capsys: Any, *argv: str) -> tuple[int, str]:
    """``fortify ARGV`` in this process: (exit status, what it wrote to stderr)."""
    from fortify.cli.main import main

    rc = main(list(argv))
    return rc, capsys.readouterr().err


def tiny_cnn(k: int = 3) -> Any:
    """A seeded 1×8×8 → ``k``-logit CNN in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, k)
    ).eval()


def forbid_work(monkeypatch: Any, what: str) -> None:
    """Make any training, data loading or estimate fail the test with "work started before
    ``what`` were checked": the replicate commands must check their options first."""
    import fortify.data
    from fortify.replicate import _feature_table, fsr_table1, rift_table1

    def boom(*a: object, **k: object) -> None:
        raise AssertionError(f"work started before {what} were checked")

    monkeypatch.setattr(fortify.data, "load_from_config", boom)
    monkeypatch.setattr(fortify.data, "load_dataset", boom)
    for module in (_feature_table, fsr_table1, rift_table1):
        monkeypatch.setattr(module, "train_or_reuse", boom)
    monkeypatch.setattr(_feature_table, "estimate", boom)

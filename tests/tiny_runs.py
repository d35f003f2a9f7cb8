"""Shared by the bad-input tests: a tiny training config and a byte snapshot of a run folder."""

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

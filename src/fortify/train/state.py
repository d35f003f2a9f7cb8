"""Training state (optimiser, schedule, scaler, RNG, counters) saved next to the ``last`` model.

The state is a dict of tensors and plain Python values written with ``torch.save`` through an
atomic rename and read back with ``torch.load(weights_only=True)``, so loading never unpickles
arbitrary code. NumPy's RNG state is stored as a tensor.

Crash safety: the state of epoch ``e`` goes to ``<tag>.state-<e>.pt`` *before* the model
checkpoint of epoch ``e`` replaces ``last``; older state files are deleted only afterwards. A
crash between the two writes leaves ``last`` at epoch ``e−1`` with its state file still there.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fortify.errors import CheckpointError, RunDirError
from fortify.utils.atomic import atomic_write_with

_STATE_RE = re.compile(r"^(?P<tag>.+)\.state-(?P<epoch>\d+)\.pt$")


def state_path(checkpoint: Path, epoch: int) -> Path:
    """Where the training state of ``epoch`` for model checkpoint ``checkpoint`` lives."""
    return checkpoint.parent / f"{checkpoint.stem}.state-{epoch}.pt"


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a ``weights_only``-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`.

    CUDA states are restored for the devices present in both the state and this process (a
    run resumed on fewer or more GPUs than it was started on); the training loop reseeds
    every device at each epoch start anyway.
    """
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"])[: torch.cuda.device_count()])


def save_state(checkpoint: Path, epoch: int, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` for ``epoch`` next to ``checkpoint``; return its path."""
    path = state_path(checkpoint, epoch)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: a failed write stays an OSError in the chain
            torch.save(state, fh)

    try:
        atomic_write_with(path, write)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        reason = f"{type(exc).__name__}: {exc}"
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError) and cause.strerror:
            reason = cause.strerror  # "No space left on device", not torch's "unexpected pos"
        raise RunDirError(
            f"cannot write the training state {str(path)!r} ({reason}); no file was replaced"
        ) from exc
    return path


def prune_states(checkpoint: Path, keep_epoch: int) -> None:
    """Delete state files of ``checkpoint`` for epochs other than ``keep_epoch``."""
    for p in checkpoint.parent.glob(f"{checkpoint.stem}.state-*.pt"):
        m = _STATE_RE.match(p.name)
        if m and int(m["epoch"]) != keep_epoch:
            p.unlink(missing_ok=True)


def load_state(checkpoint: Path, epoch: int) -> dict[str, Any]:
    """Read the state of ``epoch`` (raises :class:`CheckpointError` if missing or corrupt)."""
    path = state_path(checkpoint, epoch)
    if not path.is_file():
        found = sorted(p.name for p in checkpoint.parent.glob(f"{checkpoint.stem}.state-*.pt"))
        raise CheckpointError(
            f"training state {str(path)!r} for epoch {epoch} of {checkpoint.name} is missing "
            f"(found: {found or 'none'}); cannot resume exactly — start over with --overwrite"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means a corrupt file
        # torch's own message is many lines and advises weights_only=False (unsafe): not shown
        raise CheckpointError(
            f"training state {str(path)!r} is corrupt, truncated or not a fortify training "
            f"state ({type(exc).__name__} while reading it safely); cannot resume exactly — "
            "start over with --overwrite"
        ) from exc

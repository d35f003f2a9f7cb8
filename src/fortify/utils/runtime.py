"""Device selection, seeding and RNG-state capture shared by training, attacks and evaluation."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger("fortify")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return ``cuda`` when available for ``"auto"``/``None``, else the requested device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Capture every RNG state needed to resume exactly (Python, NumPy, torch CPU/CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def configure_threads() -> None:
    """Respect ``FORTIFY_THREADS`` (else torch's default) for intra-op CPU threads."""
    n = os.environ.get("FORTIFY_THREADS")
    if n:
        torch.set_num_threads(int(n))

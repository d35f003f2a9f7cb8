"""Device selection, seeding and RNG-state capture shared by training, attacks and evaluation."""

from __future__ import annotations

import logging
import os
import random
import re
from typing import Any

import numpy as np
import torch

from fortify.errors import ConfigError

log = logging.getLogger(__name__)

DEVICES = "auto | cpu | cuda | cuda:N | mps"
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
SEED_MAX = 2**63 - 1  # seeds are integers in [0, SEED_MAX] (torch and NumPy accept them all)


def check_device_name(device: object, what: str = "device") -> str:
    """Return ``device`` if it is a device name fortify accepts (syntax only), else raise
    :class:`ConfigError` naming it and the allowed forms."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ConfigError(f"{what} {device!r} is not a device fortify can use; allowed: {DEVICES}")
    return device


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return ``cuda`` when available for ``"auto"``/``None``, else the requested device.

    Raises:
        ConfigError: an unknown device name, or a device this machine does not have (``cuda``
            without a usable GPU, ``cuda:N`` beyond the GPU count, ``mps`` off Apple silicon).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = check_device_name(device)
    kind, _, index = name.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device {name!r} was requested but this machine has no usable CUDA GPU; "
                "use device=cpu (or auto)"
            )
        if index and int(index) >= count:
            raise ConfigError(
                f"device {name!r} does not exist: this machine has {count} CUDA GPU(s), "
                f"cuda:0..cuda:{count - 1}"
            )
    if kind == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ConfigError(f"device {name!r} is not available on this machine; use cpu or auto")
    return torch.device(name)


def check_seed(seed: object, what: str = "seed") -> int:
    """Return ``seed`` if it is an integer in ``[0, 2**63 - 1]``, else raise ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{what} must be an integer in [0, 2**63 - 1], got {seed!r}")
    return seed


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """The integer in environment variable ``name`` (``default`` when unset or empty).

    Raises:
        ConfigError: the value is not an integer >= ``minimum`` (the message names the variable).
    """
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(
            f"environment variable {name}={raw!r} must be an integer >= {minimum}; fix or unset it"
        )
    return value


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    check_seed(seed)
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
    """Respect ``FORTIFY_THREADS`` (else torch's default) for intra-op CPU threads.

    Raises:
        ConfigError: ``FORTIFY_THREADS`` is set but not an integer >= 1.
    """
    n = env_int("FORTIFY_THREADS", 0, minimum=1)
    if n:
        torch.set_num_threads(n)


def compute_record(device: str | torch.device, precision: str = "fp32") -> dict[str, Any]:
    """Where a result was computed, for run records and report settings: ``device``,
    ``precision`` (``fp32`` | ``bf16`` | ``fp16``) and the CPU thread counts.

    On a CPU the intra-op thread count changes the order of floating-point reductions, so the
    same seed and config can give different numbers at a different ``num_threads``.
    """
    return {
        "device": str(device),
        "precision": precision,
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
    }

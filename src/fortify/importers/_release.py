"""Reading a released PyTorch checkpoint safely (shared by the importers)."""

from __future__ import annotations

from pathlib import Path

import torch

from fortify.errors import CheckpointError


def read_release_state_dict(path: str | Path, hint: str) -> dict[str, torch.Tensor]:
    """Load a plain state_dict with ``torch.load(weights_only=True)`` (never arbitrary pickles).

    Unwraps a ``{"state_dict"|"model"|"net": {...}}`` container; ``hint`` says what the release
    saves, for the error message.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"release checkpoint {str(p)!r} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # unsafe pickles, truncated files
        raise CheckpointError(
            f"cannot read {str(p)!r} with torch.load(weights_only=True) "
            f"({type(exc).__name__}: {exc}); {hint}"
        ) from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "net"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    ):
        raise CheckpointError(
            f"{str(p)!r} does not hold a state_dict (a mapping of parameter names to tensors)"
        )
    return obj

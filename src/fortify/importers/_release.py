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


_WRAPPER_PREFIXES = ("module.", "model.")


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor] | None:
    if not all(k.startswith(prefix) for k in state):
        return None
    return {k[len(prefix) :]: v for k, v in state.items()}


def match_state_dict(
    state: dict[str, torch.Tensor], model_keys: set[str] | list[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename ``state``'s keys to fit ``model_keys``: strip ``module.`` (DataParallel) and
    ``model.`` wrapper prefixes, or add the ``net.`` of a wrapped container, whichever variant
    shares the most keys with the model (ties: the fewest changes).

    Returns:
        (renamed state, the changes applied, e.g. ``["stripped 'module.'"]``).
    """
    want = set(model_keys)
    variants: list[tuple[dict[str, torch.Tensor], list[str]]] = [(dict(state), [])]
    frontier = list(variants)
    for _ in range(2):  # at most two wrapper layers (module.model.…)
        grown = []
        for cur, notes in frontier:
            for prefix in _WRAPPER_PREFIXES:
                stripped = _strip(cur, prefix)
                if stripped is not None:
                    grown.append((stripped, [*notes, f"stripped {prefix!r}"]))
        variants += grown
        frontier = grown
    if want and all(k.startswith("net.") for k in want if not k.startswith("normalize.")):
        variants += [
            ({f"net.{k}": v for k, v in s.items()}, [*n, "added 'net.'"]) for s, n in variants
        ]
    best = max(variants, key=lambda sn: (len(want & set(sn[0])), -len(sn[1])))
    return best

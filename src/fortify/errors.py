"""Exceptions raised for bad input. Every message names what was wrong and what is allowed."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FortifyError(Exception):
    """Base class for user-facing errors (bad input, bad config, missing files)."""


class ConfigError(FortifyError, ValueError):
    """A configuration field is unknown, has the wrong type or an invalid value."""


class DataError(FortifyError, ValueError):
    """Input data is missing, malformed or out of the allowed range."""


class CheckpointError(FortifyError, ValueError):
    """A checkpoint is corrupt, truncated or does not match the model."""


class RunDirError(FortifyError, RuntimeError):
    """A run directory cannot be used (unwritable, already finished, ...)."""


class EvaluationError(FortifyError, RuntimeError):
    """An evaluation produced an invalid result (e.g. an adversarial example outside the ball)."""


class ComparisonError(FortifyError, ValueError):
    """Two results cannot be compared (different points, ε, norm, suite, mode or seeds)."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> FortifyError:
    """Build an error for an unknown registry name, listing known names and close matches."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return FortifyError(f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known)}.")


def check_positive_int(value: object, what: str) -> int:
    """Return ``value`` if it is an int >= 1, else raise :class:`ConfigError` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def check_point_count(value: object, what: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is None (every point) or an integer >= 1."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an integer >= 1 (or unset: every point), got {value!r}")

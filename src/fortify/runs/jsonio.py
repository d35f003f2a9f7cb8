"""JSON helpers for run files: conversion of numbers/tensors and atomic JSON / text writes."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from fortify.utils.atomic import atomic_write_text

__all__ = ["to_jsonable", "write_json_atomic", "write_text_atomic"]

# Re-exported so report writers need only ``fortify.runs``.
write_text_atomic = atomic_write_text


def to_jsonable(value: Any, where: str = "value") -> Any:
    """Convert ``value`` into JSON-compatible Python objects.

    Handles dicts (string keys), lists/tuples/sets, dataclass instances (e.g. an
    ``ExperimentConfig``, converted field by field), ``pathlib`` paths, NumPy scalars/arrays and
    torch tensors (one element → a number, otherwise nested lists). Non-finite floats stay
    floats (written as ``NaN``/``Infinity``, which Python's ``json`` reads back).

    Raises:
        TypeError: naming ``where`` (the dotted key path) for values that cannot be converted.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            out[k] = to_jsonable(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return [to_jsonable(v, f"{where}[]") for v in sorted(value, key=repr)]
    tolist = getattr(value, "tolist", None)  # numpy scalars/arrays and torch tensors
    if callable(tolist) and type(value).__module__.split(".")[0] in ("numpy", "torch"):
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        return to_jsonable(value.tolist(), where)
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable")


def dumps(value: Any, where: str = "value", indent: int | None = 2) -> str:
    """``json.dumps(to_jsonable(value))`` with a trailing newline when indented."""
    text = json.dumps(to_jsonable(value, where), indent=indent, allow_nan=True)
    return text + "\n" if indent is not None else text


def write_json_atomic(path: str | os.PathLike[str], value: Any, indent: int = 2) -> Path:
    """Atomically write ``value`` as JSON to ``path`` (see :func:`to_jsonable`); return path."""
    path = Path(path)
    atomic_write_text(path, dumps(value, path.name, indent))
    return path

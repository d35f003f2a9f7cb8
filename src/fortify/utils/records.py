"""One convention for turning a result dataclass into a JSON-ready dict."""

from __future__ import annotations

import dataclasses
from typing import Any


def record(obj: Any, *, rename: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """``obj`` (a dataclass instance) as a JSON-ready dict.

    Fields in declaration order, each under its name or ``rename[name]``; a value with a
    ``to_dict()`` method is replaced by its result, tuples become lists; then ``extra`` entries
    (e.g. a computed ``verdict``) in the order given.
    """
    names = rename or {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        elif isinstance(value, tuple):
            value = list(value)
        out[names.get(f.name, f.name)] = value
    out.update(extra)
    return out

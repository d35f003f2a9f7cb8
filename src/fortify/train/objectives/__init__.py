"""Training objectives behind a registry: ``standard``, ``at``, ``trades``, ``mart`` (+ ``fpd``).

``get_objective(name, train_cfg)`` returns an :class:`Objective`; new methods subclass it and
register with ``@register_objective("name")``. See ``docs/training.md`` and ``docs/objectives``.
"""

import importlib

from fortify.train.objectives.base import (
    Metrics,
    NonFiniteLossError,
    Objective,
    StepContext,
    accuracy,
    available_objectives,
    forward_aux,
    get_objective,
    kl_clean_adv,
    register_objective,
    set_train_mode,
    with_aux,
)

# Importing the modules registers their objectives.
from fortify.train.objectives import at, mart, standard, trades  # noqa: E402,F401  isort: skip

try:  # written by the FPD engineer against this interface
    importlib.import_module("fortify.train.objectives.fpd")
except ModuleNotFoundError as _exc:  # pragma: no cover - until fpd.py lands
    if _exc.name != "fortify.train.objectives.fpd":
        raise

__all__ = [
    "Metrics",
    "NonFiniteLossError",
    "Objective",
    "StepContext",
    "accuracy",
    "available_objectives",
    "forward_aux",
    "get_objective",
    "kl_clean_adv",
    "register_objective",
    "set_train_mode",
    "with_aux",
]

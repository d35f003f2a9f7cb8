"""Training objectives behind a registry: ``standard``, ``at``, ``trades``, ``mart``, ``fpd``.

``get_objective(name, train_cfg)`` returns an :class:`Objective`; new methods subclass it and
register with ``@register_objective("name")``. See ``docs/training.md`` and ``docs/objectives``.
"""

from fortify.train.objectives.base import (
    OBJECTIVES,
    AdvBatch,
    Metrics,
    NonFiniteLossError,
    Objective,
    Scored,
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
from fortify.train.objectives import at, fpd, mart, standard, trades  # noqa: E402,F401  isort: skip

__all__ = [
    "AdvBatch",
    "Metrics",
    "NonFiniteLossError",
    "OBJECTIVES",
    "Objective",
    "Scored",
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

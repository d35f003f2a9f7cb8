"""Adversarial training: objectives behind a registry and the one shared training loop.

- :func:`fit` — train an :class:`~fortify.config.ExperimentConfig` into a run directory
  (new / resume / overwrite; single process or ``torchrun`` DDP).
- :func:`get_objective` / :func:`register_objective` — ``standard``, ``at``, ``trades``,
  ``mart`` (and ``fpd``); see ``docs/training.md`` for the :class:`Objective` contract.
"""

from fortify.train.loop import FitResult, apply_trainable, config_diff, fit
from fortify.train.objectives import (
    AdvBatch,
    NonFiniteLossError,
    Objective,
    StepContext,
    available_objectives,
    forward_aux,
    get_objective,
    register_objective,
    with_aux,
)
from fortify.train.optim import LRSchedule, build_optimizer

__all__ = [
    "AdvBatch",
    "FitResult",
    "LRSchedule",
    "NonFiniteLossError",
    "Objective",
    "StepContext",
    "apply_trainable",
    "available_objectives",
    "build_optimizer",
    "config_diff",
    "fit",
    "forward_aux",
    "get_objective",
    "register_objective",
    "with_aux",
]

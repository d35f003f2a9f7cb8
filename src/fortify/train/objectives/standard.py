"""Standard (clean) training: cross-entropy on clean images plus any auxiliary terms."""

from __future__ import annotations

from fortify.train.objectives.at import AdversarialTraining
from fortify.train.objectives.base import register_objective


@register_objective("standard")
class Standard(AdversarialTraining):
    """``L = CE(f(x), y) + Σ aux`` — :class:`AdversarialTraining`'s loss with no inner attack
    (``x_adv = x``), logged as ``ce`` / ``acc``."""

    adversarial = False
    metric_names = ("ce", "acc")

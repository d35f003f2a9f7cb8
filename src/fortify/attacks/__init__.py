"""White-box attacks: FGSM and PGD (L∞ / L2; CE, C&W margin with κ, DLR), targeted or not.

Functional API: ``pgd(model, x, y, eps=..., steps=...)``, ``fgsm(model, x, y, eps=...)``;
with per-sample success masks for evaluators: ``pgd_attack`` / ``fgsm_attack`` returning
:class:`AttackResult`. torchattacks-style classes: ``PGD(model, eps=..., steps=...)(x, y)``,
``FGSM(model, eps=...)(x, y)``. ε and step sizes are in [0, 1] pixel units. Attacks never
change the model's mode nor its parameters' ``.grad``.
"""

from fortify.attacks.classes import FGSM, PGD, Attack
from fortify.attacks.losses import LOSSES, attack_loss
from fortify.attacks.options import MODES, NORMS, PGDOptions
from fortify.attacks.pgd import AttackResult, fgsm, fgsm_attack, pgd, pgd_attack

__all__ = [
    "FGSM",
    "LOSSES",
    "MODES",
    "NORMS",
    "PGD",
    "PGDOptions",
    "Attack",
    "AttackResult",
    "attack_loss",
    "fgsm",
    "fgsm_attack",
    "pgd",
    "pgd_attack",
]

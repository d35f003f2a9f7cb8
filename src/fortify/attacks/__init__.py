"""White-box attacks: FGSM and PGD (L∞ / L2; CE, C&W margin with κ, DLR), targeted or not.

Functional API: ``pgd(model, x, y, eps=..., steps=...)``, ``fgsm(model, x, y, eps=...)``;
with per-sample success masks for evaluators: ``pgd_attack`` / ``fgsm_attack`` returning
:class:`AttackResult`. torchattacks-style classes: ``PGD(model, eps=..., steps=...)(x, y)``,
``FGSM(model, eps=...)(x, y)``. ε and step sizes are in [0, 1] pixel units. Attacks never
change the model's mode nor its parameters' ``.grad``, and their examples lie in the ε-ball
exactly (no tolerance needed when checking ``(x_adv - x).abs().max() <= eps``).
"""

from fortify.attacks.classes import FGSM, PGD, Attack
from fortify.attacks.losses import LOSSES, attack_loss
from fortify.attacks.options import MODES, NORMS, AttackOptions, FGSMOptions, PGDOptions
from fortify.attacks.pgd import AttackResult, fgsm, fgsm_attack, pgd, pgd_attack

__all__ = [
    "FGSM",
    "FGSMOptions",
    "LOSSES",
    "MODES",
    "NORMS",
    "PGD",
    "PGDOptions",
    "Attack",
    "AttackOptions",
    "AttackResult",
    "attack_loss",
    "fgsm",
    "fgsm_attack",
    "pgd",
    "pgd_attack",
]

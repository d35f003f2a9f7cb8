"""Plug-in defences and the mechanism that attaches them to any CNN.

- :mod:`fortify.defenses.contract` — how a defence contributes training losses
- :mod:`fortify.defenses.attach`   — ``attach(model, defence, at=[...])``
- :mod:`fortify.defenses.fsr`      — Feature Separation and Recalibration
- :mod:`fortify.defenses.fpd`      — Feature Pyramid Decoder
"""

from fortify.defenses.attach import attach, attached
from fortify.defenses.contract import AuxContext, AuxLossProvider, capture_aux

__all__ = ["AuxContext", "AuxLossProvider", "attach", "attached", "capture_aux"]

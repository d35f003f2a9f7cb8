"""Plug-in defences and the mechanism that attaches them to any CNN.

- :mod:`fortify.defenses.contract` — how a defence contributes training losses
- :mod:`fortify.defenses.attach`   — ``attach(model, defence, at=[...])``
- :mod:`fortify.defenses.fsr`      — Feature Separation and Recalibration
- :mod:`fortify.defenses.fpd`      — Feature Pyramid Decoder
- :mod:`fortify.defenses.fd`, :mod:`~fortify.defenses.cas`, :mod:`~fortify.defenses.cifs` —
  feature denoising, channel-wise activation suppressing, channel-wise importance-based
  feature selection
- :mod:`fortify.defenses.registry` — ``register_defence(kind)``, ``defence_builder(kind)``
"""

from fortify.defenses.attach import attach, attached
from fortify.defenses.contract import AuxContext, AuxLossProvider, capture_aux

# Importing the defence modules registers every defence kind.
from fortify.defenses import fsr, fpd, fd, cas, cifs  # noqa: E402,F401  isort: skip

__all__ = ["AuxContext", "AuxLossProvider", "attach", "attached", "capture_aux"]

"""The plug-in auxiliary-loss contract between defences and training objectives.

A defence is an ``nn.Module`` attached somewhere inside a model (see
:mod:`fortify.defenses.attach`).
The model's ``forward(x)`` still returns plain logits of shape (N, K). Defences that need
extra training signals (FSR's separation/recalibration losses, FPD's restoration loss) implement
:class:`AuxLossProvider`:

1. While a :func:`capture_aux` context is active, each provider records whatever it needs from
   its own forward pass (auxiliary predictions, masks, restored images). Outside the context it
   records nothing, so attacks and evaluation pay nothing for it. Records live until
   ``capture.losses(...)`` has used them (or the next capture starts), so ``losses`` may be
   called inside or after the ``with`` block.
2. After the forward pass whose terms it wants (for FSR: the pass on adversarial examples), the
   objective calls ``capture.losses(ctx)`` with an :class:`AuxContext`. Every provider returns a
   dict of *already weighted* named loss terms; terms with the same name from several
   providers (e.g. several FSR blocks) are averaged, matching the papers' ``1/|L| Σ_l``.
3. The objective adds the total to its loss and logs each term separately.

Example::

    with capture_aux(model) as cap:
        logits = model(x_adv)
    terms = cap.losses(AuxContext(y=y, logits=logits, x=x_adv, x_clean=x))
    loss = F.cross_entropy(logits, y) + sum(terms.values())
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class AuxContext:
    """What a provider may use to compute its losses.

    Attributes:
        y: true labels, shape (N,), int64.
        logits: the model's final logits from the captured forward pass, shape (N, K).
        x: the input of the captured forward pass, (N, C, H, W) in [0, 1].
        x_clean: the clean images the input was derived from (same shape), if known.
        extra: free-form values an objective wants to pass on.
    """

    y: torch.Tensor
    logits: torch.Tensor
    x: torch.Tensor | None = None
    x_clean: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class AuxLossProvider(Protocol):
    """A module that records state during a captured forward pass and returns loss terms."""

    def start_capture(self) -> None:
        """Begin recording (called on entering :func:`capture_aux`)."""

    def stop_capture(self) -> None:
        """Stop recording (what was recorded stays until :meth:`release`)."""

    def release(self) -> None:
        """Drop recorded tensors (called once the loss terms have been computed)."""

    def aux_losses(self, ctx: AuxContext) -> dict[str, torch.Tensor]:
        """Return weighted scalar loss terms, keyed by a short name such as ``"fsr_sep"``."""


# Recorded tensors live outside the modules (keyed weakly by module) so that deep copies,
# pickling and state dicts never see them, even between a forward pass and ``losses()``.
_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class CaptureMixin:
    """Default ``start_capture``/``stop_capture``/``release`` for providers: a flag plus records."""

    _capturing: bool = False

    def start_capture(self) -> None:
        self._capturing = True
        _RECORDS[self] = {}

    def stop_capture(self) -> None:
        self._capturing = False

    def release(self) -> None:
        _RECORDS.pop(self, None)

    @property
    def capturing(self) -> bool:
        return self._capturing

    def record(self, **values: torch.Tensor) -> None:
        """Store tensors from the current forward pass (only while capturing)."""
        if self._capturing:
            _RECORDS.setdefault(self, {}).update(values)

    @property
    def recorded(self) -> dict[str, torch.Tensor]:
        return _RECORDS.get(self, {})


def aux_providers(model: nn.Module) -> list[nn.Module]:
    """All submodules of ``model`` (DDP-wrapped or not) that implement the contract."""
    return [m for m in model.modules() if isinstance(m, AuxLossProvider) and m is not model]


class AuxCapture:
    """Handle returned by :func:`capture_aux`; turns recorded state into loss terms."""

    def __init__(self, providers: list[nn.Module]):
        self.providers = providers

    def losses(self, ctx: AuxContext) -> dict[str, torch.Tensor]:
        """Weighted loss terms, averaged over providers that report the same name."""
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for p in self.providers:
            for name, value in p.aux_losses(ctx).items():
                sums[name] = sums[name] + value if name in sums else value
                counts[name] = counts.get(name, 0) + 1
            p.release()
        return {name: sums[name] / counts[name] for name in sums}


@contextlib.contextmanager
def capture_aux(model: nn.Module) -> Iterator[AuxCapture]:
    """Record auxiliary state of every provider in ``model`` for forward passes in the block."""
    providers = aux_providers(model)
    for p in providers:
        p.start_capture()
    try:
        yield AuxCapture(providers)
    finally:
        for p in providers:
            p.stop_capture()

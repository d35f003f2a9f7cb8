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

Defences whose *forward pass* depends on the true label in training (CAS and CIFS pick a
class-specific channel mask from it) read it from :func:`labels_for` while a
``capture_aux(model, labels=y)`` or :func:`provide_labels` context is active. Outside such a
context they see no label and must behave as at test time; in evaluation mode they must ignore it.

Example::

    with capture_aux(model) as cap:
        logits = model(x_adv)
    terms = cap.losses(AuxContext(y=y, logits=logits, x=x_adv, x_clean=x))
    loss = F.cross_entropy(logits, y) + sum(terms.values())
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fortify.errors import FortifyError


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
log = logging.getLogger(__name__)

_RECORDS: weakref.WeakKeyDictionary[object, Any] = weakref.WeakKeyDictionary()
# True labels handed to label-reading modules for the forward passes inside a context.
_LABELS: weakref.WeakKeyDictionary[object, Any] = weakref.WeakKeyDictionary()


def labels_for(module: nn.Module) -> torch.Tensor | None:
    """The labels (N,) provided to ``module`` by the active context, or None."""
    return _LABELS.get(module)


@contextlib.contextmanager
def provide_labels(model: nn.Module, labels: torch.Tensor | None) -> Iterator[None]:
    """Hand ``labels`` (N,) to every module of ``model`` that reads labels (``reads_labels``).

    Only modules with a true ``reads_labels`` attribute see them; each decides how to use them
    (CAS/CIFS: the training-mode mask). ``labels=None`` is a no-op.
    """
    if labels is None:
        yield
        return
    readers = [m for m in model.modules() if getattr(m, "reads_labels", False)]
    previous = {m: _LABELS.get(m) for m in readers}
    for m in readers:
        _LABELS[m] = labels
    try:
        yield
    finally:
        for m, old in previous.items():
            if old is None:
                _LABELS.pop(m, None)
            else:
                _LABELS[m] = old


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


class ChannelSelectionBlock(CaptureMixin):
    """Shared behaviour of blocks that reweight channels from auxiliary class logits (CAS,
    CIFS): ``parts(f)`` returns an object with ``logits`` (N, K) and ``out`` (shape of ``f``);
    ``forward`` returns ``out`` and records ``logits`` while capturing, and
    :meth:`captured_logits` hands them to ``aux_losses``."""

    def parts(self, f: torch.Tensor) -> Any:
        raise NotImplementedError

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, C, H, W); records the auxiliary logits while capturing."""
        p = self.parts(f)
        self.record(logits=p.logits)
        return p.out

    def captured_logits(self, ctx: AuxContext, label: str) -> torch.Tensor | None:
        """The auxiliary logits of the last captured forward, or None (with a warning) if the
        block did not run during capture; FortifyError if they do not match ``ctx.y``."""
        rec = self.recorded
        if not rec:
            log.warning("%s block recorded nothing during capture_aux; no %s loss added", label,
                        label)  # fmt: skip
            return None
        logits = rec["logits"]
        if ctx.y.shape[0] != logits.shape[0]:
            raise FortifyError(
                f"AuxContext.y has {ctx.y.shape[0]} labels but the captured {label} forward saw "
                f"{logits.shape[0]} inputs"
            )
        return logits


def aux_providers(model: nn.Module) -> list[AuxLossProvider]:
    """All submodules of ``model`` (DDP-wrapped or not) that implement the contract."""
    return [m for m in model.modules() if isinstance(m, AuxLossProvider) and m is not model]


class AuxCapture:
    """Handle returned by :func:`capture_aux`; turns recorded state into loss terms."""

    def __init__(self, providers: list[AuxLossProvider]):
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
def capture_aux(model: nn.Module, labels: torch.Tensor | None = None) -> Iterator[AuxCapture]:
    """Record auxiliary state of every provider in ``model`` for forward passes in the block.

    Args:
        labels: the true labels (N,) of the captured batch, handed to label-reading modules
            (see :func:`provide_labels`) for the forward passes inside the block.
    """
    providers = aux_providers(model)
    for p in providers:
        p.start_capture()
    try:
        with provide_labels(model, labels):
            yield AuxCapture(providers)
    finally:
        for p in providers:
            p.stop_capture()

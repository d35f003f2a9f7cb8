"""The settings of PGD, written once: names, defaults, allowed values and their meaning.

:class:`PGDOptions` is what :func:`~fortify.attacks.pgd_attack`, :func:`~fortify.attacks.pgd`
and :class:`~fortify.attacks.PGD` accept as keyword arguments (or as ``options=``); its
:meth:`~PGDOptions.validate` is the one check of them. ε and step sizes are in [0, 1] pixel
units.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from fortify.attacks.losses import LOSSES
from fortify.errors import ConfigError

NORMS = ("linf", "l2")
MODES = ("final", "best", "both")


def plain_scalar(value: object) -> object:
    """A NumPy scalar (``np.float32(0.03)``, ``np.int64(10)``) or a one-element 0-d tensor
    without gradient as the Python number it holds; anything else unchanged (to be checked)."""
    if isinstance(value, np.generic) and isinstance(value.item(), (bool, int, float)):
        return value.item()
    if (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and not value.requires_grad
        and not value.is_complex()
        and value.device.type != "meta"
    ):
        return value.item()
    return value


def check_number(value: object, what: str, low: float, high: float, *, open_low: bool) -> float:
    """``value`` as a float in ``(low, high]`` (``open_low``) or ``[low, high]``; else a
    :class:`ConfigError` naming ``what`` and the interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(v) and (v > low if open_low else v >= low) and v <= high
    if not ok:
        left = "(" if open_low else "["
        right = ")" if math.isinf(high) else "]"  # infinity itself is refused (not finite)
        raise ConfigError(
            f"{what} must be a number in {left}{low:g}, {high:g}{right}, got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


def check_flag(value: object, what: str) -> None:
    """Refuse anything but ``True`` / ``False`` (a truthy string such as ``"no"`` included)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be True or False, got {value!r}")


def check_norm(norm: object) -> None:
    """Refuse a threat-model norm other than :data:`NORMS`."""
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")


def check_loss(loss: object, kappa: object) -> None:
    """Refuse an attack loss other than ``LOSSES`` or a C&W confidence below 0."""
    if loss not in LOSSES:
        raise ConfigError(f"unknown attack loss {loss!r}; allowed: {', '.join(LOSSES)}")
    check_number(kappa, "kappa (C&W confidence)", 0.0, math.inf, open_low=False)


_O = TypeVar("_O", bound="AttackOptions")


def _plain(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: plain_scalar(v) for k, v in settings.items()}


@dataclass(frozen=True)
class AttackOptions:
    """Base of the attacks' options: :meth:`build` from keyword arguments, :meth:`validate`."""

    KIND: ClassVar[str] = "attack"
    REQUIRED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def build(cls: type[_O], options: _O | None = None, /, **settings: Any) -> _O:
        """``options`` (if given) with ``settings`` replacing its fields, else
        ``cls(**settings)``; a misspelt name is a :class:`ConfigError` with close matches
        (not validated: see :meth:`validate`)."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in settings:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(
                    f"unknown {cls.KIND} option {key!r}{hint} (allowed: {', '.join(names)})"
                )
        if options is not None:
            if not isinstance(options, cls):
                raise ConfigError(
                    f"options must be a {cls.__name__} for {cls.KIND}, got "
                    f"{type(options).__name__}; pass {cls.__name__}(...) or keyword settings"
                )
            return dataclasses.replace(options, **_plain(settings))
        missing = [n for n in cls.REQUIRED if n not in settings]
        if missing:
            raise TypeError(f"{cls.KIND} needs the keyword argument(s) {', '.join(missing)}")
        return cls(**_plain(settings))

    def validate(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError


@dataclass(frozen=True)
class PGDOptions(AttackOptions):
    """Settings of projected gradient descent.

    Attributes:
        eps: radius of the threat model in pixel units (L∞: max per-pixel change; L2: norm);
            at most 1 (L∞) or the image's L2 diameter (checked against the images).
        steps: number of gradient steps (each one forward + backward), an integer >= 1.
        step_size: step length in pixel units; None: ``2.5 * eps / steps``.
        norm: ``"linf"`` (sign steps) or ``"l2"`` (steps normalised per sample).
        loss: ``"ce"``, ``"cw"`` (margin with confidence ``kappa``) or ``"dlr"``.
        random_start: start uniformly in the ball (L∞) / at a random point of the ball (L2).
        restarts: independent runs; each later restart only attacks points not yet broken.
        targeted: make the model predict ``target`` (N,) instead of avoiding ``y``.
        kappa: C&W confidence (>= 0) of the ``cw`` loss.
        mode: ``"final"`` (last iterate), ``"best"`` (first iterate seen to fool; broken points
            leave the batch) or ``"both"`` (final examples plus the first fooling iterate of
            the same run; :func:`~fortify.attacks.pgd_attack` only).
        generator: RNG for the random start (its device is used to draw the noise).
    """

    eps: float
    steps: int
    step_size: float | None = None
    norm: str = "linf"
    loss: str = "ce"
    random_start: bool = True
    restarts: int = 1
    targeted: bool = False
    kappa: float = 0.0
    mode: str = "final"
    generator: torch.Generator | None = None

    KIND: ClassVar[str] = "PGD"
    REQUIRED: ClassVar[tuple[str, ...]] = ("eps", "steps")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field and what it allows (``eps``
        is at most 1 for L∞; for L2 its upper bound depends on the images and is checked by the
        attack)."""
        check_norm(self.norm)
        top = 1.0 if self.norm == "linf" else math.inf
        check_number(self.eps, f"eps ({self.norm}, pixel units)", 0.0, top, open_low=True)
        check_loss(self.loss, self.kappa)
        check_flag(self.random_start, "random_start")
        check_flag(self.targeted, "targeted")
        for what, n in (("steps", self.steps), ("restarts", self.restarts)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"{what} must be an integer >= 1, got {n!r}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown PGD mode {self.mode!r}; allowed: {', '.join(MODES)}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ConfigError(
                f"generator must be a torch.Generator or None, got {self.generator!r}"
            )
        if self.step_size is not None:
            check_number(self.step_size, "step_size (pixel units)", 0.0, math.inf, open_low=True)

    def resolved_step_size(self) -> float:
        """``step_size``, or its default ``2.5 * eps / steps``."""
        if self.step_size is None:
            return 2.5 * self.eps / self.steps
        return float(self.step_size)


@dataclass(frozen=True)
class FGSMOptions(AttackOptions):
    """Settings of the fast gradient sign method (L∞, one step of ``eps``).

    Attributes:
        eps: the step and the radius of the threat model in pixel units (at most 1).
        loss: ``"ce"``, ``"cw"`` (margin with confidence ``kappa``) or ``"dlr"``.
        targeted: make the model predict ``target`` (N,) instead of avoiding ``y``.
        kappa: C&W confidence (>= 0) of the ``cw`` loss.
    """

    KIND: ClassVar[str] = "FGSM"
    REQUIRED: ClassVar[tuple[str, ...]] = ("eps",)

    eps: float
    loss: str = "ce"
    targeted: bool = False
    kappa: float = 0.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field and what it allows."""
        check_number(self.eps, "eps (linf, pixel units)", 0.0, 1.0, open_low=True)
        check_loss(self.loss, self.kappa)
        check_flag(self.targeted, "targeted")


__all__ = [
    "MODES",
    "NORMS",
    "AttackOptions",
    "FGSMOptions",
    "PGDOptions",
    "check_flag",
    "check_loss",
    "check_norm",
    "check_number",
    "plain_scalar",
]

"""torchattacks-style wrappers: ``x_adv = PGD(model, eps=8/255, steps=10)(x, y)``."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from fortify.attacks.options import AttackOptions, FGSMOptions, PGDOptions
from fortify.attacks.pgd import fgsm, pgd
from fortify.errors import ConfigError


class Attack:
    """Base class: holds the model and its :attr:`options` (an
    :class:`~fortify.attacks.options.AttackOptions`, whose fields read and write as attributes:
    ``atk.eps``, validated when set: a bad value raises
    :class:`~fortify.errors.ConfigError` there); ``attack(x, y)`` returns adversarial images."""

    options: AttackOptions

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.forward(x, y, target)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def _option_names(self) -> set[str]:
        options = self.__dict__.get("options")
        return set() if options is None else {f.name for f in dataclasses.fields(options)}

    def __getattr__(self, name: str) -> Any:
        if name in self._option_names():
            return getattr(self.__dict__["options"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._option_names():
            value = dataclasses.replace(self.__dict__["options"], **{name: value})
            name = "options"
        if name == "options":  # a bad setting is refused where it is set, not at the next call
            if not isinstance(value, AttackOptions):
                raise ConfigError(
                    f"options must be an AttackOptions (PGDOptions, FGSMOptions), got "
                    f"{type(value).__name__}"
                )
            value.validate()
        super().__setattr__(name, value)

    def __repr__(self) -> str:
        options = self.__dict__.get("options")
        if options is None:
            return f"{type(self).__name__}()"
        fields = ", ".join(
            f"{f.name}={getattr(options, f.name)!r}" for f in dataclasses.fields(options)
        )
        return f"{type(self).__name__}({fields})"


class PGD(Attack):
    """Projected gradient descent; see :func:`fortify.attacks.pgd` (ε, step in pixel units).

    ``PGD(model, eps=8/255, steps=10, step_size=None, **settings)``: the settings are the
    fields of :class:`~fortify.attacks.options.PGDOptions` (here ``eps`` defaults to 8/255
    and ``steps`` to 10), kept in :attr:`options`.
    """

    options: PGDOptions

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        **settings: Any,
    ):
        super().__init__(model)
        self.options = PGDOptions.build(eps=eps, steps=steps, step_size=step_size, **settings)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return pgd(self.model, x, y, target=target, options=self.options)


class FGSM(Attack):
    """Fast gradient sign method; see :func:`fortify.attacks.fgsm` (ε in pixel units).

    ``FGSM(model, eps=8/255, **settings)``: the settings are the fields of
    :class:`~fortify.attacks.options.FGSMOptions`, kept in :attr:`options`.
    """

    options: FGSMOptions

    def __init__(self, model: nn.Module, eps: float = 8 / 255, **settings: Any):
        super().__init__(model)
        self.options = FGSMOptions.build(eps=eps, **settings)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return fgsm(self.model, x, y, target=target, options=self.options)

"""torchattacks-style wrappers: ``x_adv = PGD(model, eps=8/255, steps=10)(x, y)``."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from fortify.attacks.options import PGDOptions
from fortify.attacks.pgd import fgsm, pgd


class Attack:
    """Base class: holds the model and settings; ``attack(x, y)`` returns adversarial images."""

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

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "model")
        return f"{type(self).__name__}({fields})"


class PGD(Attack):
    """Projected gradient descent; see :func:`fortify.attacks.pgd` (ε, step in pixel units).

    ``PGD(model, eps=8/255, steps=10, step_size=None, **settings)``: the settings are the
    fields of :class:`~fortify.attacks.options.PGDOptions` (here ``eps`` defaults to 8/255
    and ``steps`` to 10), kept in :attr:`options` and readable as attributes (``atk.eps``).
    """

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

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and name in {f.name for f in dataclasses.fields(options)}:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        options = self.__dict__.get("options")
        if options is not None and name in {f.name for f in dataclasses.fields(options)}:
            name, value = "options", dataclasses.replace(options, **{name: value})
        super().__setattr__(name, value)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options)
        )
        return f"{type(self).__name__}({fields})"

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return pgd(self.model, x, y, target=target, options=self.options)


class FGSM(Attack):
    """Fast gradient sign method; see :func:`fortify.attacks.fgsm` (ε in pixel units)."""

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        *,
        loss: str = "ce",
        targeted: bool = False,
        kappa: float = 0.0,
    ):
        super().__init__(model)
        self.eps, self.loss, self.targeted, self.kappa = eps, loss, targeted, kappa

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return fgsm(
            self.model,
            x,
            y,
            eps=self.eps,
            loss=self.loss,
            targeted=self.targeted,
            target=target,
            kappa=self.kappa,
        )

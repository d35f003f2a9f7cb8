"""torchattacks-style wrappers: ``x_adv = PGD(model, eps=8/255, steps=10)(x, y)``."""

from __future__ import annotations

import torch
from torch import nn

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
    """Projected gradient descent; see :func:`fortify.attacks.pgd` (ε, step in pixel units)."""

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        *,
        norm: str = "linf",
        loss: str = "ce",
        random_start: bool = True,
        restarts: int = 1,
        targeted: bool = False,
        kappa: float = 0.0,
        mode: str = "final",
        generator: torch.Generator | None = None,
    ):
        super().__init__(model)
        self.eps, self.steps, self.step_size = eps, steps, step_size
        self.norm, self.loss, self.random_start, self.restarts = norm, loss, random_start, restarts
        self.targeted, self.kappa, self.mode, self.generator = targeted, kappa, mode, generator

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return pgd(
            self.model,
            x,
            y,
            eps=self.eps,
            steps=self.steps,
            step_size=self.step_size,
            norm=self.norm,
            loss=self.loss,
            random_start=self.random_start,
            restarts=self.restarts,
            targeted=self.targeted,
            target=target,
            kappa=self.kappa,
            mode=self.mode,
            generator=self.generator,
        )


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

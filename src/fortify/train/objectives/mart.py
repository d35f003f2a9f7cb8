"""MART (Wang et al., 2020): boosted CE on x_adv plus β·KL(f(x) ‖ f(x_adv))·(1 − p_y(x))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fortify.train.objectives.base import (
    Metrics,
    Objective,
    StepContext,
    accuracy,
    forward_aux,
    kl_clean_adv,
    register_objective,
    with_aux,
)

_EPS = 1e-12  # inside logs, so that probabilities of exactly 0 or 1 stay finite


@register_objective("mart")
class Mart(Objective):
    """``L = BCE(p(x_adv), y) + β · mean_i KL(p(x_i) ‖ p(x_adv,i)) · (1 − p_y(x_i)) + Σ aux``.

    ``BCE = −log p_y(x_adv) − log(1 − max_{k≠y} p_k(x_adv))``; ``x_adv`` from ``train.attack``.
    """

    options: dict[str, object] | None = {}

    def compute(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        x_adv: torch.Tensor,
        ctx: StepContext,
    ) -> tuple[torch.Tensor, Metrics]:
        logits_clean = model(x)
        logits_adv, terms = forward_aux(model, x_adv, y, x_clean=x)
        p_adv = F.softmax(logits_adv.float(), dim=1)
        ce = F.cross_entropy(logits_adv.float(), y)
        wrong = p_adv.scatter(1, y[:, None], -1.0).amax(1)  # max over k != y
        boost = -torch.log(1.0 - wrong + _EPS).mean()
        p_true = F.softmax(logits_clean.float(), dim=1).gather(1, y[:, None]).squeeze(1)
        kl = (kl_clean_adv(logits_clean, logits_adv) * (1.0 - p_true)).mean()
        metrics: Metrics = {
            "ce_adv": ce.detach(),
            "boost": boost.detach(),
            "kl_weighted": kl.detach(),
            "acc": accuracy(logits_clean, y),
            "acc_adv": accuracy(logits_adv, y),
        }
        return with_aux(ce + boost + self.cfg.beta * kl, terms, metrics)

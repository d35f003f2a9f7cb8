"""The adaptive suite sees through a saturated bounded output (the FPD gradient-masking trap)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fortify.models.resnet  # noqa: F401  (registers the ResNets)
from fortify.defenses.fpd import build_fpd
from fortify.defenses.registry import DefenceSpec
from fortify.errors import ConfigError, FortifyError
from fortify.evaluate import available_suites, evaluate
from fortify.evaluate.adaptive import AdaptiveOptions, UnboundedLogits, adaptive_evaluate
from fortify.models import create


class SaturatedLinear(nn.Module):
    """tanh(1000 · (W x + b)): every logit is saturated, so CE gradients are exactly 0 in fp32."""

    def __init__(self, k: int = 10, d: int = 16, scale: float = 1000.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(d, k)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(k, d, generator=g) / d**0.5)
            self.lin.bias.copy_(-self.lin.weight.sum(1) / 2 - 0.6)
        self.scale = scale

    def unbounded_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.lin(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.unbounded_logits(x))


def _toy_data(model: SaturatedLinear, n: int = 48):
    torch.manual_seed(0)
    x = torch.rand(4000, 1, 4, 4)
    with torch.no_grad():
        z = model.unbounded_logits(x)
    keep = ((z > 0).sum(1) == 1) & (z.abs().min(1).values > 20)  # one winner, all saturated
    return x[keep][:n], z[keep][:n].argmax(1)


def test_suite_is_registered():
    assert "adaptive" in available_suites()


def test_adaptive_beats_ce_on_a_saturated_model():
    model = SaturatedLinear()
    x, y = _toy_data(model)
    report = adaptive_evaluate(
        model, x, y, eps=0.1, steps=20, autoattack="none", adaptive_square_queries=0, checks=False
    )
    row = report.table()["final"]
    assert row["Natural"] == 100.0
    assert row["FGSM"] == 100.0  # zero gradient: FGSM cannot move
    headline = report.extras["adaptive"]["headline"]
    assert headline == row["Ensemble"]
    assert min(row["PGD-20 C&W"], row["PGD-20 DLR"]) < row["PGD-20 CE"] - 30
    assert headline < row["PGD-20 CE"] - 30
    assert report.extras["adaptive"]["zero_grad_fraction_output"] == 1.0
    assert report.extras["adaptive"]["zero_grad_fraction_logits"] == 0.0
    status = {c.name: c.status for c in report.checks}
    assert status["bounded output"] == "warn"
    assert status["CE on output vs logit attacks"] == "warn"
    assert status["saturated ties"] == "ok"
    assert report.extras["large_eps_logits"]["accuracy"] < 20.0


def test_fpd_model_with_transfer_and_square():
    torch.manual_seed(0)
    fpd = build_fpd(
        create("small-resnet", num_classes=10, in_channels=1, width=4),
        DefenceSpec("small-resnet", [], {"width": 8}, 10, (1, 16, 16)),
    )
    surrogate = create("small-resnet", num_classes=10, in_channels=1, width=4)
    x = torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        y = fpd.eval()(x).argmax(1)
    report = adaptive_evaluate(
        fpd,
        x,
        y,
        eps=0.1,
        steps=2,
        autoattack="none",
        adaptive_square_queries=20,
        surrogate=surrogate,
        checks=False,
    )
    row = report.table()["final"]
    expected = {
        "Natural",
        "FGSM",
        "PGD-2 CE",
        "PGD-2 C&W",
        "PGD-2 DLR",
        "Square",
        "Square (logits)",
        "Transfer",
        "Ensemble",
    }
    assert set(row) == expected
    assert all(row["Ensemble"] <= v for v in row.values())
    assert report.extras["adaptive"]["logits_available"] is True


def test_plain_model_falls_back_to_its_output():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 10, (8,))
    report = evaluate(model, x, y, eps=0.05, suite="adaptive", checks=False)
    assert report.extras["adaptive"]["logits_available"] is False


def test_bad_options():
    with pytest.raises(ConfigError, match="autoattack"):
        adaptive_evaluate(
            SaturatedLinear(),
            torch.rand(2, 1, 4, 4),
            torch.zeros(2, dtype=torch.long),
            eps=0.1,
            autoattack="sometimes",
        )
    with pytest.raises(ConfigError, match="steps"):
        AdaptiveOptions(steps=0).validate()
    with pytest.raises(FortifyError, match="unbounded_logits"):
        UnboundedLogits(nn.Linear(2, 2))

"""The one pyautoattack adapter: standard version only, K >= 4 classes for every caller, target
classes, the ball, the caller's RNG state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fortify.errors import ConfigError
from fortify.evaluate import evaluate
from fortify.evaluate.autoattack import Square, StandardAutoAttack, capture_warnings


def _linear(k: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, k)).eval()


def _points(model: nn.Module, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 4, 4, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


@pytest.mark.parametrize("suite", ["autoattack", "full"])
def test_suites_refuse_fewer_than_four_classes(suite, monkeypatch):
    """Raised before any attack runs (``full`` does not run its paper attacks first)."""
    import fortify.evaluate.context as context

    monkeypatch.setattr(context.SuiteContext, "run_pgd", None)  # any attack would fail
    model = _linear(3)
    x, y = _points(model)
    with pytest.raises(
        ConfigError, match=r"at least 4 classes.*the model has 3; use suite 'paper'"
    ):
        evaluate(model, x, y, suite=suite, eps=0.1, checks=False)


def test_adaptive_refuses_fewer_than_four_classes_before_attacking(monkeypatch):
    """Same policy as the AutoAttack suites (no silent custom version), raised before any
    attack runs; ``autoattack="none"`` runs the other columns."""
    import fortify.evaluate.context as context

    model = _linear(3)
    x, y = _points(model)
    calls = []
    real = context.SuiteContext.run_pgd
    monkeypatch.setattr(
        context.SuiteContext,
        "run_pgd",
        lambda self, *a, **k: calls.append(a) or real(self, *a, **k),
    )
    opts = {"steps": 2, "square_queries": 0}
    with pytest.raises(
        ConfigError, match=r"the model has 3; give the adaptive option autoattack='none'"
    ):
        evaluate(model, x, y, suite="adaptive", eps=0.1, checks=False, suite_options=opts)
    assert calls == []
    r = evaluate(
        model, x, y, suite="adaptive", eps=0.1, checks=False,
        suite_options={**opts, "autoattack": "none"},
    )  # fmt: skip
    assert "AutoAttack" not in r.columns and "PGD-2 CE" in r.columns and calls


def test_standard_autoattack_targets_ball_and_rng():
    model = _linear(5)
    x, y = _points(model, 3)
    aa = StandardAutoAttack(model, num_classes=5, norm="linf", eps=0.1, seed=0, device="cpu")
    assert aa.adversary.version == "standard"
    assert aa.targets == 4 and aa.adversary.apgd_targeted.n_target_classes == 4
    assert aa.note == "APGD-T/FAB-T with 4 target classes (model has 5)"
    assert (
        StandardAutoAttack(
            _linear(10), num_classes=10, norm="l2", eps=0.5, seed=0, device="cpu"
        ).note
        == ""
    )
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with capture_warnings() as found:
        adv = aa(x, y)
    assert torch.equal(torch.rand(3), expected)  # pyautoattack reseeded only inside a fork
    assert isinstance(found, list)
    assert adv.shape == x.shape and float((adv - x).abs().max()) <= 0.1 + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        assert bool((model(adv).argmax(1) != y).any())  # a linear model at ε=0.1 breaks
    assert torch.equal(aa(x, y), adv)  # a point's outcome depends only on (seed, its batch)
    with pytest.raises(ConfigError, match="the model has 2; do something else"):
        StandardAutoAttack(
            _linear(2), num_classes=2, norm="linf", eps=0.1, seed=0, device="cpu",
            instead="do something else",
        )  # fmt: skip


def test_square_adapter_stays_in_the_ball_and_keeps_the_rng():
    model = _linear(4)
    x, y = _points(model)
    sq = Square(
        model, norm="linf", eps=0.05, queries=30, seed=0, device="cpu", rescale_schedule=True
    )
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    adv = sq(x, y)
    assert torch.equal(torch.rand(3), expected)
    assert float((adv - x).abs().max()) <= 0.05 + 1e-6 and not adv.requires_grad
    assert torch.equal(sq(x, y), adv)

"""stats.accuracy_interval (Wilson) and the plots built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fortify.errors import FortifyError
from fortify.stats import accuracy_interval


def test_wilson_interval_matches_hand_computed_values() -> None:
    # 50 of 100: centre 0.5, half-width 1.96·sqrt(0.25/100 + 1.96²/40000) / (1 + 1.96²/100)
    iv = accuracy_interval(np.array([1] * 50 + [0] * 50))
    assert iv.estimate == pytest.approx(50.0)
    assert iv.low == pytest.approx(40.383, abs=1e-2)
    assert iv.high == pytest.approx(59.617, abs=1e-2)
    assert iv.n == 100
    # all correct: the upper bound is 100 %, the lower bound n/(n + z²)
    iv = accuracy_interval(torch.ones(20, dtype=torch.bool))
    assert iv.high == pytest.approx(100.0)
    assert iv.low == pytest.approx(100 * 20 / (20 + 1.959964**2), abs=1e-3)
    # a wider level gives a wider interval
    a, b = accuracy_interval([1, 0, 1, 1]), accuracy_interval([1, 0, 1, 1], level=0.99)
    assert b.low < a.low and b.high > a.high


@pytest.mark.parametrize("bad", [[], [0, 2], [[1, 0]]])
def test_wilson_interval_refuses_bad_outcomes(bad) -> None:
    with pytest.raises(FortifyError):
        accuracy_interval(np.array(bad))


@pytest.mark.parametrize("level", [0, 1, 1.5, True, "0.95"])
def test_wilson_interval_refuses_bad_level(level) -> None:
    with pytest.raises(FortifyError, match="level"):
        accuracy_interval([1, 0], level=level)


def test_eps_curve_step_fraction_matches_the_paper_suite_pgd20() -> None:
    """With step 0.1ε the curve's point at ε is the paper suite's PGD-20 on the same points."""
    from fortify.evaluate import evaluate
    from fortify.evaluate.plot import eps_curve
    from fortify.models import create

    torch.manual_seed(0)
    model = create("small-cnn", num_classes=10, in_channels=1, width=4).eval()
    x, y = torch.rand(24, 1, 8, 8), torch.randint(0, 10, (24,))
    report = evaluate(model, x, y, suite="quick", eps=0.05, checks=False)
    ((_, acc),) = eps_curve(model, x, y, [0.05], steps=20, step_fraction=0.1)
    assert acc == pytest.approx(report.table()["final"]["PGD-20"])
    with pytest.raises(FortifyError, match="step_fraction"):
        eps_curve(model, x, y, [0.05], step_fraction=0.0)

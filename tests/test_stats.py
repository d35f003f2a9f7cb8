"""Comparison statistics against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fortify.errors import ComparisonError, ConfigError, DataError, FortifyError
from fortify.stats import (
    HIGHER,
    LOWER,
    NO_DIFFERENCE,
    Interval,
    discordant,
    mcnemar_exact,
    mean_sd,
    paired_bootstrap,
    seed_point_bootstrap,
    verdict,
)


def _model(n: int = 1000, acc: float = 0.8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) < acc


def _worse_copy(a: torch.Tensor, fraction: float) -> torch.Tensor:
    """A copy of ``a`` that is also wrong on a fixed extra ``fraction`` of all points."""
    b = a.clone()
    right = torch.nonzero(a).flatten()
    b[right[: int(round(fraction * len(a)))]] = False
    return b


def test_identical_models_give_zero_interval_and_p_one():
    a = _model()
    iv = paired_bootstrap(a, a.clone())
    assert (iv.estimate, iv.low, iv.high) == (0.0, 0.0, 0.0)
    assert mcnemar_exact(a, a.clone()) == 1.0
    assert iv.verdict == NO_DIFFERENCE
    assert iv.n == 1000 and iv.resamples == 2000 and iv.level == 0.95


def test_copy_wrong_on_extra_five_percent():
    a = _model()
    b = _worse_copy(a, 0.05)
    iv = paired_bootstrap(a, b, resamples=4000, seed=3)
    assert iv.estimate == pytest.approx(-5.0)
    assert iv.low < -5.0 < iv.high
    # normal approximation: sd of the mean difference = 100 * sqrt(0.05 * 0.95 / 1000) = 0.69
    assert iv.low == pytest.approx(-5.0 - 1.96 * 0.689, abs=0.35)
    assert iv.high == pytest.approx(-5.0 + 1.96 * 0.689, abs=0.35)
    assert verdict(iv) == LOWER
    p = mcnemar_exact(a, b)
    assert p < 0.01
    assert p == pytest.approx(2 * 0.5**50, rel=1e-12)  # 50 discordant pairs, all one way
    swapped = paired_bootstrap(b, a, resamples=4000, seed=3)
    assert swapped.estimate == pytest.approx(5.0) and swapped.verdict == HIGHER


def test_mcnemar_against_hand_computed_values():
    # A right only on 10 points, B right only on 2: m = 12, P[X <= 2] = (1 + 12 + 66) / 4096
    a = np.array([1] * 10 + [0] * 2 + [1] * 5 + [0] * 7)
    b = np.array([0] * 10 + [1] * 2 + [1] * 5 + [0] * 7)
    assert discordant(a, b) == (10, 2)
    assert mcnemar_exact(a, b) == pytest.approx(158 / 4096, rel=1e-15)
    # 3 vs 1: 2 * (1 + 4) / 16 = 0.625; symmetric in a and b
    a2 = np.array([1, 1, 1, 0, 1])
    b2 = np.array([0, 0, 0, 1, 1])
    assert mcnemar_exact(a2, b2) == pytest.approx(0.625)
    assert mcnemar_exact(b2, a2) == pytest.approx(0.625)
    # balanced discordance caps at 1
    assert mcnemar_exact([1, 0], [0, 1]) == 1.0


def test_bootstrap_is_seeded_and_accepts_numpy_and_uint8():
    a = _model(300, seed=1)
    b = _model(300, seed=2)
    one = paired_bootstrap(a, b, seed=7)
    two = paired_bootstrap(a.numpy(), b.to(torch.uint8), seed=7)
    assert one == two
    other = paired_bootstrap(a, b, seed=8)
    assert (other.low, other.high) != (one.low, one.high)
    assert one.estimate == pytest.approx(100 * (b.float().mean() - a.float().mean()).item())


def test_seed_bootstrap_known_answer_when_points_carry_no_noise():
    # seed 0: no difference on any point; seed 1: B right and A wrong on every point.
    # The points add no noise, so replicates are the mean of two seeds drawn from {0, 100}:
    # 0 (p = 1/4), 50 (1/2), 100 (1/4) -> 95 % interval [0, 100], estimate 50.
    n = 200
    a = [np.zeros(n), np.zeros(n)]
    b = [np.zeros(n), np.ones(n)]
    iv = seed_point_bootstrap(a, b)
    assert iv.estimate == pytest.approx(50.0)
    assert (iv.low, iv.high) == (0.0, 100.0)
    assert iv.n_seeds == 2 and iv.n == n and iv.verdict == NO_DIFFERENCE


def test_seed_bootstrap_shares_point_draw_across_seeds():
    # Two identical seeds: the seed draw changes nothing, and a shared point draw gives the
    # same spread as the paired bootstrap (independent point draws would shrink it by ~1/sqrt 2).
    a = _model(800, seed=4)
    b = _model(800, seed=5)
    single = paired_bootstrap(a, b, resamples=4000)
    double = seed_point_bootstrap([a, a], [b, b], resamples=4000)
    assert double.estimate == pytest.approx(single.estimate)
    w1, w2 = single.high - single.low, double.high - double.low
    assert w2 == pytest.approx(w1, rel=0.12)


def test_seed_bootstrap_widens_when_seeds_disagree():
    a0 = _model(1000, seed=6)
    agree = seed_point_bootstrap([a0] * 3, [_worse_copy(a0, 0.03)] * 3)
    disagree = seed_point_bootstrap(
        [a0] * 3, [_worse_copy(a0, 0.0), _worse_copy(a0, 0.03), _worse_copy(a0, 0.06)]
    )
    assert agree.estimate == pytest.approx(-3.0) and disagree.estimate == pytest.approx(-3.0)
    assert disagree.high - disagree.low > 2 * (agree.high - agree.low)
    assert agree.verdict == LOWER


@pytest.mark.parametrize(
    ("a", "b", "err"),
    [
        ([1, 0, 1], [1, 0], ComparisonError),
        ([], [], DataError),
        ([1, 2, 0], [1, 0, 0], DataError),
        ([[1, 0]], [[1, 0]], DataError),
        (["x"], ["y"], DataError),
    ],
)
def test_bad_outcomes_are_refused(a, b, err):
    with pytest.raises(err) as e:
        paired_bootstrap(np.array(a), np.array(b))
    assert isinstance(e.value, FortifyError)
    with pytest.raises(err):
        mcnemar_exact(np.array(a), np.array(b))


@pytest.mark.parametrize(
    "kw", [{"resamples": 100}, {"resamples": 2000.0}, {"seed": -1}, {"level": 1.0}, {"level": 0}]
)
def test_bad_options_are_refused(kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        paired_bootstrap([1, 0], [1, 1], **kw)


def test_seed_bootstrap_refuses_unpaired_seeds():
    with pytest.raises(ComparisonError, match="seeds"):
        seed_point_bootstrap([[1, 0]], [[1, 0], [0, 1]])
    with pytest.raises(ComparisonError, match="same points"):
        seed_point_bootstrap([[1, 0], [1, 0, 1]], [[1, 0], [1, 1, 1]])
    with pytest.raises(ComparisonError):
        seed_point_bootstrap([], [])


def test_verdict_from_interval_alone():
    def iv(lo: float, hi: float) -> Interval:
        return Interval(0.5 * (lo + hi), lo, hi, 0.95, 100, 2000, 0)

    assert verdict(iv(0.1, 2.0)) == HIGHER
    assert verdict(iv(-2.0, -0.1)) == LOWER
    assert verdict(iv(0.0, 2.0)) == NO_DIFFERENCE
    assert verdict(iv(-1.0, 1.0)) == NO_DIFFERENCE
    assert iv(-1.0, 1.0).format() == "+0.0 [-1.0, +1.0]"
    assert iv(0.1, 2.0).to_dict()["verdict"] == HIGHER


def test_mean_sd():
    m = mean_sd([60.0, 62.0, 64.0])
    assert (m.mean, m.sd, m.n) == (62.0, 2.0, 3)
    assert m.format() == "62.0 ± 2.0"
    one = mean_sd([61.25])
    assert one.n == 1 and math.isnan(one.sd) and one.format(2) == "61.25"
    assert one.to_dict()["sd"] is None
    with pytest.raises(DataError):
        mean_sd([])
    with pytest.raises(DataError):
        mean_sd([1.0, float("nan")])

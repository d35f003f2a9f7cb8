"""Comparison statistics: is the difference between two models larger than the noise?

Every function takes per-point binary outcomes (1 = the point survived / was classified
correctly) of two models **on the same points**, as torch tensors (bool, uint8 or integer) or
numpy arrays of shape ``(n,)``.

Units: every difference (:attr:`Interval.estimate`, ``low``, ``high``) is in **percentage
points** of accuracy, ``100 * (mean(b) - mean(a))`` — the unit of fortify's tables. A positive
difference means B is more accurate/robust than A.

* :func:`paired_bootstrap` — percentile CI of ``B - A`` from a paired bootstrap over points.
* :func:`mcnemar_exact` — exact two-sided McNemar p-value (binomial test on discordant pairs).
* :func:`seed_point_bootstrap` — CI when each model was trained with several seeds: each
  bootstrap replicate draws the seeds with replacement, then one resample of the point indices
  (with replacement) that is applied to every drawn seed (all seeds are evaluated on the same
  test points, so a point that is hard for one seed stays in or out for all of them).
* :func:`verdict` — ``"higher"``, ``"lower"`` or ``"no detectable difference at this scale"``,
  chosen from the CI alone.
* :func:`mean_sd` — mean ± sample standard deviation over seeds, for tables.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fortify.errors import ComparisonError, ConfigError, DataError
from fortify.utils.records import record

log = logging.getLogger(__name__)

HIGHER = "higher"
LOWER = "lower"
NO_DIFFERENCE = "no detectable difference at this scale"
VERDICTS = (HIGHER, LOWER, NO_DIFFERENCE)

MIN_RESAMPLES = 2000
MAX_RESAMPLES = 1_000_000
_CHUNK = 250  # bootstrap replicates computed at once (bounds memory to ~_CHUNK * n floats)


@dataclass(frozen=True)
class Interval:
    """A difference B − A in percentage points with its bootstrap confidence interval.

    ``n`` is the number of points per seed, ``n_seeds`` the number of seeds (1 for a
    single-evaluation comparison); ``method`` names the resampling scheme.
    """

    estimate: float
    low: float
    high: float
    level: float
    n: int
    resamples: int
    seed: int
    n_seeds: int = 1
    method: str = "paired bootstrap over points"

    @property
    def verdict(self) -> str:
        """The CI-derived verdict (see :func:`verdict`)."""
        return verdict(self)

    def format(self, digits: int = 1) -> str:
        """E.g. ``"+1.4 [-0.3, +3.1]"`` (percentage points, CI at ``level``)."""
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including the verdict."""
        return record(self, verdict=self.verdict)


@dataclass(frozen=True)
class BootstrapOptions:
    """Options shared by the bootstrap functions.

    ``resamples`` >= 2000 bootstrap replicates, ``seed`` >= 0 for the numpy generator,
    ``level`` the two-sided confidence level in (0, 1).
    """

    resamples: int = MIN_RESAMPLES
    seed: int = 0
    level: float = 0.95

    def validate(self) -> BootstrapOptions:
        """Raise :class:`ConfigError` for an out-of-range option; return self."""
        r = self.resamples
        if isinstance(r, bool) or not isinstance(r, int) or not MIN_RESAMPLES <= r <= MAX_RESAMPLES:
            raise ConfigError(
                f"resamples must be an integer in [{MIN_RESAMPLES}, {MAX_RESAMPLES}], got {r!r}"
            )
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {s!r}")
        lv = self.level
        if isinstance(lv, bool) or not isinstance(lv, (int, float)) or not 0.0 < lv < 1.0:
            raise ConfigError(f"level must be a number in (0, 1) such as 0.95, got {lv!r}")
        return self


def as_outcomes(x: Any, what: str = "outcomes") -> np.ndarray:
    """Per-point outcomes as a numpy ``int8`` array of shape ``(n,)`` with values 0/1.

    Accepts torch tensors, numpy arrays and sequences of bools/ints. Raises :class:`DataError`
    for a wrong shape, an empty array or a value other than 0/1.
    """
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise DataError(
            f"{what} must be a 1-D array of per-point outcomes, got {type(x).__name__} of shape "
            f"{arr.shape}"
        )
    if arr.size == 0:
        raise DataError(f"{what} is empty; at least one point is needed")
    if arr.dtype == np.bool_:
        return arr.astype(np.int8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{what} must hold 0/1 or booleans, got dtype {arr.dtype}")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{what} must hold only 0/1 (or booleans); index {i} is {arr[i]!r}")
    return arr.astype(np.int8)


def _pair(a: Any, b: Any, names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    a_, b_ = as_outcomes(a, names[0]), as_outcomes(b, names[1])
    if a_.shape != b_.shape:
        raise ComparisonError(
            f"a and b must be outcomes on the same points; got {a_.size} and {b_.size} points"
        )
    return a_, b_


def _percentile_interval(
    estimates: np.ndarray, point: float, opts: BootstrapOptions, n: int, n_seeds: int, method: str
) -> Interval:
    tail = (1.0 - opts.level) / 2.0
    low, high = np.quantile(estimates, [tail, 1.0 - tail])
    return Interval(
        estimate=float(point),
        low=float(low),
        high=float(high),
        level=float(opts.level),
        n=n,
        resamples=opts.resamples,
        seed=opts.seed,
        n_seeds=n_seeds,
        method=method,
    )


def _bootstrap(diff: np.ndarray, opts: BootstrapOptions, resample_seeds: bool) -> np.ndarray:
    """Bootstrap replicates of ``100 * mean(diff)`` for ``diff`` of shape (S, n).

    Each replicate draws S seed rows with replacement (if ``resample_seeds``), then one set of
    n point indices with replacement applied to all drawn rows.
    """
    s, n = diff.shape
    rng = np.random.default_rng(opts.seed)
    out = np.empty(opts.resamples, dtype=np.float64)
    d = diff.astype(np.float64)
    for start in range(0, opts.resamples, _CHUNK):
        k = min(_CHUNK, opts.resamples - start)
        if resample_seeds and s > 1:
            rows = rng.integers(0, s, size=(k, s))
            weights = np.zeros((k, s))
            np.add.at(weights, (np.arange(k)[:, None], rows), 1.0 / s)
            per_point = weights @ d  # (k, n): seed-averaged difference per point
        else:
            per_point = np.broadcast_to(d.mean(axis=0), (k, n))
        idx = rng.integers(0, n, size=(k, n))
        out[start : start + k] = 100.0 * np.take_along_axis(per_point, idx, axis=1).mean(axis=1)
    return out


def paired_bootstrap(
    a: Any, b: Any, *, resamples: int = MIN_RESAMPLES, seed: int = 0, level: float = 0.95
) -> Interval:
    """Percentile CI of ``100 * (mean(b) - mean(a))`` (percentage points) by a paired bootstrap.

    ``a``, ``b``: per-point 0/1 outcomes of shape ``(n,)`` on the same points. Each of the
    ``resamples`` replicates draws n point indices with replacement (numpy generator seeded with
    ``seed``) and takes the mean paired difference on them.
    """
    opts = BootstrapOptions(resamples, seed, level).validate()
    a_, b_ = _pair(a, b)
    diff = (b_.astype(np.int16) - a_.astype(np.int16))[None, :]
    reps = _bootstrap(diff, opts, resample_seeds=False)
    point = 100.0 * float(diff.mean())
    return _percentile_interval(reps, point, opts, a_.size, 1, "paired bootstrap over points")


def discordant(a: Any, b: Any) -> tuple[int, int]:
    """``(a_only, b_only)``: points only A gets right, and points only B gets right."""
    a_, b_ = _pair(a, b)
    return int(((a_ == 1) & (b_ == 0)).sum()), int(((a_ == 0) & (b_ == 1)).sum())


def mcnemar_exact(a: Any, b: Any) -> float:
    """Exact two-sided McNemar p-value: binomial test (p = 1/2) on the discordant pairs.

    With ``n01`` points only A gets right and ``n10`` only B gets right, ``m = n01 + n10``:
    ``p = min(1, 2 * P[X <= min(n01, n10)])`` for ``X ~ Binomial(m, 1/2)``; ``p = 1`` when there
    are no discordant pairs. Computed with exact integer arithmetic.
    """
    n01, n10 = discordant(a, b)
    m = n01 + n10
    if m == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(m, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**m)


def seed_point_bootstrap(
    a_per_seed: Sequence[Any],
    b_per_seed: Sequence[Any],
    *,
    resamples: int = MIN_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Hierarchical CI of B − A (percentage points) over training seeds and test points.

    ``a_per_seed[s]`` and ``b_per_seed[s]`` are the per-point 0/1 outcomes of seed s of A and B
    on the same n test points (every seed on the same points). The estimate is the mean over
    seeds of the paired accuracy difference. Each bootstrap replicate (1) draws S seed indices
    with replacement, then (2) draws n point indices with replacement, one draw shared by all the
    drawn seeds, and averages the paired differences. With one seed this is
    :func:`paired_bootstrap` (with its own random stream).
    """
    opts = BootstrapOptions(resamples, seed, level).validate()
    a_per_seed, b_per_seed = (
        _per_seed(a_per_seed, "a_per_seed"),
        _per_seed(b_per_seed, "b_per_seed"),
    )
    if len(a_per_seed) != len(b_per_seed):
        raise ComparisonError(
            f"A has {len(a_per_seed)} seeds and B has {len(b_per_seed)}; pair them one to one"
        )
    if len(a_per_seed) == 0:
        raise ComparisonError("no seeds given; at least one (A, B) pair of outcomes is needed")
    rows: list[Any] = []
    for s, (a, b) in enumerate(zip(a_per_seed, b_per_seed)):
        a_, b_ = _pair(a, b, (f"a_per_seed[{s}]", f"b_per_seed[{s}]"))
        if rows and a_.size != rows[0].size:
            raise ComparisonError(
                f"seed index {s} has {a_.size} points but seed index 0 has {rows[0].size}; "
                "every seed must be evaluated on the same points"
            )
        rows.append(b_.astype(np.int16) - a_.astype(np.int16))
    diff = np.stack(rows)
    reps = _bootstrap(diff, opts, resample_seeds=True)
    point = 100.0 * float(diff.mean())
    method = "bootstrap over seeds, then over points (one point draw shared by the seeds)"
    return _percentile_interval(reps, point, opts, diff.shape[1], diff.shape[0], method)


def _per_seed(values: Any, what: str) -> list[Any]:
    """``values`` (a list/tuple of per-seed outcomes, or an array with one row per seed) as a
    list; :class:`DataError` for anything else (None, a number, a string, a generator)."""
    rows = isinstance(values, Sequence) and not isinstance(values, (str, bytes))
    if not rows and not (getattr(values, "ndim", 0) >= 1 and hasattr(values, "__getitem__")):
        raise DataError(
            f"{what} must be a list with one 1-D array of 0/1 outcomes per seed, got "
            f"{type(values).__name__}"
        )
    return list(values)


def verdict(interval: Interval) -> str:
    """``"higher"`` if the CI lies above 0, ``"lower"`` if below, otherwise
    ``"no detectable difference at this scale"`` (the CI touches or covers 0)."""
    if not isinstance(interval, Interval):
        raise DataError(
            f"verdict needs an Interval (from paired_bootstrap or seed_point_bootstrap), got "
            f"{type(interval).__name__}"
        )
    if interval.low > 0:
        return HIGHER
    if interval.high < 0:
        return LOWER
    return NO_DIFFERENCE


@dataclass(frozen=True)
class MeanSd:
    """Mean and sample standard deviation (ddof = 1) of ``n`` values (sd is NaN for n = 1)."""

    mean: float
    sd: float
    n: int

    def format(self, digits: int = 1) -> str:
        """``"62.3 ± 1.2"``; a single value is shown alone."""
        if self.n == 1 or math.isnan(self.sd):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``sd`` is None for one value)."""
        return {"mean": self.mean, "sd": None if math.isnan(self.sd) else self.sd, "n": self.n}


def mean_sd(values: Sequence[float]) -> MeanSd:
    """Mean ± sample sd over seeds (e.g. accuracies in %). Raises :class:`DataError` if
    ``values`` is not a sequence of numbers, or is empty or non-finite."""
    if (
        isinstance(values, (str, bytes, dict))
        or not hasattr(values, "__iter__")
        or getattr(values, "ndim", 1) != 1
    ):
        shape = f" of shape {tuple(values.shape)}" if hasattr(values, "shape") else ""
        raise DataError(
            f"mean_sd needs a list of numbers (or a 1-D array), got {type(values).__name__}{shape}"
        )
    items = list(values)
    floats = []
    for v in items:
        try:
            if isinstance(v, (str, bytes, bool)):
                raise TypeError
            floats.append(float(v))
        except (TypeError, ValueError):
            raise DataError(f"mean_sd values must be numbers, got {v!r} in {items!r}") from None
    vals = np.asarray(floats, dtype=np.float64)
    if vals.size == 0:
        raise DataError("mean_sd needs at least one value")
    if not np.isfinite(vals).all():
        raise DataError(f"mean_sd values must be finite, got {vals.tolist()}")
    sd = float(vals.std(ddof=1)) if vals.size > 1 else float("nan")
    return MeanSd(float(vals.mean()), sd, int(vals.size))


@dataclass(frozen=True)
class AccuracyInterval:
    """One model's accuracy in percent with a confidence interval over its ``n`` points."""

    estimate: float
    low: float
    high: float
    level: float
    n: int
    method: str = "Wilson score interval"


def accuracy_interval(outcomes: Any, *, level: float = 0.95) -> AccuracyInterval:
    """Wilson score interval of one model's accuracy, in percent (not a difference).

    ``outcomes``: per-point 0/1 results of shape ``(n,)``. ``estimate`` is ``100 * mean``;
    ``low``/``high`` the Wilson bounds (well-behaved at 0 % and 100 %, unlike the normal
    approximation). For error bars of a single column; compare two models with
    :func:`paired_bootstrap`.
    """
    from scipy.stats import norm

    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ConfigError(f"level must be a number in (0, 1) such as 0.95, got {level!r}")
    x = as_outcomes(outcomes)
    n = int(x.size)
    p = float(x.mean())
    z = float(norm.ppf(0.5 + level / 2))
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return AccuracyInterval(
        estimate=100.0 * p,
        low=100.0 * max(0.0, centre - half),
        high=100.0 * min(1.0, centre + half),
        level=float(level),
        n=n,
    )

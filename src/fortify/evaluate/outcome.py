"""Per-point outcomes of attacks, their worst cases, and their compact bit-packed storage."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch

from fortify.errors import DataError

STATUSES = ("ok", "warn", "fail")
MODE_FREE = "-"  # row label for outcomes that do not depend on final/best (Natural, AutoAttack)


@dataclass
class Check:
    """One honest-evaluation check: ``status`` is ``ok``, ``warn`` or ``fail``.

    ``masking`` marks checks that look for gradient masking (or a broken attack): when such a
    check warns, the report is unreliable (:attr:`EvalReport.reliable`).
    """

    name: str
    status: str
    message: str
    masking: bool = False

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check status must be one of {STATUSES}, got {self.status!r}")


@dataclass
class Outcome:
    """Per-point outcome of one column: ``correct[i]`` is True if point i survived.

    ``mode`` is ``"final"``, ``"best"`` or ``"-"`` (does not depend on the semantics);
    ``ensemble`` marks columns that enter the Ensemble column (every column enters Worst case).
    ``ran`` (bool (N,)) marks the points the attack ran on; None means every point. Only those
    points count: ``correct`` is meaningless elsewhere. ``computed=False``: the attack ran only
    where it could change the worst case (AutoAttack with ``autoattack_scope="robust"``), so the
    column enters the Ensemble but has no accuracy of its own.
    """

    name: str
    correct: torch.Tensor  # bool (N,)
    mode: str = MODE_FREE
    ensemble: bool = True
    seconds: float = 0.0
    note: str = ""
    ran: torch.Tensor | None = None  # bool (N,); None: every point
    computed: bool = True

    def __post_init__(self) -> None:
        if self.ran is not None:
            self.ran = self.ran.detach().to("cpu", torch.bool)
            if self.ran.shape != self.correct.shape:
                raise ValueError(
                    f"outcome {self.name!r}: ran has shape {tuple(self.ran.shape)}, correct "
                    f"{tuple(self.correct.shape)}"
                )
            if bool(self.ran.all()):
                self.ran = None

    @property
    def n(self) -> int:
        """How many points the attack ran on (the accuracy's denominator)."""
        return len(self.correct) if self.ran is None else int(self.ran.sum())

    @property
    def accuracy(self) -> float:
        """Accuracy in percent over the points the attack ran on."""
        return accuracy_on(self.correct, self.ran)


def accuracy_on(correct: torch.Tensor, ran: torch.Tensor | None) -> float:
    """Accuracy (%) of ``correct`` over the points ``ran`` marks (all when None); NaN if none."""
    c = correct if ran is None else correct[ran]
    return 100.0 * float(c.float().mean()) if len(c) else float("nan")


def first_mask(n: int, k: int) -> torch.Tensor | None:
    """``ran`` mask of an attack on the first ``k`` of ``n`` points (None when k >= n)."""
    if k >= n:
        return None
    m = torch.zeros(n, dtype=torch.bool)
    m[: max(k, 0)] = True
    return m


def _and_ran(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return None if b is None else b.clone()
    return a.clone() if b is None else a & b


def worst_case(
    outcomes: list[Outcome], mode: str, *, ensemble_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Per-sample worst case of row ``mode``: ``(correct, ran)``.

    Members: the ensemble columns of the row and the mode-free ones (``ensemble_only``), or every
    column of the row. ``ran`` is the set of points on which every member ran (None: all);
    ``correct`` means nothing outside it.
    """
    members = [
        o for o in outcomes if (o.ensemble or not ensemble_only) and o.mode in (mode, MODE_FREE)
    ]
    if not members:
        return None
    out, ran = members[0].correct.clone(), members[0].ran
    ran = None if ran is None else ran.clone()
    for o in members[1:]:
        out &= o.correct
        ran = _and_ran(ran, o.ran)
    return out, ran


def ensemble_of(outcomes: list[Outcome], mode: str) -> torch.Tensor | None:
    """Per-sample worst case over the ensemble columns of row ``mode`` (and mode-free ones).

    Meaningful only on the points every member ran on (see :func:`worst_case`).
    """
    wc = worst_case(outcomes, mode)
    return None if wc is None else wc[0]


def pack_bits(t: torch.Tensor) -> str:
    """A bool tensor (N,) as base64 text of its bits (little-endian bit order)."""
    bits = np.packbits(t.detach().cpu().numpy().astype(bool), bitorder="little")
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` for ``n`` points."""
    raw = np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), dtype=np.uint8)
    bits = np.unpackbits(raw, bitorder="little")
    if len(bits) < n or bits[n:].any():
        raise DataError(f"per-sample bit string does not hold {n} points")
    return torch.from_numpy(bits[:n].astype(bool))

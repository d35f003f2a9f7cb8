"""Paired comparison of two evaluation reports computed on the same points.

``compare_reports(a, b)`` gives, for every column both reports have (each attack, Ensemble,
AutoAttack, Worst case, ...) and every row (mode), the difference B − A in percentage points with
a paired-bootstrap confidence interval over the points, the exact McNemar p-value of the
discordant pairs and the CI-derived verdict (:mod:`fortify.stats`). Each column is compared on
the points on which both reports' column ran (its n). Reports whose points, ε, norm, suite or
mode differ are refused with :class:`~fortify.errors.ComparisonError`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from fortify.errors import ComparisonError
from fortify.evaluate.report import EvalReport
from fortify.stats import (
    BootstrapOptions,
    Interval,
    discordant,
    mcnemar_exact,
    paired_bootstrap,
)
from fortify.utils.records import record

log = logging.getLogger(__name__)

# settings that must agree for a paired comparison: (key, what to call it)
MUST_MATCH = (
    ("suite", "suite"),
    ("norm", "norm"),
    ("mode", "mode"),
    ("n_points", "number of points"),
    ("dataset", "dataset"),
    ("split", "split"),
)


@dataclass(frozen=True)
class ColumnComparison:
    """One column of one row: accuracies (%) of A and B on the ``n`` shared points, the interval
    of B − A (percentage points), the McNemar p-value and the discordant counts."""

    column: str
    mode: str
    n: int
    a: float
    b: float
    interval: Interval
    p_value: float
    a_only: int  # points only A gets right
    b_only: int  # points only B gets right

    @property
    def verdict(self) -> str:
        """B relative to A: "higher", "lower" or "no detectable difference at this scale"."""
        return self.interval.verdict

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``interval`` as ``difference``, ``p_value`` as ``mcnemar_p``)."""
        rename = {"interval": "difference", "p_value": "mcnemar_p"}
        return record(self, rename=rename, verdict=self.verdict)


@dataclass
class Comparison:
    """Result of :func:`compare_reports`: one :class:`ColumnComparison` per (row, column)."""

    a_label: str
    b_label: str
    settings: dict[str, Any]
    rows: list[ColumnComparison]
    notes: list[str] = field(default_factory=list)

    def get(self, column: str, mode: str = "final") -> ColumnComparison | None:
        """The comparison of ``column`` in row ``mode`` (None if not compared)."""
        return next((r for r in self.rows if r.column == column and r.mode == mode), None)

    def to_markdown(self) -> str:
        """A table of B − A per column with CI, p-value and verdict, then the notes."""
        s = self.settings
        first = self.rows[0].interval if self.rows else None
        level = f"{100 * first.level:g} %" if first else "95 %"
        lines = [
            f"## {self.b_label} − {self.a_label}",
            "",
            f"Paired over the same points ({s.get('n_points')} points, {s.get('norm')} ε = "
            f"{s.get('eps')}, suite `{s.get('suite')}`, mode `{s.get('mode')}`). Differences "
            f"in percentage points with a {level} paired-bootstrap CI"
            + (f" ({first.resamples} resamples, seed {first.seed})" if first else "")
            + "; McNemar = exact two-sided p-value on the discordant points; the verdict "
            "follows from the CI alone.",
            "",
            f"| mode | column | n | {self.a_label} | {self.b_label} | difference [CI] | McNemar p "
            f"| only {self.a_label} / only {self.b_label} | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.mode} | {r.column} | {r.n} | {r.a:.2f} | {r.b:.2f} | "
                f"{r.interval.format(2)} | {_fmt_p(r.p_value)} | {r.a_only} / {r.b_only} | "
                f"{r.verdict} |"
            )
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "format": "fortify-compare/1",
            "a": self.a_label,
            "b": self.b_label,
            "settings": self.settings,
            "rows": [r.to_dict() for r in self.rows],
            "notes": self.notes,
        }

    def to_json(self, indent: int | None = 1) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def check_comparable(a: EvalReport, b: EvalReport, labels: tuple[str, str] = ("A", "B")) -> None:
    """Raise :class:`ComparisonError` unless ``a`` and ``b`` are :class:`EvalReport` s evaluated
    on the same points with the same ε, norm, suite and mode, and ``labels`` two different
    names."""
    if not (
        isinstance(labels, (tuple, list))
        and len(labels) == 2
        and all(isinstance(v, str) and v for v in labels)
        and labels[0] != labels[1]
    ):
        raise ComparisonError(
            f"labels must be two different non-empty names (A, B), got {labels!r}"
        )
    la, lb = labels
    for label, rep in ((la, a), (lb, b)):
        if not isinstance(rep, EvalReport):
            raise ComparisonError(
                f"{label} must be an EvalReport (from evaluate() or EvalReport.load), got "
                f"{type(rep).__name__}"
            )
    sa, sb = a.settings, b.settings
    ea, eb = sa.get("eps"), sb.get("eps")
    if not (
        isinstance(ea, (int, float))
        and isinstance(eb, (int, float))
        and math.isclose(ea, eb, rel_tol=1e-9, abs_tol=1e-12)
    ):
        raise ComparisonError(
            f"{la} was evaluated at ε = {ea!r} and {lb} at ε = {eb!r}; compare evaluations at "
            "the same ε"
        )
    for key, what in MUST_MATCH:
        va, vb = sa.get(key), sb.get(key)
        if key in ("dataset", "split") and (va is None or vb is None):
            continue  # not recorded by the API; the point fingerprint decides
        if va != vb:
            raise ComparisonError(
                f"{la} and {lb} differ in {what}: {va!r} vs {vb!r}; a paired comparison needs "
                "the same points, ε, norm, suite and mode"
            )
    fa, fb = sa.get("points_sha256"), sb.get("points_sha256")
    if fa is not None and fb is not None and fa != fb:
        raise ComparisonError(
            f"{la} and {lb} were evaluated on different points (point fingerprints "
            f"{fa[:12]}… vs {fb[:12]}…); evaluate both on the same points (same dataset, split "
            "and --n-points)"
        )
    if a.n_points != b.n_points:
        raise ComparisonError(
            f"{la} holds {a.n_points} per-point outcomes and {lb} {b.n_points}; they cannot be "
            "paired"
        )


def compare_reports(
    a: EvalReport,
    b: EvalReport,
    *,
    labels: tuple[str, str] = ("A", "B"),
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    columns: list[str] | None = None,
) -> Comparison:
    """Compare B against A column by column (B − A, percentage points); see the module doc.

    Args:
        a, b: reports on the same points (:func:`check_comparable`).
        labels: names of A and B in the output.
        resamples, seed, level: of :func:`fortify.stats.paired_bootstrap`.
        columns: restrict to these columns (default: every column both reports have).
    """
    BootstrapOptions(resamples, seed, level).validate()
    check_comparable(a, b, labels)
    la, lb = labels
    notes: list[str] = []
    if a.settings.get("points_sha256") is None or b.settings.get("points_sha256") is None:
        notes.append(
            "a report has no point fingerprint (written before fortify recorded one); the points "
            "are assumed equal because the suite, ε, norm, mode and point count match"
        )
    for label, rep in ((la, a), (lb, b)):
        if not rep.reliable:
            notes.append(
                f"{label} is UNRELIABLE ({', '.join(dict.fromkeys(rep.unreliable_reasons))}): "
                "its robust accuracies may be overestimates, and so may the differences"
            )
    if a.settings.get("seed") != b.settings.get("seed"):
        notes.append(
            f"evaluation seeds differ ({a.settings.get('seed')} vs {b.settings.get('seed')}): "
            "random starts and AutoAttack/Square randomness differ between A and B"
        )
    if columns is not None and (
        isinstance(columns, str) or not columns or not all(isinstance(c, str) for c in columns)
    ):
        raise ComparisonError(
            f"columns must be a non-empty list of column names (or None: every common column), "
            f"got {columns!r}; common columns: {[c for c in a.columns if c in b.columns]}"
        )
    wanted = columns if columns is not None else [c for c in a.columns if c in b.columns]
    missing = [c for c in wanted if c not in a.columns or c not in b.columns]
    if missing:
        raise ComparisonError(
            f"column(s) {missing} are not in both reports; common columns: "
            f"{[c for c in a.columns if c in b.columns]}"
        )
    rows: list[ColumnComparison] = []
    for mode in [m for m in a.modes if m in b.modes]:
        for col in wanted:
            ca, cb = a.column(col, mode), b.column(col, mode)
            if ca is None or cb is None:
                continue
            both = ca[1] & cb[1]
            n = int(both.sum())
            if n == 0:
                notes.append(f"{col} [{mode}]: no point on which both ran; not compared")
                continue
            if not (bool((ca[1] == both).all()) and bool((cb[1] == both).all())):
                notes.append(
                    f"{col} [{mode}]: ran on {int(ca[1].sum())} points in {la} and "
                    f"{int(cb[1].sum())} in {lb}; compared on the {n} points where both ran"
                )
            xa, xb = ca[0][both], cb[0][both]
            iv = paired_bootstrap(xa, xb, resamples=resamples, seed=seed, level=level)
            a_only, b_only = discordant(xa, xb)
            rows.append(
                ColumnComparison(
                    col,
                    mode,
                    n,
                    100.0 * float(xa.float().mean()),
                    100.0 * float(xb.float().mean()),
                    iv,
                    mcnemar_exact(xa, xb),
                    a_only,
                    b_only,
                )
            )
    settings = {k: a.settings.get(k) for k in ("suite", "eps", "norm", "mode", "n_points")}
    settings["points_sha256"] = a.settings.get("points_sha256")
    return Comparison(la, lb, settings, rows, notes)

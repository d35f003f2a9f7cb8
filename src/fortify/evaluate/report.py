"""Evaluation reports: one table in the papers' column layout, per-sample outcomes, checks.

One rule for subsets: a column's accuracy counts only the points its attack ran on
(:attr:`Outcome.ran`) and the table says that count when it is below the report's point count;
a worst-case column (Ensemble, Worst case) counts only the points on which *every* member ran.
No column counts an unattacked point as robust.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from fortify.errors import DataError
from fortify.evaluate.outcome import (
    MODE_FREE,
    Check,
    Outcome,
    accuracy_on,
    first_mask,
    pack_bits,
    unpack_bits,
    worst_case,
)
from fortify.utils.atomic import atomic_write_text

T = TypeVar("T")

ENSEMBLE = "Ensemble"
WORST_CASE = "Worst case"
NATURAL = "Natural"
FORMAT = "fortify-eval/2"  # per-sample outcomes as base64 bit strings
READABLE_FORMATS = ("fortify-eval/1", FORMAT)
# Checks that indicate gradient masking (used for reports written before ``Check.masking``).
LEGACY_MASKING_CHECKS = frozenset(
    {
        "zero gradients",
        "monotone in ε",
        "PGD increases the loss",
        "large ε → 0",
        "Square vs white-box",
        "AutoAttack's own checks",
    }
)

MODE_LABELS = {
    "final": "final (last PGD iterate counts)",
    "best": "best (broken as soon as any iterate fools)",
}


def _legacy_ran(name: str, settings: dict[str, Any], n: int) -> torch.Tensor | None:
    """Points an outcome of a ``fortify-eval/1`` report ran on: those reports gave AutoAttack
    columns run on the first ``autoattack_points`` points the clean outcome elsewhere."""
    k = settings.get("autoattack_points")
    if name.startswith("AutoAttack") and isinstance(k, int) and 0 <= k < n:
        return first_mask(n, k)
    return None


@dataclass
class EvalReport:
    """Result of :func:`fortify.evaluate.evaluate`.

    ``outcomes`` hold per-point booleans per column and row; ``table()`` gives accuracies in %
    and ``table_n()`` the number of points each accuracy is computed on. ``reliable`` is False
    when a check failed or a gradient-masking check warned.
    """

    settings: dict[str, Any]
    outcomes: list[Outcome]
    checks: list[Check] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    # -- derived ---------------------------------------------------------------------------------
    @property
    def modes(self) -> list[str]:
        """Row labels: the modes present (``final``/``best``), or ``["final"]`` if none."""
        present = [m for m in ("final", "best") if any(o.mode == m for o in self.outcomes)]
        return present or [
            self.settings.get("mode", "final") if self.settings.get("mode") != "both" else "final"
        ]

    @property
    def n_points(self) -> int:
        """The number of evaluated points."""
        if self.outcomes:
            return len(self.outcomes[0].correct)
        return int(self.settings.get("n_points", 0))

    @property
    def columns(self) -> list[str]:
        """Column names in order: Ensemble after the last ensemble member, and Worst case last
        when some column is outside the Ensemble."""
        cols: list[str] = []
        for o in self.outcomes:
            if o.name not in cols:
                cols.append(o.name)
        ens_members = [o.name for o in self.outcomes if o.ensemble and o.name != NATURAL]
        if ens_members:
            cols.insert(cols.index(ens_members[-1]) + 1, ENSEMBLE)
        if any(not o.ensemble for o in self.outcomes):
            cols.append(WORST_CASE)
        return cols

    def outcome(self, name: str, mode: str) -> Outcome | None:
        """The outcome of column ``name`` in row ``mode`` (mode-free outcomes match any row)."""
        for o in self.outcomes:
            if o.name == name and o.mode in (mode, MODE_FREE):
                return o
        return None

    def column(self, name: str, mode: str = "final") -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(correct, ran)`` of a column as bool (N,) tensors; ``ran`` marks the points that
        count. Ensemble and Worst case are recomputed from their members."""
        if name in (ENSEMBLE, WORST_CASE):
            wc = worst_case(self.outcomes, mode, ensemble_only=name == ENSEMBLE)
            if wc is None:
                return None
            correct, ran = wc
        else:
            o = self.outcome(name, mode)
            if o is None:
                return None
            correct, ran = o.correct, o.ran
        if ran is None:
            ran = torch.ones(len(correct), dtype=torch.bool)
        return correct, ran

    def correct(self, name: str, mode: str = "final") -> torch.Tensor | None:
        """Per-point survival for a column (Ensemble is recomputed from the members); only the
        points :meth:`ran` marks count."""
        col = self.column(name, mode)
        return None if col is None else col[0]

    def ran(self, name: str, mode: str = "final") -> torch.Tensor | None:
        """Bool (N,): the points a column counts (its attack, or every member, ran on them)."""
        col = self.column(name, mode)
        return None if col is None else col[1]

    def _cells(
        self, value: Callable[[torch.Tensor, torch.Tensor], T], *, computed_only: bool
    ) -> dict[str, dict[str, T]]:
        """``{row (mode): {column: value(correct, ran)}}`` over the columns present."""
        out: dict[str, dict[str, T]] = {}
        for mode in self.modes:
            row: dict[str, T] = {}
            for col in self.columns:
                o = self.outcome(col, mode)
                if computed_only and o is not None and not o.computed:
                    continue
                c = self.column(col, mode)
                if c is not None:
                    row[col] = value(c[0], c[1])
            out[mode] = row
        return out

    def table(self) -> dict[str, dict[str, float]]:
        """``{row (mode): {column: accuracy %}}`` (each over the points the column ran on)."""
        return self._cells(accuracy_on, computed_only=True)

    def table_n(self) -> dict[str, dict[str, int]]:
        """``{row (mode): {column: number of points the accuracy is computed on}}``."""
        return self._cells(lambda _correct, ran: int(ran.sum()), computed_only=False)

    @property
    def unreliable_reasons(self) -> list[str]:
        """Names of the failed checks and of the gradient-masking checks that warned."""
        return [
            c.name for c in self.checks if c.status == "fail" or (c.masking and c.status == "warn")
        ]

    @property
    def reliable(self) -> bool:
        """False when a check failed or a gradient-masking check warned: the robust accuracies
        may then be overestimates (see :attr:`unreliable_reasons`)."""
        return not self.unreliable_reasons

    @property
    def ok(self) -> bool:
        """Same as :attr:`reliable`: no check failed and no masking check warned."""
        return self.reliable

    def checks_status(self) -> str:
        """One cell for tables: ``ok``, ``unreliable (names)`` or ``k warn``."""
        bad = self.unreliable_reasons
        if bad:
            return "unreliable (" + ", ".join(dict.fromkeys(bad)) + ")"
        n_warn = sum(c.status == "warn" for c in self.checks)
        return f"{n_warn} warn" if n_warn else "ok"

    # -- rendering -------------------------------------------------------------------------------
    def to_markdown(self) -> str:
        """The table (one row per mode) followed by settings and the checks."""
        s = self.settings
        cols = self.columns
        table = self.table()
        counts = self.table_n()
        n = self.n_points
        heads = []
        for c in cols:
            k = max((counts[m].get(c, n) for m in counts), default=n)
            heads.append(c if k == n else f"{c} (n={k})")
        lines = [
            f"## Robustness evaluation — suite `{s.get('suite')}`",
            "",
            f"Accuracy (%) on {s.get('n_points')} points, {s.get('norm')} ε = "
            f"{_fmt_eps(s.get('eps'))}, "
            f"seed {s.get('seed')}, mode `{s.get('mode')}`. A column marked (n=k) counts only "
            "the k points its attacks ran on.",
            "",
        ]
        if not self.reliable:
            lines += [
                "**UNRELIABLE:** "
                + ", ".join(dict.fromkeys(self.unreliable_reasons))
                + " — gradient masking (or a failed check) was detected, so the robust "
                "accuracies are likely overestimates; see the checks below and the Worst case "
                "column.",
                "",
            ]
        lines += [
            "| mode | " + " | ".join(heads) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for mode, row in table.items():
            cells = [f"{row[c]:.2f}" if c in row else self._blank(c, mode) for c in cols]
            lines.append(f"| {MODE_LABELS.get(mode, mode)} | " + " | ".join(cells) + " |")
        notes = [
            f"- {o.name}: {o.note}"
            for o in self.outcomes
            if o.note and o.mode in (MODE_FREE, self.modes[0])
        ]
        if WORST_CASE in cols:
            notes.append(
                f"- {WORST_CASE}: per-point worst case over every column (checks' attacks "
                "included), on the points where all of them ran"
            )
        if notes:
            lines += ["", *notes]
        if self.extras.get("ood_markdown"):  # corruptions × severities, labelled
            lines += ["", "### OOD (common corruptions)", "", self.extras["ood_markdown"]]
        lines += ["", "### Checks", ""]
        if not self.checks:
            lines.append("- (checks disabled)")
        for check in self.checks:
            mark = {"ok": "ok", "warn": "**WARN**", "fail": "**FAIL**"}[check.status]
            lines.append(f"- [{mark}] {check.name}: {check.message}")
        lines += ["", "### Settings", ""]
        for key, value in s.items():
            lines.append(f"- {key}: {value}")
        return "\n".join(lines) + "\n"

    def _blank(self, col: str, mode: str) -> str:
        o = self.outcome(col, mode)
        return "not computed" if o is not None and not o.computed else ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: settings, table (with per-column n), reliability, checks and the
        per-sample outcomes as base64 bit strings (:func:`pack_bits`; ``ran`` null = every
        point)."""
        return {
            "format": FORMAT,
            "settings": self.settings,
            "columns": self.columns,
            "table": self.table(),
            "table_n": self.table_n(),
            "reliable": self.reliable,
            "unreliable_reasons": self.unreliable_reasons,
            "outcomes": [
                {
                    "name": o.name,
                    "mode": o.mode,
                    "ensemble": o.ensemble,
                    "seconds": round(o.seconds, 3),
                    "note": o.note,
                    "accuracy": o.accuracy if o.computed else None,
                    "computed": o.computed,
                    "n": o.n,
                    "points": len(o.correct),
                    "correct": pack_bits(o.correct),
                    "ran": None if o.ran is None else pack_bits(o.ran),
                }
                for o in self.outcomes
            ],
            "checks": [asdict(c) for c in self.checks],
            "extras": self.extras,
        }

    def to_json(self, indent: int | None = 1) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        """Rebuild a report from :meth:`to_dict` output (``fortify-eval/1`` with per-sample
        lists is read too); :class:`DataError` names what is missing or malformed."""
        if not isinstance(d, dict):
            raise DataError(
                f"an evaluation report is a JSON object (as `fortify eval` writes), got "
                f"{_json_type(d)}"
            )
        fmt = d.get("format")
        if fmt not in READABLE_FORMATS:
            raise DataError(
                f"the report's format is {fmt!r}, expected one of {', '.join(READABLE_FORMATS)}"
            )
        settings = d.get("settings")
        if not isinstance(settings, dict):
            raise DataError(
                "the report has no 'settings' object (suite, eps, norm, points, ...), got "
                f"{_json_type(settings)}"
            )
        _check_settings(settings)
        raw = d.get("outcomes")
        if not isinstance(raw, list) or not raw:
            raise DataError(
                "the report has no 'outcomes' (a non-empty list with one entry per column and "
                f"row), got {_json_type(raw)}; there is no column to show"
            )
        try:
            outcomes = [_outcome_from_dict(o, fmt, settings) for o in raw]
            checks = []
            for c in d.get("checks", []):
                c = dict(c)
                c.setdefault("masking", c.get("name") in LEGACY_MASKING_CHECKS)
                checks.append(Check(**c))
        except KeyError as exc:
            raise DataError(f"an entry of the report lacks the key {exc}") from exc
        except (TypeError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"an entry of the report is malformed: {exc}") from exc
        extras = d.get("extras", {})
        if not isinstance(extras, dict):
            raise DataError(f"the report's 'extras' must be an object, got {_json_type(extras)}")
        return cls(settings, outcomes, checks, extras)

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        """Load ``eval.json`` (or a directory containing it)."""
        p = Path(path)
        if p.is_dir():
            p = p / "eval.json"
        if not p.is_file():
            raise DataError(f"no evaluation report at {p} (run `fortify eval` first)")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, DataError) as exc:
            raise DataError(f"{p} is not a valid fortify eval.json: {exc}") from exc
        except RecursionError as exc:
            raise DataError(f"{p} is not a valid fortify eval.json: nested too deeply") from exc

    def save(self, directory: str | Path, stem: str = "eval") -> tuple[Path, Path]:
        """Atomically write ``<stem>.md`` and ``<stem>.json`` into ``directory``."""
        d = Path(directory)
        md, js = d / f"{stem}.md", d / f"{stem}.json"
        atomic_write_text(js, self.to_json())
        atomic_write_text(md, self.to_markdown())
        return md, js


def _json_type(value: object) -> str:
    """How a JSON value reads in an error message (``null``, ``a list``, ...)."""
    if value is None:
        return "nothing (null or missing)"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return next((v for k, v in names.items() if isinstance(value, k)), "a number")


def _check_settings(s: dict[str, Any]) -> None:
    """Refuse recorded settings that would be shown or compared as nonsense."""
    eps = s.get("eps")
    if "eps" in s and not (
        isinstance(eps, (int, float))
        and not isinstance(eps, bool)
        and math.isfinite(eps)
        and eps > 0
    ):
        raise DataError(f"the report's settings have eps {eps!r}; expected a number > 0")
    n = s.get("n_points")
    if "n_points" in s and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"the report's settings have n_points {n!r}; expected an integer >= 1")


def _outcome_from_dict(o: Any, fmt: str, settings: dict[str, Any]) -> Outcome:
    """One outcome of a stored report (KeyError for a missing key, named by the caller)."""
    if not isinstance(o, dict):
        raise DataError(f"each of the report's outcomes must be an object, got {_json_type(o)}")
    kinds = {"name": str, "mode": str, "ensemble": bool, "note": str, "computed": bool}
    for key, kind in kinds.items():
        if key in o and not isinstance(o[key], kind):
            raise DataError(
                f"outcome field {key!r} must be {_json_type(kind())}, got {_json_type(o[key])}"
            )
    if fmt == FORMAT:
        for key in ("correct", "ran"):
            if o.get(key) is not None and not isinstance(o[key], str):
                raise DataError(
                    f"outcome {o.get('name')!r}: {key!r} must be a string of packed bits, got "
                    f"{_json_type(o[key])}"
                )
        n = int(o["points"])
        correct = unpack_bits(o["correct"], n)
        ran = None if o.get("ran") is None else unpack_bits(o["ran"], n)
    else:
        correct = torch.tensor(o["correct"], dtype=torch.bool)
        ran = _legacy_ran(o["name"], settings, len(correct))
    return Outcome(
        o["name"],
        correct,
        o["mode"],
        o["ensemble"],
        o.get("seconds", 0.0),
        o.get("note", ""),
        ran,
        o.get("computed", True),
    )


def _fmt_eps(eps: Any) -> str:
    if not isinstance(eps, (int, float)):
        return str(eps)
    k = eps * 255
    return f"{eps:.4g} (= {k:.3g}/255)" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"


def side_by_side(reports: dict[str, EvalReport]) -> str:
    """A markdown table with one row per (run, mode) and the union of the runs' columns.

    A cell on fewer points than the run's n says ``(n=k)``; the ``checks`` column says
    ``unreliable (...)`` when gradient masking was detected or a check failed.
    """
    cols: list[str] = []
    for r in reports.values():
        for c in r.columns:
            if c not in cols:
                cols.append(c)
    lines = [
        "| run | suite | ε | n | mode | " + " | ".join(cols) + " | checks |",
        "|---|---|---|---|---|" + "---|" * (len(cols) + 1),
    ]
    for name, r in reports.items():
        s = r.settings
        counts = r.table_n()
        for mode, row in r.table().items():
            cells = []
            for c in cols:
                if c not in row:
                    cells.append("–")
                    continue
                k = counts[mode][c]
                cells.append(f"{row[c]:.2f}" + ("" if k == r.n_points else f" (n={k})"))
            lines.append(
                f"| {name} | {s.get('suite')} | {_fmt_eps(s.get('eps'))} | {s.get('n_points')} | "
                f"{mode} | " + " | ".join(cells) + f" | {r.checks_status()} |"
            )
    return "\n".join(lines) + "\n"

"""Evaluation reports: one table in the papers' column layout, per-sample outcomes, checks."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fortify.errors import DataError
from fortify.utils.atomic import atomic_write_text

STATUSES = ("ok", "warn", "fail")
MODE_FREE = "-"  # row label for outcomes that do not depend on final/best (Natural, AutoAttack)
ENSEMBLE = "Ensemble"
NATURAL = "Natural"

MODE_LABELS = {
    "final": "final (last PGD iterate counts)",
    "best": "best (broken as soon as any iterate fools)",
}


@dataclass
class Check:
    """One honest-evaluation check: ``status`` is ``ok``, ``warn`` or ``fail``."""

    name: str
    status: str
    message: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check status must be one of {STATUSES}, got {self.status!r}")


@dataclass
class Outcome:
    """Per-point outcome of one column: ``correct[i]`` is True if point i survived.

    ``mode`` is ``"final"``, ``"best"`` or ``"-"`` (does not depend on the semantics);
    ``ensemble`` marks columns that enter the per-sample worst case. ``computed=False``: the
    attack ran only where it could change the worst case (e.g. AutoAttack with
    ``autoattack_scope="robust"``), so the column enters Ensemble but has no accuracy of its own.
    """

    name: str
    correct: torch.Tensor  # bool (N,)
    mode: str = MODE_FREE
    ensemble: bool = True
    seconds: float = 0.0
    note: str = ""
    computed: bool = True

    @property
    def accuracy(self) -> float:
        """Accuracy in percent."""
        return 100.0 * float(self.correct.float().mean()) if len(self.correct) else float("nan")


def ensemble_of(outcomes: list[Outcome], mode: str) -> torch.Tensor | None:
    """Per-sample worst case over the ensemble columns of row ``mode`` (and mode-free ones)."""
    members = [o for o in outcomes if o.ensemble and o.mode in (mode, MODE_FREE)]
    if not members:
        return None
    out = members[0].correct.clone()
    for o in members[1:]:
        out &= o.correct
    return out


@dataclass
class EvalReport:
    """Result of :func:`fortify.evaluate.evaluate`.

    ``outcomes`` hold per-point booleans per column and row; ``table()`` gives accuracies in %.
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
    def columns(self) -> list[str]:
        """Column names in order, with Ensemble after the last ensemble member."""
        cols: list[str] = []
        for o in self.outcomes:
            if o.name not in cols:
                cols.append(o.name)
        ens_members = [o.name for o in self.outcomes if o.ensemble and o.name != NATURAL]
        if ens_members:
            cols.insert(cols.index(ens_members[-1]) + 1, ENSEMBLE)
        return cols

    def outcome(self, name: str, mode: str) -> Outcome | None:
        """The outcome of column ``name`` in row ``mode`` (mode-free outcomes match any row)."""
        for o in self.outcomes:
            if o.name == name and o.mode in (mode, MODE_FREE):
                return o
        return None

    def correct(self, name: str, mode: str = "final") -> torch.Tensor | None:
        """Per-point survival for a column (Ensemble is recomputed from the members)."""
        if name == ENSEMBLE:
            return ensemble_of(self.outcomes, mode)
        o = self.outcome(name, mode)
        return None if o is None else o.correct

    def table(self) -> dict[str, dict[str, float]]:
        """``{row (mode): {column: accuracy %}}`` (columns not computed on their own omitted)."""
        out: dict[str, dict[str, float]] = {}
        for mode in self.modes:
            row: dict[str, float] = {}
            for col in self.columns:
                o = self.outcome(col, mode)
                if o is not None and not o.computed:
                    continue
                c = self.correct(col, mode)
                if c is not None:
                    row[col] = 100.0 * float(c.float().mean()) if len(c) else float("nan")
            out[mode] = row
        return out

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return all(c.status != "fail" for c in self.checks)

    # -- rendering -------------------------------------------------------------------------------
    def to_markdown(self) -> str:
        """The table (one row per mode) followed by settings and the checks."""
        s = self.settings
        cols = self.columns
        table = self.table()
        lines = [
            f"## Robustness evaluation — suite `{s.get('suite')}`",
            "",
            f"Accuracy (%) on {s.get('n_points')} points, {s.get('norm')} ε = "
            f"{_fmt_eps(s.get('eps'))}, "
            f"seed {s.get('seed')}, mode `{s.get('mode')}`.",
            "",
            "| mode | " + " | ".join(cols) + " |",
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
        if notes:
            lines += ["", *notes]
        lines += ["", "### Checks", ""]
        if not self.checks:
            lines.append("- (checks disabled)")
        for c in self.checks:
            mark = {"ok": "ok", "warn": "**WARN**", "fail": "**FAIL**"}[c.status]
            lines.append(f"- [{mark}] {c.name}: {c.message}")
        lines += ["", "### Settings", ""]
        for k, v in s.items():
            lines.append(f"- {k}: {v}")
        return "\n".join(lines) + "\n"

    def _blank(self, col: str, mode: str) -> str:
        o = self.outcome(col, mode)
        return "not computed" if o is not None and not o.computed else ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with settings, table, per-sample outcomes and checks."""
        return {
            "format": "fortify-eval/1",
            "settings": self.settings,
            "columns": self.columns,
            "table": self.table(),
            "outcomes": [
                {
                    "name": o.name,
                    "mode": o.mode,
                    "ensemble": o.ensemble,
                    "seconds": round(o.seconds, 3),
                    "note": o.note,
                    "accuracy": o.accuracy if o.computed else None,
                    "correct": [bool(v) for v in o.correct.tolist()],
                    "computed": o.computed,
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
        """Rebuild a report from :meth:`to_dict` output (e.g. to recompute Ensemble)."""
        if d.get("format") != "fortify-eval/1":
            raise DataError(
                f"not a fortify eval.json (format {d.get('format')!r}, expected 'fortify-eval/1')"
            )
        outcomes = [
            Outcome(
                o["name"],
                torch.tensor(o["correct"], dtype=torch.bool),
                o["mode"],
                o["ensemble"],
                o.get("seconds", 0.0),
                o.get("note", ""),
                o.get("computed", True),
            )
            for o in d["outcomes"]
        ]
        checks = [Check(**c) for c in d.get("checks", [])]
        return cls(d["settings"], outcomes, checks, d.get("extras", {}))

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
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{p} is not a valid fortify eval.json: {exc}") from exc

    def save(self, directory: str | Path, stem: str = "eval") -> tuple[Path, Path]:
        """Atomically write ``<stem>.md`` and ``<stem>.json`` into ``directory``."""
        d = Path(directory)
        md, js = d / f"{stem}.md", d / f"{stem}.json"
        atomic_write_text(js, self.to_json())
        atomic_write_text(md, self.to_markdown())
        return md, js


def _fmt_eps(eps: Any) -> str:
    if not isinstance(eps, (int, float)):
        return str(eps)
    k = eps * 255
    return f"{eps:.4g} (= {k:.3g}/255)" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"


def side_by_side(reports: dict[str, EvalReport]) -> str:
    """A markdown table with one row per (run, mode) and the union of the runs' columns."""
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
        n_warn = sum(c.status == "warn" for c in r.checks)
        n_fail = sum(c.status == "fail" for c in r.checks)
        status = "ok" if not (n_warn or n_fail) else f"{n_warn} warn, {n_fail} fail"
        for mode, row in r.table().items():
            cells = [f"{row[c]:.2f}" if c in row else "–" for c in cols]
            lines.append(
                f"| {name} | {s.get('suite')} | {_fmt_eps(s.get('eps'))} | {s.get('n_points')} | "
                f"{mode} | " + " | ".join(cells) + f" | {status} |"
            )
    return "\n".join(lines) + "\n"

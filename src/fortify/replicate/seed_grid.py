"""Tables and readings over seeds for the ``fortify replicate`` commands.

:class:`SeedGrid` holds ``{row: {seed: EvalReport}}``; its :meth:`~SeedGrid.table` renders mean ±
sd over seeds per column with the number of seeds, the columns' n and the checks,
:meth:`~SeedGrid.readings` the method-vs-baseline differences (:class:`Reading`) with the
seed-then-point bootstrap CI of :func:`fortify.stats.seed_point_bootstrap` and the verdict
derived from it, and :meth:`~SeedGrid.save_per_seed` one compact JSON per (row, seed) with the
per-sample outcomes (small enough to commit under docs/results/).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fortify.errors import ComparisonError, DataError
from fortify.utils.atomic import atomic_write_text
from fortify.utils.records import record

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the evaluator is imported where used: `fortify --help` stays fast
    from fortify.evaluate.report import EvalReport
    from fortify.stats import Interval


@dataclass(frozen=True)
class Reading:
    """Method minus baseline on one column: means over seeds (%), the seeds and points used,
    and the seed-then-point bootstrap interval (percentage points) with its verdict."""

    baseline: str
    method: str
    column: str
    seeds: tuple[int, ...]
    n: int
    baseline_mean: float
    method_mean: float
    interval: Interval

    @property
    def verdict(self) -> str:
        """From the CI alone: higher / lower / no detectable difference at this scale."""
        return self.interval.verdict

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``interval`` as ``difference``)."""
        return record(self, rename={"interval": "difference"}, verdict=self.verdict)


@dataclass
class SeedGrid:
    """Evaluation reports of a replicate command: ``reports[row][seed]``, all on the same points.

    ``labels`` maps row keys to the names shown in tables.
    """

    reports: dict[str, dict[int, EvalReport]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    mode: str = "final"
    #: per (row, seed): facts saved next to the report (e.g. the training fingerprint)
    job_facts: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    def add(
        self, row: str, seed: int, report: EvalReport, facts: dict[str, Any] | None = None
    ) -> None:
        """Record the report of one (row, seed) job (and ``facts`` to save with it)."""
        self.reports.setdefault(row, {})[seed] = report
        if facts is not None:
            self.job_facts[(row, seed)] = dict(facts)

    def label(self, row: str) -> str:
        """The display name of ``row``."""
        return self.labels.get(row, row)

    def _cell(self, row: str, column: str) -> tuple[str, set[int]]:
        from fortify.stats import mean_sd

        vals, ns = [], set()
        for rep in self.reports[row].values():
            t, tn = rep.table().get(self.mode, {}), rep.table_n().get(self.mode, {})
            if column in t and tn.get(column, 0) > 0:
                vals.append(t[column])
                ns.add(tn[column])
        if not vals:
            return "–", ns
        m = mean_sd(vals)
        return m.format(2) + ("" if m.n == len(self.reports[row]) else f" ({m.n} seeds)"), ns

    def table(self, columns: Sequence[str]) -> list[str]:
        """Markdown lines: one row per table row, ``mean ± sd`` over seeds per column (sample sd;
        a single seed shows its value alone), the number of seeds and the checks. A column
        computed on fewer points than the reports hold shows its n in the header."""
        cells: dict[str, list[str]] = {}
        col_n: dict[str, set[int]] = {c: set() for c in columns}
        total = {rep.n_points for reps in self.reports.values() for rep in reps.values()}
        for row in self.reports:
            cells[row] = []
            for c in columns:
                text, ns = self._cell(row, c)
                cells[row].append(text)
                col_n[c] |= ns
        heads = []
        for c in columns:
            ns = col_n[c]
            if not ns or ns <= total:
                heads.append(c)
            else:
                heads.append(c + f" (n={'/'.join(str(v) for v in sorted(ns))})")
        lines = [
            "| method | seeds | " + " | ".join(heads) + " | checks |",
            "|---|---|" + "---|" * len(columns) + "---|",
        ]
        for row, reps in self.reports.items():
            status = sorted({r.checks_status() for r in reps.values()})
            checks = "ok" if status == ["ok"] else "; ".join(status)
            seeds = ",".join(str(s) for s in sorted(reps))
            lines.append(
                f"| {self.label(row)} | {len(reps)} ({seeds}) | "
                + " | ".join(cells[row])
                + f" | {checks} |"
            )
        return lines

    def reading(
        self,
        baseline: str,
        method: str,
        column: str,
        *,
        resamples: int = 2000,
        seed: int = 0,
        level: float = 0.95,
    ) -> Reading | None:
        """Method − baseline on ``column`` over the seeds both rows have (paired by seed) and the
        points every one of those reports' column ran on; None if there is no such seed or
        point."""
        from fortify.stats import mean_sd, seed_point_bootstrap

        ra, rb = self.reports.get(baseline, {}), self.reports.get(method, {})
        seeds = sorted(set(ra) & set(rb))
        given = [(ra[s].column(column, self.mode), rb[s].column(column, self.mode)) for s in seeds]
        cols = [(a, b) for a, b in given if a is not None and b is not None]
        if not seeds or len(cols) < len(given):
            return None
        prints = {r.settings.get("points_sha256") for s in seeds for r in (ra[s], rb[s])} - {None}
        if len(prints) > 1 or len({r.n_points for s in seeds for r in (ra[s], rb[s])}) > 1:
            raise ComparisonError(
                f"{self.label(baseline)} and {self.label(method)} were not all evaluated on the "
                "same points; a paired reading needs the same points for every seed"
            )
        shared = cols[0][0][1].clone()
        for a, b in cols:
            shared &= a[1] & b[1]
        n = int(shared.sum())
        if n == 0:
            return None
        a_seeds = [a[0][shared] for a, _ in cols]
        b_seeds = [b[0][shared] for _, b in cols]
        iv = seed_point_bootstrap(a_seeds, b_seeds, resamples=resamples, seed=seed, level=level)
        return Reading(
            baseline,
            method,
            column,
            tuple(seeds),
            n,
            mean_sd([100.0 * float(t.float().mean()) for t in a_seeds]).mean,
            mean_sd([100.0 * float(t.float().mean()) for t in b_seeds]).mean,
            iv,
        )

    def readings(
        self, pairs: Sequence[tuple[str, str]], columns: Sequence[str], **kw: Any
    ) -> list[Reading]:
        """:meth:`reading` for every (baseline, method) pair and column that can be read."""
        out = []
        for base, meth in pairs:
            for c in columns:
                r = self.reading(base, meth, c, **kw)
                if r is not None:
                    out.append(r)
        return out

    def readings_markdown(self, readings: Sequence[Reading]) -> list[str]:
        """Markdown lines: one row per reading with the difference, its CI and the verdict, then
        a sentence saying how the CI was computed."""
        if not readings:
            return ["(no pair of rows to compare)"]
        first = readings[0].interval
        lines = [
            f"| pair | column | seeds | n | baseline | method | difference [{100 * first.level:g} "
            "% CI] | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in readings:
            lines.append(
                f"| {self.label(r.method)} − {self.label(r.baseline)} | {r.column} | "
                f"{len(r.seeds)} | {r.n} | {r.baseline_mean:.2f} | {r.method_mean:.2f} | "
                f"{r.interval.format(2)} | {r.verdict} |"
            )
        single = any(len(r.seeds) == 1 for r in readings)
        lines += [
            "",
            "Differences in percentage points (method − baseline, mean over seeds). CI: "
            f"bootstrap with {first.resamples} resamples (seed {first.seed}) that draws the "
            "seeds with replacement, then the test points with replacement (one draw shared by "
            "the drawn seeds, which were all evaluated on the same points), pairing the two rows "
            "by seed and point. The verdict follows from the CI alone: higher / lower when it "
            "excludes 0, otherwise no detectable difference at this scale."
            + (
                " With one seed the CI covers only the test-point noise, not the training-seed "
                "noise."
                if single
                else ""
            ),
        ]
        return lines

    def save_per_seed(self, directory: str | Path) -> list[Path]:
        """One JSON per (row, seed) — ``<row>-seed<s>.json``, the report without its extras
        (per-sample outcomes as bit strings) — so the table can be re-aggregated without
        retraining. Returns the paths written."""
        d = Path(directory)
        written = []
        for row, reps in self.reports.items():
            for s, rep in sorted(reps.items()):
                data = rep.to_dict()
                data["extras"] = {}
                data["row"], data["training_seed"] = row, s
                if (row, s) in self.job_facts:
                    data["job"] = self.job_facts[(row, s)]
                path = d / f"{row}-seed{s}.json"
                atomic_write_text(path, json.dumps(data, separators=(",", ":")))
                written.append(path)
        return written

    @classmethod
    def load_per_seed(cls, directory: str | Path, labels: dict[str, str] | None = None) -> SeedGrid:
        """Rebuild a grid from the files :meth:`save_per_seed` wrote."""
        from fortify.evaluate.report import EvalReport

        grid = cls(labels=dict(labels or {}))
        files = sorted(Path(directory).glob("*-seed*.json"))
        if not files:
            raise DataError(f"no per-seed reports (<row>-seed<s>.json) in {directory}")
        for f in files:
            data = json.loads(f.read_text())
            grid.add(
                data["row"], int(data["training_seed"]), EvalReport.from_dict(data), data.get("job")
            )
        return grid

    @staticmethod
    def load_one(path: str | Path) -> tuple[EvalReport, dict[str, Any]] | None:
        """The report and job facts of one file :meth:`save_per_seed` wrote; None if the file
        is absent or unreadable (logged)."""
        from fortify.evaluate.report import EvalReport

        p = Path(path)
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text())
            return EvalReport.from_dict(data), dict(data.get("job") or {})
        except (OSError, ValueError, KeyError, TypeError, DataError) as exc:
            log.warning("%s is unreadable (%s); computing that job again", p, exc)
            return None

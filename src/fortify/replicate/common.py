"""Shared machinery of the ``fortify replicate`` commands: seeds, reuse, tables, readings.

A replicate command trains and evaluates a grid of (row, seed) jobs and turns the evaluation
reports into a page. This module holds the parts every command shares:

* seeds — :func:`add_seed_arguments` (``--seeds 0,1,2``), :func:`seeds_from_args`;
  :func:`job_dir` gives each (row, seed) its own run directory ``<out>/<row>/seed-<s>``;
* reuse — :func:`train_or_reuse` keeps a finished run whose training config is unchanged and
  resumes an interrupted one; :func:`cached` (and :func:`cached_report` for reports), the one
  cache of the replicate commands, keeps finished work whose key (settings and checkpoint
  hashes, :func:`checkpoint_key` / :func:`file_sha256`) is unchanged;
* several evaluations of one model — :func:`extend_with_prefix` adds the columns of a report
  computed on the first k points (e.g. AutoAttack) to the main report, as columns that ran on
  those k points (one rule for subsets, docs/evaluation.md);
* tables and readings — :class:`SeedGrid` holds ``{row: {seed: EvalReport}}``; its
  :meth:`~SeedGrid.table` renders mean ± sd over seeds per column with the number of seeds, the
  columns' n and the checks, :meth:`~SeedGrid.readings` the method-vs-baseline differences with
  the seed-then-point bootstrap CI of :func:`fortify.stats.seed_point_bootstrap` and the
  verdict derived from it, and :meth:`~SeedGrid.save_per_seed` one compact JSON per
  (row, seed) with the per-sample outcomes (small enough to commit under docs/results/).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fortify.errors import ComparisonError, ConfigError, DataError
from fortify.utils.atomic import atomic_write_text

if TYPE_CHECKING:  # torch and the evaluator are imported where used: `fortify --help` stays fast
    import torch

    from fortify.evaluate.report import EvalReport
    from fortify.stats import Interval

log = logging.getLogger(__name__)

CACHE_FORMAT = "fortify-replicate-eval/1"


# --------------------------------------------------------------------------- seeds


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``; raises :class:`ConfigError` for anything but distinct
    integers >= 0."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(
            f"--seeds must be comma-separated integers >= 0 such as 0,1,2; got {text!r}"
        ) from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(
            f"--seeds must be distinct comma-separated integers >= 0 such as 0,1,2; got {text!r}"
        )
    return seeds


def add_seed_arguments(parser: argparse.ArgumentParser, default: str | None = "0") -> None:
    """Add ``--seeds`` (comma-separated training seeds, one run per row and seed)."""
    parser.add_argument(
        "--seeds",
        default=default,
        help="comma-separated training seeds; each row is trained and evaluated once per seed "
        "(finished (row, seed) jobs are reused)",
    )


def seeds_from_args(args: argparse.Namespace) -> list[int]:
    """The seeds of ``args.seeds``."""
    return parse_seeds(args.seeds)


def per_seed_args(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One copy of ``args`` per seed, for commands that run a whole pipeline per seed.

    Without ``--seeds`` (``args.seeds`` None): ``[args]`` with ``args.seed`` and ``args.out`` as
    given (the historical layout). With it: ``seed`` set and ``out`` = ``<out>/seed-<s>``.
    """
    if getattr(args, "seeds", None) is None:
        return [args]
    out = []
    for seed in seeds_from_args(args):
        a = copy.copy(args)
        a.seed, a.out = seed, str(Path(args.out) / f"seed-{seed}")
        out.append(a)
    return out


def job_dir(out: str | Path, row: str, seed: int) -> Path:
    """The run directory of one (row, seed) job: ``<out>/<row>/seed-<seed>``."""
    return Path(out) / row / f"seed-{seed}"


# --------------------------------------------------------------------------- reuse


def file_sha256(path: str | Path) -> str | None:
    """SHA-256 of a file (None if it does not exist)."""
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Trained:
    """Result of :func:`train_or_reuse`: the model (eval mode), seconds spent in this call and
    how the run was obtained (``reused``, ``resumed``, ``new``, ``overwritten``)."""

    model: torch.nn.Module  # noqa: F821 - annotation only
    seconds: float
    how: str


def train_or_reuse(cfg: Any, run_dir: str | Path, **fit_kwargs: Any) -> Trained:
    """Train ``cfg`` into ``run_dir`` unless a finished run of the same training config is there.

    A finished run whose stored config differs only in what does not change training (device,
    ``eval`` section, ...) is reused; a run with a ``last`` checkpoint is resumed; a folder
    without one (an aborted start) is overwritten (moved aside by ``fit``). The returned model is
    the ``last`` checkpoint as saved on disk.
    """
    from fortify.runs import RunDir, load_model
    from fortify.train import fit
    from fortify.train.resume import training_changes

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    last = run_dir / "checkpoints" / "last.safetensors"
    rd = RunDir(run_dir)
    stored = rd.read_config() if run_dir.is_dir() else None
    if stored is not None and rd.state == "finished" and last.is_file():
        changes = training_changes(stored, cfg)
        if not changes:
            log.info("%s: finished run reused", run_dir)
            model, _ = load_model(run_dir, tag="last")
            return Trained(model.eval(), time.perf_counter() - t0, "reused")
        log.info("%s: config changed (%s); training again", run_dir, "; ".join(changes[:3]))
        how, mode = "overwritten", "overwrite"
    elif last.is_file():
        how, mode = "resumed", "resume"
    elif run_dir.exists() and any(run_dir.iterdir()):
        how, mode = "overwritten", "overwrite"
    else:
        how, mode = "new", "new"
    log.info("%s: training (%s)", run_dir, how)
    fit(cfg, run_dir, mode=mode, **fit_kwargs)
    model, _ = load_model(run_dir, tag="last")
    return Trained(model.eval(), time.perf_counter() - t0, how)


T = TypeVar("T")


def cached(
    path: str | Path,
    key: dict[str, Any],
    compute: Callable[[], T],
    *,
    encode: Callable[[T], Any] = lambda v: v,
    decode: Callable[[Any], T] = lambda v: v,
    field: str = "value",
    reuse: bool = True,
) -> tuple[T, bool]:
    """The one cache of finished work of the replicate commands.

    ``path`` holds ``{"format", "key", <field>: encode(value)}``; when its key equals ``key``
    (and ``reuse``) the stored value is decoded and returned, otherwise ``compute()`` runs and
    its result is stored atomically with ``key``. A key names everything the value depends on:
    settings plus :func:`checkpoint_key` of the checkpoints it was computed from (their SHA-256,
    never a modification time). Returns ``(value, reused: bool)``; an unreadable file is
    computed again with a warning.
    """
    p = Path(path)
    if reuse and p.is_file():
        try:
            stored = json.loads(p.read_text())
            if stored.get("format") == CACHE_FORMAT and stored.get("key") == key:
                log.info("%s: reused", p)
                return decode(stored[field]), True
        except (OSError, ValueError, KeyError, TypeError, AttributeError, DataError) as exc:
            log.warning("%s is unreadable (%s); computing again", p, exc)
    value = compute()
    atomic_write_text(
        p, json.dumps({"format": CACHE_FORMAT, "key": key, field: encode(value)}, indent=1)
    )
    return value, False


def checkpoint_key(settings: dict[str, Any], **checkpoints: str | Path | None) -> dict[str, Any]:
    """A :func:`cached` key: ``settings`` plus the SHA-256 of each named checkpoint file
    (None for a file that does not exist, or for a checkpoint given as None)."""
    return {
        **settings,
        **{
            f"{name}_sha256": None if p is None else file_sha256(p)
            for name, p in checkpoints.items()
        },
    }


def cached_report(
    path: str | Path, key: dict[str, Any], compute: Callable[[], EvalReport], *, reuse: bool = True
) -> tuple[EvalReport, bool]:
    """:func:`cached` for an :class:`EvalReport` (stored under ``report``)."""
    from fortify.evaluate.report import EvalReport

    return cached(
        path,
        key,
        compute,
        encode=lambda r: r.to_dict(),
        decode=EvalReport.from_dict,
        field="report",
        reuse=reuse,
    )


def extend_with_prefix(
    main: EvalReport, extra: EvalReport, *, skip: Sequence[str] = ("Natural",)
) -> EvalReport:
    """``main`` plus the columns of ``extra``, a report on the first k points of ``main``.

    The added columns count only those k points (``ran``), so the Worst case over both reports
    is computed where every attack ran. ``extra``'s Natural column must equal the first k points
    of ``main``'s (a check that the points are the same); its checks are appended with the suite
    name in brackets. Columns named in ``skip`` are not added.
    """
    import torch

    from fortify.evaluate.report import NATURAL, EvalReport, Outcome, first_mask

    n, k = main.n_points, extra.n_points
    if k > n:
        raise ComparisonError(f"the extra report has {k} points, more than the main report's {n}")
    nat_main, nat_extra = main.correct(NATURAL), extra.correct(NATURAL)
    if nat_main is not None and nat_extra is not None and not torch.equal(nat_main[:k], nat_extra):
        raise ComparisonError(
            "the extra report's clean outcomes differ from the first "
            f"{k} points of the main report's; it was not evaluated on the same points"
        )
    outcomes = list(main.outcomes)
    prefix = first_mask(n, k)
    for o in extra.outcomes:
        if o.name in skip:
            continue
        correct = torch.zeros(n, dtype=torch.bool)
        correct[:k] = o.correct
        ran = torch.zeros(n, dtype=torch.bool) if prefix is not None else None
        if ran is not None:
            ran[:k] = True if o.ran is None else o.ran
        elif o.ran is not None:
            ran = o.ran.clone()
        outcomes.append(Outcome(o.name, correct, o.mode, o.ensemble, o.seconds, o.note, ran))
    suite = extra.settings.get("suite", "extra")
    checks = list(main.checks)
    for c in extra.checks:
        checks.append(type(c)(f"{c.name} [{suite}]", c.status, c.message, c.masking))
    settings = dict(main.settings)
    settings.setdefault("added_reports", [])
    settings["added_reports"] = [
        *settings["added_reports"],
        {
            k_: extra.settings.get(k_)
            for k_ in ("suite", "n_points", "seed", "autoattack_points", "seconds")
        },
    ]
    return EvalReport(settings, outcomes, checks, dict(main.extras))


# --------------------------------------------------------------------------- tables


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
        """JSON-ready dict."""
        return {
            "baseline": self.baseline,
            "method": self.method,
            "column": self.column,
            "seeds": list(self.seeds),
            "n": self.n,
            "baseline_mean": self.baseline_mean,
            "method_mean": self.method_mean,
            "difference": self.interval.to_dict(),
            "verdict": self.verdict,
        }


@dataclass
class SeedGrid:
    """Evaluation reports of a replicate command: ``reports[row][seed]``, all on the same points.

    ``labels`` maps row keys to the names shown in tables.
    """

    reports: dict[str, dict[int, EvalReport]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    mode: str = "final"

    def add(self, row: str, seed: int, report: EvalReport) -> None:
        """Record the report of one (row, seed) job."""
        self.reports.setdefault(row, {})[seed] = report

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
        cols = [(ra[s].column(column, self.mode), rb[s].column(column, self.mode)) for s in seeds]
        if not seeds or any(a is None or b is None for a, b in cols):
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
            grid.add(data["row"], int(data["training_seed"]), EvalReport.from_dict(data))
        return grid

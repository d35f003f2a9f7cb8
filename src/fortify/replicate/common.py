"""Shared machinery of the ``fortify replicate`` commands: seeds, reuse, reports of subsets.

A replicate command trains and evaluates a grid of (row, seed) jobs and turns the evaluation
reports into a page. This module holds the parts every command shares:

* seeds — :func:`add_seed_arguments` (``--seeds 0,1,2``), :func:`seeds_from_args`;
  :func:`job_dir` gives each (row, seed) its own run directory ``<out>/<row>/seed-<s>``;
* reuse — :func:`train_or_reuse` keeps a finished run whose training config is unchanged and
  resumes an interrupted one; :func:`cached` (and :func:`cached_report` for reports), the one
  cache of the replicate commands, keeps finished work whose key (settings and checkpoint
  hashes, :func:`checkpoint_key` / :func:`file_sha256`) is unchanged;
* outputs — :func:`check_outputs` checks every output file and folder before any work;
* several evaluations of one model — :func:`extend_with_prefix` adds the columns of a report
  computed on the first k points (e.g. AutoAttack) to the main report, as columns that ran on
  those k points (one rule for subsets, docs/evaluation.md);

Tables and readings over seeds live in :mod:`fortify.replicate.seed_grid`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from fortify.errors import ComparisonError, ConfigError, DataError, RunDirError, unknown_name
from fortify.utils.atomic import atomic_write_text

if TYPE_CHECKING:  # torch and the evaluator are imported where used: `fortify --help` stays fast
    import torch

    from fortify.evaluate.report import EvalReport
    from fortify.runs.rundir import Mode

log = logging.getLogger(__name__)

CACHE_FORMAT = "fortify-replicate-eval/1"


# --------------------------------------------------------------------------- seeds


def _comma_items(text: str, flag: str, what: str, example: str) -> list[str]:
    """The stripped items of the comma-separated ``text``; ConfigError for none or an empty
    one (``0,,1``, ``0,``: a typo, never silently skipped)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ConfigError(
            f"{flag} names no {what} (got {text!r}); give a comma list such as {example}"
        )
    if not all(parts):
        raise ConfigError(
            f"{flag} {text!r} has an empty item; give a comma list without empty items such as "
            f"{example}"
        )
    return parts


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``; raises :class:`ConfigError` for anything but distinct
    integers in [0, 2**63 - 1]."""
    allowed = "distinct comma-separated integers in [0, 2**63 - 1] such as 0,1,2"
    items = _comma_items(text, "--seeds", "seed", "0,1,2")
    try:
        seeds = [int(p) for p in items]
    except ValueError:
        raise ConfigError(f"--seeds must be {allowed}; got {text!r}") from None
    if any(not 0 <= s <= 2**63 - 1 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be {allowed}; got {text!r}")
    return seeds


def parse_rows(
    text: str, rows: Sequence[str], flag: str = "--rows", what: str = "row"
) -> list[str]:
    """``--rows "a,b"`` → ``["a", "b"]``: distinct names out of ``rows`` (ConfigError naming an
    unknown one with close matches, a repeated one, or an empty item); ``flag`` / ``what`` name
    another comma-list option of names the same way (e.g. ``--bn``, "BN setting")."""
    chosen = _comma_items(text, flag, what, ",".join(rows))
    for name in chosen:
        if name not in rows:
            raise ConfigError(f"{flag}: {unknown_name(what, name, rows)}")
    repeated = sorted({r for r in chosen if chosen.count(r) > 1})
    if repeated:
        raise ConfigError(f"{flag} names {repeated} more than once; give each {what} once")
    return chosen


class _SeedsAction(argparse.Action):
    """Stores ``--seeds`` and notes that it was on the command line (:func:`seeds_given`)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.seeds_given = True


def add_seed_arguments(parser: argparse.ArgumentParser, default: str | None = "0") -> None:
    """Add ``--seeds`` (comma-separated training seeds, one run per row and seed)."""
    parser.add_argument(
        "--seeds",
        default=default,
        action=_SeedsAction,
        help="comma-separated training seeds; each row is trained and evaluated once per seed "
        "(finished (row, seed) jobs are reused)",
    )


def seeds_given(args: argparse.Namespace) -> bool:
    """Whether ``--seeds`` was on the command line, not just its default (a command with a
    single-seed option as well refuses both)."""
    return bool(getattr(args, "seeds_given", False))


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


# --------------------------------------------------------------------------- outputs


def check_outputs(
    *,
    files: Mapping[str, str | Path | None] | None = None,
    folders: Mapping[str, str | Path | None] | None = None,
) -> None:
    """Check, before any training or evaluation and without creating anything, that every
    output can be written: each of ``folders`` (what → path, e.g. ``{"--out folder": ...}``) is
    or can become a writable folder, and each of ``files`` (option → path, e.g.
    ``{"--doc": ...}``) is not a folder and its folder can be created and written. None paths
    are skipped.

    Raises:
        RunDirError: naming the option, the path and why it cannot be used.
    """
    from fortify.utils.atomic import check_writable_dir

    for what, path in (folders or {}).items():
        if path is not None:
            check_writable_dir(path, what)
    for option, path in (files or {}).items():
        if path is None:
            continue
        p = Path(path).expanduser()
        if p.is_dir():
            raise RunDirError(
                f"{option} {str(p)!r} is a folder; give the path of a file to write, e.g. "
                f"{str(p / 'page.md')!r}"
            )
        check_writable_dir(p.parent, f"folder of {option}")


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
    fit(cfg, run_dir, mode=cast("Mode", mode), **fit_kwargs)
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

    from fortify.evaluate.outcome import Outcome, first_mask
    from fortify.evaluate.report import NATURAL, EvalReport

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

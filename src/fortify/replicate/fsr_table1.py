"""``fortify replicate fsr-table1``: a CPU-scale version of FSR's Table 1 on Fashion-MNIST.

Six rows — AT, AT+FSR, TRADES, TRADES+FSR, MART, MART+FSR — each trained with
:func:`fortify.train.fit` (narrow ResNet-18 layout ``small-resnet``, a training subset, a few
epochs, fp32 by default, ``--precision bf16`` for bf16 autocast + channels-last) and
evaluated with :func:`fortify.evaluate.evaluate`:
the FSR paper suite (Natural, FGSM, PGD-20, PGD-100, C&W κ=50, Ensemble) on ``--test-points``
test images and AutoAttack (standard) on the first ``--aa-points`` of them; L∞ ε = 0.1.

Each row is trained once per seed of ``--seeds`` (e.g. ``0,1,2``). Everything lives under
``--out``: one run directory per (row, seed), ``<out>/<row>/seed-<s>``, with its evaluation in
``reports/fsr_table1_eval.json``; re-running the command resumes unfinished training and reuses
finished (row, seed) jobs and evaluations whose settings and checkpoint match, so two processes
with disjoint ``--rows`` can share one ``--out`` and a last call with every row collects them.
The page (``--doc``) shows mean ± sd over seeds, the per-pair differences (FSR minus baseline)
with seed-then-point bootstrap CIs and the verdicts derived from them; one JSON per (row, seed)
with the per-sample outcomes goes to ``--per-seed-dir`` (default: ``--doc`` without ``.md``),
a summary to ``--out/fsr_table1.json`` and a copy next to the Markdown. A (row, seed) whose run
directory holds no finished run (e.g. a fresh clone) but whose per-seed JSON records the same
training fingerprint and evaluation settings is taken from the JSON (a later session adds rows or
seeds without retraining).
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from fortify.replicate._fsr_recipe import (
    DEFAULTS,
    EPS,
    _precision,
    _seeds,
    add_precision_argument,
    row_config,
)
from fortify.replicate.common import (
    add_seed_arguments,
    cached_report,
    check_outputs,
    extend_with_prefix,
    file_sha256,
    job_dir,
    parse_rows,
    seeds_given,
    train_or_reuse,
)
from fortify.replicate.seed_grid import SeedGrid
from fortify.stats import BootstrapOptions

NAME = "fsr-table1"
HELP = "FSR Table 1 at CPU scale: AT/TRADES/MART with and without FSR on Fashion-MNIST"
DESCRIPTION = __doc__

ROWS = ("at", "at-fsr", "trades", "trades-fsr", "mart", "mart-fsr")
LABELS = {
    "at": "AT",
    "at-fsr": "AT + FSR",
    "trades": "TRADES",
    "trades-fsr": "TRADES + FSR",
    "mart": "MART",
    "mart-fsr": "MART + FSR",
}
COLUMNS = ("Natural", "FGSM", "PGD-20", "PGD-100", "C&W", "Ensemble", "AutoAttack", "Worst case")
READING_COLUMNS = ("Natural", "PGD-20", "Ensemble", "AutoAttack", "Worst case")
PAIRS = (("at", "at-fsr"), ("trades", "trades-fsr"), ("mart", "mart-fsr"))
WEAK_BASELINE_GAP = 3.0  # clean-accuracy points below the other baselines that get flagged

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument("--out", default="runs/fsr-table1", help="folder for the six run dirs")
    parser.add_argument(
        "--doc",
        default=None,
        help="Markdown table to write (default: OUT/fsr_table1.md; --doc "
        "docs/results/fsr_table1.md updates the published page)",
    )
    parser.add_argument("--epochs", type=int, default=d["epochs"])
    parser.add_argument(
        "--train-subset", type=int, default=d["train_subset"], help="training images"
    )
    parser.add_argument("--width", type=int, default=d["width"], help="small-resnet width")
    parser.add_argument("--fsr-hidden", type=int, default=d["fsr_hidden"], help="FSR hidden width")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"])
    parser.add_argument(
        "--attack-steps", type=int, default=d["attack_steps"], help="PGD steps in training"
    )
    add_precision_argument(parser)
    parser.add_argument(
        "--test-points", type=int, default=d["test_points"], help="paper-suite points"
    )
    parser.add_argument(
        "--val-points",
        type=int,
        default=d["val_points"],
        help="validation points scored after each epoch (the last epoch is kept either way)",
    )
    parser.add_argument(
        "--aa-points", type=int, default=d["aa_points"], help="AutoAttack points (0: skip)"
    )
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}"
    )
    add_seed_arguments(parser)
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="a single training seed (same as --seeds N; not together with --seeds)",
    )
    parser.add_argument(
        "--per-seed-dir",
        default=None,
        help="folder for one JSON per (row, seed) with per-sample outcomes (unset: --doc "
        "without .md)",
    )
    parser.add_argument(
        "--appendix",
        default=None,
        help="Markdown file appended verbatim to the page (a hand-written investigation, e.g. "
        "docs/results/fsr_table1_mart.md); kept in the page's command",
    )
    parser.add_argument(
        "--resamples", type=int, default=2000, help="bootstrap resamples of the CIs (>= 2000)"
    )
    parser.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="time a short epoch + small eval, print the estimate, stop",
    )
    parser.add_argument(
        "--assume-robust",
        type=float,
        default=0.7,
        help="--estimate: robust fraction in [0, 1] for AutoAttack's cost",
    )


def _check_args(args: argparse.Namespace) -> list[str]:
    """Every option checked before any work (training, evaluation, the estimate's probes or
    worker jobs); returns the chosen rows."""
    import math

    from fortify.errors import ConfigError

    rows = parse_rows(args.rows, list(ROWS))
    for name in (
        "epochs", "train_subset", "width", "test_points", "batch_size", "attack_steps", "val_points"
    ):  # fmt: skip
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.aa_points < 0:
        raise ConfigError(f"--aa-points must be >= 0, got {args.aa_points}")
    if getattr(args, "seed", None) is not None and seeds_given(args):
        raise ConfigError(
            f"give the training seeds either with --seeds (got {args.seeds!r}) or one with "
            f"--seed (got {args.seed}), not both"
        )
    _seeds(args)  # ConfigError for bad --seeds / a negative --seed
    if getattr(args, "seed", None) is not None and args.seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {args.seed}")
    BootstrapOptions(resamples=args.resamples).validate()
    r = args.assume_robust
    if not (math.isfinite(r) and 0.0 <= r <= 1.0):
        raise ConfigError(f"--assume-robust must be a fraction in [0, 1] such as 0.7, got {r!r}")
    _check_appendix(args)
    if not args.estimate:  # the estimate writes nothing but temporary files
        doc = args.doc or Path(args.out) / "fsr_table1.md"
        per_seed = "--per-seed-dir" if args.per_seed_dir else "per-seed (--doc without .md)"
        check_outputs(
            files={"--doc": doc},
            folders={"--out folder": args.out, f"{per_seed} folder": _per_seed_dir(args)},
        )
    return rows


# --------------------------------------------------------------------------- one row


def _eval_key(args: argparse.Namespace, seed: int, checkpoint_sha: str | None) -> dict[str, Any]:
    return {
        "eps": EPS,
        "test_points": args.test_points,
        "aa_points": args.aa_points,
        "eval_seed": seed,
        "checks": not args.no_checks,
        "checkpoint": "last",
        "checkpoint_sha256": checkpoint_sha,
        "rules": "fortify-eval/2",
    }


def _evaluate(
    model: Any, row_dir: Path, args: argparse.Namespace, splits: Any, seed: int
) -> tuple[Any, bool]:
    """Paper suite on ``--test-points`` + AutoAttack on the first ``--aa-points`` (columns that
    count only those points), cached in ``reports/fsr_table1_eval.json``."""
    from fortify.evaluate import evaluate

    key = _eval_key(args, seed, file_sha256(row_dir / "checkpoints" / "last.safetensors"))

    def compute() -> Any:
        x, y = splits.test.head(args.test_points).floats()
        rep = evaluate(model, x, y, suite="paper", eps=EPS, seed=seed, checks=not args.no_checks)
        if args.aa_points > 0:
            n = min(args.aa_points, len(x))
            aa = evaluate(
                model,
                x[:n],
                y[:n],
                suite="autoattack",
                eps=EPS,
                seed=seed,
                checks=False,
                batch_size=max(256, n),
            )
            rep = extend_with_prefix(rep, aa)
        return rep

    return cached_report(row_dir / "reports" / "fsr_table1_eval.json", key, compute)


def _check_appendix(args: argparse.Namespace) -> None:
    from fortify.errors import ConfigError

    appendix = getattr(args, "appendix", None)
    if appendix and not Path(appendix).is_file():
        raise ConfigError(f"--appendix {appendix!r} is not a file; give a Markdown file to append")


def _per_seed_dir(args: argparse.Namespace) -> Path:
    """Where the per-(row, seed) JSON go: ``--per-seed-dir``, else ``--doc`` without ``.md``."""
    doc = Path(args.doc) if args.doc else Path(args.out) / "fsr_table1.md"
    return Path(args.per_seed_dir) if args.per_seed_dir else doc.with_suffix("")


def _job_facts(cfg: Any, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """What a committed result must match to stand for this (row, seed): the training
    fingerprint and the evaluation settings."""
    from fortify.train.resume import training_fingerprint

    return {
        "training_sha256": training_fingerprint(cfg),
        "evaluation": _eval_key(args, seed, None),
    }


def _committed(
    per_seed_dir: Path, row: str, seed: int, facts: dict[str, Any], run_dir: Path
) -> tuple[Any, dict[str, Any]] | None:
    """The committed report of (row, seed) when its run directory holds no finished run (an
    unfinished one is not resumed then) and the per-seed JSON was computed from the same
    training config and evaluation settings (a later session re-aggregates without
    retraining); else None."""
    from fortify.runs import RunDir

    if RunDir(run_dir).state == "finished":
        return None
    loaded = SeedGrid.load_one(per_seed_dir / f"{row}-seed{seed}.json")
    if loaded is None:
        return None
    report, stored = loaded
    if any(stored.get(k) != v for k, v in facts.items()):
        return None
    if not {"train_total", "final_epoch"} <= set(stored):
        log.warning("%s seed %d: the committed result lacks its training facts; computing again",
                    row, seed)  # fmt: skip
        return None
    log.info("%s seed %d: committed result reused (%s)", row, seed, per_seed_dir)
    return report, stored


def _train_seconds(run_dir: Path) -> float:
    """Training + validation seconds over all epochs recorded in the run's metrics.jsonl."""
    from fortify.runs import RunDir

    return sum(
        float(r.get("time/train", 0.0)) + float(r.get("time/val", 0.0))
        for r in RunDir(run_dir).read_metrics()
    )


def _last_record(run_dir: Path) -> dict[str, Any]:
    from fortify.runs import RunDir

    records = RunDir(run_dir).read_metrics()
    if not records:
        return {}
    return {k: v for k, v in records[-1].items() if isinstance(v, (int, float, str))}


def _argv(args: argparse.Namespace, **override: str) -> list[str]:
    """``replicate fsr-table1 --flag value ...`` of ``args`` (``override``: flag -> value)."""
    parts = ["replicate", NAME]
    for flag in (
        "out", "doc", "epochs", "train_subset", "width", "fsr_hidden", "batch_size",
        "attack_steps", "test_points", "aa_points", "val_points", "rows",
    ):  # fmt: skip
        parts += [f"--{flag.replace('_', '-')}", str(override.get(flag, getattr(args, flag)))]
    seeds = override.get("seeds", ",".join(str(s) for s in _seeds(args)))
    parts += ["--seeds", seeds]
    if _precision(args) != "fp32":
        parts += ["--precision", _precision(args)]
    if args.no_checks:
        parts.append("--no-checks")
    return parts


def _workers(args: argparse.Namespace) -> int:
    return int(getattr(args, "workers", 1) or 1)


def _command(args: argparse.Namespace) -> str:
    workers = ["--workers", str(_workers(args))] if _workers(args) > 1 else []
    per_seed = ["--per-seed-dir", str(args.per_seed_dir)] if args.per_seed_dir else []
    appendix = ["--appendix", str(args.appendix)] if getattr(args, "appendix", None) else []
    parts = ["fortify", *_argv(args), *per_seed, *appendix, *workers]
    return " ".join(shlex.quote(p) for p in parts)


def _how_run(args: argparse.Namespace) -> str:
    """How this call ran its (row, seed) jobs: worker processes and intra-op threads."""
    import torch

    from fortify.replicate.workers import threads_per_worker

    workers = _workers(args)
    if workers > 1:
        return (
            f"{workers} worker processes running one (row, seed) job each at a time, "
            f"{threads_per_worker(workers)} thread(s) per worker (`--workers {workers}`)"
        )
    return f"one process, {torch.get_num_threads()} thread(s)"


def jobs(args: argparse.Namespace) -> list[Any]:
    """One independent job per (row, seed) for ``--workers``: trains and evaluates that one.

    A job writes its one-row page under ``<out>/jobs/`` (not ``--doc``); the full table is
    assembled afterwards from the finished jobs' reports. A (row, seed) with a committed result
    (per-seed JSON of the same training config and evaluation settings, no run directory) is
    not a job.
    """
    from fortify.replicate.workers import Job

    rows = _check_args(args)  # before hours of jobs, not after
    out = Path(args.out) / "jobs"
    seeds = _seeds(args)
    per_seed_dir = _per_seed_dir(args)
    return [
        Job(
            f"{row}" if len(seeds) == 1 else f"{row}-seed{seed}",
            tuple(_argv(args, rows=row, seeds=str(seed), doc=str(out / f"{row}-{seed}.md"))),
        )
        for seed in seeds
        for row in rows
        if _committed(
            per_seed_dir,
            row,
            seed,
            _job_facts(row_config(row, args, seed), args, seed),
            job_dir(args.out, row, seed),
        )
        is None
    ]


# --------------------------------------------------------------------------- entry point


def run(args: argparse.Namespace) -> int:
    from fortify.data import load_from_config

    rows = _check_args(args)
    if args.doc is None:
        args.doc = str(Path(args.out) / "fsr_table1.md")
    seeds = _seeds(args)
    if args.estimate:
        from fortify.replicate._fsr_table1_page import estimate

        return estimate(args, rows, len(seeds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # every row and seed trains on the same data: load it once (test split whole)
    splits = load_from_config(row_config(rows[0], args, seeds[0]).data)
    from fortify.replicate._fsr_table1_page import log_grid_estimate

    log_grid_estimate(args, rows, seeds, splits)
    command = _command(args)
    t_start = time.perf_counter()
    grid = SeedGrid(labels=dict(LABELS))
    jobs: dict[str, dict[str, Any]] = {}
    per_seed_dir = _per_seed_dir(args)
    for seed in seeds:
        for row in rows:
            run_dir = job_dir(out, row, seed)
            cfg = row_config(row, args, seed)
            facts = _job_facts(cfg, args, seed)
            committed = _committed(per_seed_dir, row, seed, facts, run_dir)
            if committed is not None:
                report, stored = committed
                facts.update(stored)
                how = {"training": "committed", "evaluation": "committed"}
                this_call = {"train_this_call": 0.0, "eval_this_call": 0.0}
            else:
                trained = train_or_reuse(cfg, run_dir, splits=splits, progress=sys.stderr.isatty())
                t0 = time.perf_counter()
                report, reused = _evaluate(trained.model, run_dir, args, splits, seed)
                facts["train_total"] = round(_train_seconds(run_dir), 1)
                facts["final_epoch"] = _last_record(run_dir)
                how = {"training": trained.how, "evaluation": "reused" if reused else "new"}
                this_call = {
                    "train_this_call": round(trained.seconds, 1),
                    "eval_this_call": round(time.perf_counter() - t0, 1),
                }
            grid.add(row, seed, report, facts)
            jobs[f"{row}/seed-{seed}"] = {
                **how,
                "seconds": {
                    **this_call,
                    "train_total": facts["train_total"],
                    "eval_total": float(report.settings.get("seconds", 0.0))
                    + sum(
                        float(a.get("seconds") or 0.0)
                        for a in report.settings.get("added_reports", [])
                    ),
                },
                "final_epoch": facts["final_epoch"],
                "checks": report.checks_status(),
            }
            acc = report.table()["final"]
            log.info(
                "%s seed %d: %s",
                LABELS[row],
                seed,
                ", ".join(f"{c} {_fmt(acc.get(c))}" for c in COLUMNS),
            )
    import torch

    summary: dict[str, Any] = {
        "jobs": jobs,
        "wall_time_this_call_min": round((time.perf_counter() - t_start) / 60, 2),
        "wall_time_min": round(
            sum(j["seconds"]["train_total"] + j["seconds"]["eval_total"] for j in jobs.values())
            / 60,
            2,
        ),
        "settings": {
            **{k: getattr(args, k) for k in DEFAULTS},
            "seeds": seeds,
            "eps": EPS,
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
            "workers": _workers(args),
            "how_run": _how_run(args),
            "torch": torch.__version__,
        },
    }
    doc = Path(args.doc)
    grid.save_per_seed(per_seed_dir)
    from fortify.replicate._fsr_table1_page import write_report

    text = write_report(grid, summary, args, doc, command, per_seed_dir)
    from fortify.runs import write_json_atomic

    write_json_atomic(out / "fsr_table1.json", summary)
    print(text)
    return 0


def _fmt(v: float | None) -> str:
    return "–" if v is None or v != v else f"{v:.2f}"

"""``fortify compare A B``: is B more robust than A on the same points, beyond the noise?"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Compare two evaluations of the same points (run directories or eval.json files), column by "
    "column: B − A in percentage points with a paired-bootstrap confidence interval over the "
    "points, the exact McNemar p-value and a verdict from the CI alone (higher / lower / no "
    "detectable difference at this scale). Refuses evaluations whose points, ε, norm, suite or "
    "mode differ."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="baseline: run directory or eval.json")
    parser.add_argument("b", metavar="B", help="candidate: run directory or eval.json")
    add_compare_options(parser)
    parser.add_argument("--suite", default=None, help="read eval-<suite>.json instead of eval.json")
    parser.add_argument("--out", default=None, help="also write the markdown to this file")
    parser.add_argument("--json", default=None, help="also write the comparison as JSON here")


def add_compare_options(parser: argparse.ArgumentParser) -> None:
    """The bootstrap options (shared with ``fortify report --compare``)."""
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (>= 2000)")
    parser.add_argument("--ci-seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level")
    parser.add_argument(
        "--columns",
        default=None,
        help="comma-separated columns to compare (unset: every column both reports have)",
    )


def compare_columns(args: argparse.Namespace) -> list[str] | None:
    """Check the bootstrap options of ``args`` (before any report is read) and return the
    ``--columns`` names (None: every common column); ConfigError for a value out of range or a
    ``--columns`` that names no column."""
    from fortify.errors import ConfigError
    from fortify.stats import BootstrapOptions

    try:
        BootstrapOptions(args.resamples, args.ci_seed, args.level).validate()
    except ConfigError as exc:  # name the flags, not the function's arguments
        raise ConfigError(f"--resamples/--ci-seed/--level: {exc}") from None
    if args.columns is None:
        return None
    cols = [c.strip() for c in args.columns.split(",") if c.strip()]
    if not cols:
        raise ConfigError(
            f"--columns {args.columns!r} names no column; give comma-separated column names "
            "(e.g. 'PGD-20,AutoAttack') or leave it out to compare every common column"
        )
    return cols


def compare_paths(a: Path, b: Path, args: argparse.Namespace, labels: tuple[str, str]) -> Any:
    """Load two reports and compare them with the options in ``args``."""
    from fortify.cli.cmd_report import find_report
    from fortify.evaluate import EvalReport
    from fortify.evaluate.compare import compare_reports

    cols = compare_columns(args)
    ra = EvalReport.load(find_report(a, args.suite))
    rb = EvalReport.load(find_report(b, args.suite))
    return compare_reports(
        ra,
        rb,
        labels=labels,
        resamples=args.resamples,
        seed=args.ci_seed,
        level=args.level,
        columns=cols,
    )


def run(args: argparse.Namespace) -> int:
    from fortify.cli.cmd_report import check_output_file, input_reports, run_label
    from fortify.utils.atomic import atomic_write_text

    compare_columns(args)
    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path:
            check_output_file(path, flag, input_reports([args.a, args.b], args.suite))
    a, b = Path(args.a), Path(args.b)
    la, lb = run_label(a), run_label(b)
    if la == lb:
        la, lb = f"A ({la})", f"B ({lb})"
    comp = compare_paths(a, b, args, (la, lb))
    text = comp.to_markdown()
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
    if args.json:
        atomic_write_text(args.json, comp.to_json())
    return 0

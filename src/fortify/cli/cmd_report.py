"""``fortify report RUN [RUN...]``: evaluation tables of several runs side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = (
    "Put the evaluation tables of several runs side by side (markdown). Reads "
    "<run>/reports/eval.json "
    "(the latest `fortify eval`), or eval-<suite>.json with --suite; a path to an eval.json "
    "works too."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories or eval.json files")
    parser.add_argument("--suite", default=None, help="read eval-<suite>.json instead of eval.json")
    parser.add_argument("--out", default=None, help="also write the markdown to this file")
    parser.add_argument(
        "--checks", action="store_true", help="list each run's non-ok checks below the table"
    )


def _find(run: Path, suite: str | None) -> Path:
    if run.is_file():
        return run
    name = f"eval-{suite}.json" if suite else "eval.json"
    for cand in (run / "reports" / name, run / name):
        if cand.is_file():
            return cand
    from fortify.errors import RunDirError

    raise RunDirError(f"no {name} in {run}/reports or {run}; run `fortify eval {run}` first")


def run(args: argparse.Namespace) -> int:
    from fortify.errors import RunDirError
    from fortify.evaluate import EvalReport, side_by_side
    from fortify.utils.atomic import atomic_write_text, check_writable_dir

    if args.out:
        if Path(args.out).is_dir():
            raise RunDirError(f"--out {args.out!r} is a folder; give a file name (e.g. report.md)")
        check_writable_dir(Path(args.out).parent, "folder of --out")
    reports = {}
    for r in args.runs:
        p = Path(r)
        label = (
            p.name
            if p.is_dir()
            else (p.parent.parent.name if p.parent.name == "reports" else p.stem)
        )
        while label in reports:
            label += "'"
        reports[label] = EvalReport.load(_find(p, args.suite))
    text = side_by_side(reports)
    if args.checks:
        lines = []
        for label, rep in reports.items():
            for c in rep.checks:
                if c.status != "ok":
                    lines.append(f"- {label}: [{c.status}] {c.name}: {c.message}")
        text += "\n" + ("\n".join(lines) if lines else "All checks ok.") + "\n"
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
    return 0

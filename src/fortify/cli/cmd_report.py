"""``fortify report RUN [RUN...]``: evaluation tables of several runs side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = (
    "Put the evaluation tables of several runs side by side (markdown). Reads "
    "<run>/reports/eval.json "
    "(the latest `fortify eval`), or eval-<suite>.json with --suite; a path to an eval.json "
    "works too. With --compare, each later run is also compared with the first one (B − A per "
    "column, paired-bootstrap CI, McNemar p, verdict; as `fortify compare`). With --merge, join "
    "the slices written by `fortify eval --shard i/n` into the report one process would have "
    "written."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories or eval.json files")
    parser.add_argument("--suite", default=None, help="read eval-<suite>.json instead of eval.json")
    parser.add_argument("--out", default=None, help="also write the markdown to this file")
    parser.add_argument(
        "--checks", action="store_true", help="list each run's non-ok checks below the table"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="compare every later run with the first (paired CI, McNemar p, verdict)",
    )
    from fortify.cli.cmd_compare import add_compare_options

    add_compare_options(parser)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="RUN... are the slices eval-<suite>.shard-I-of-N.json of one evaluation (or a "
        "folder holding them): check that they match, join them and write eval-<suite>.md/.json "
        "(and eval.md/.json) next to the slices, or into --merge-dir",
    )
    parser.add_argument("--merge-dir", default=None, help="--merge: folder for the joined report")


def run_label(p: Path) -> str:
    """A short name for a run directory or report file."""
    if p.is_dir():
        return p.name
    return p.parent.parent.name if p.parent.name == "reports" else p.stem


def find_report(run: Path, suite: str | None) -> Path:
    """The report file of a run directory (or the file itself)."""
    if run.is_file():
        return run
    name = f"eval-{suite}.json" if suite else "eval.json"
    for cand in (run / "reports" / name, run / name):
        if cand.is_file():
            return cand
    from fortify.errors import RunDirError

    raise RunDirError(f"no {name} in {run}/reports or {run}; run `fortify eval {run}` first")


def input_reports(runs: list[str], suite: str | None) -> list[Path]:
    """The report files that ``runs`` name (:func:`find_report`), those that exist."""
    from fortify.errors import RunDirError

    found = []
    for run in runs:
        try:
            found.append(find_report(Path(run), suite))
        except RunDirError:
            continue  # reported when the reports are read
    return found


def check_output_file(path: str, flag: str, reads: list[Path] | None = None) -> None:
    """Before any work: ``path`` must name a file (not a folder) whose folder exists or can be
    created and is writable, and not one of the files ``reads`` that the command reads
    (RunDirError naming ``flag`` otherwise)."""
    from fortify.errors import RunDirError
    from fortify.utils.atomic import check_writable_dir

    if Path(path).is_dir():
        raise RunDirError(f"{flag} {path!r} is a folder; give a file name (e.g. report.md)")
    target = Path(path).expanduser().resolve()
    if any(target == p.resolve() for p in reads or []):
        raise RunDirError(
            f"{flag} {path!r} is one of the reports this command reads; writing there would "
            "replace it: give another file name (e.g. comparison.md)"
        )
    check_writable_dir(Path(path).expanduser().parent, f"folder of {flag}")


def _merge(args: argparse.Namespace) -> int:
    from fortify.errors import RunDirError
    from fortify.evaluate.shard import finalize, load_partials, merge_partials

    paths: list[Path] = []
    for r in args.runs:
        p = Path(r)
        if p.is_dir():
            found = sorted(p.glob("eval-*.shard-*-of-*.json")) or sorted(
                p.glob("reports/eval-*.shard-*-of-*.json")
            )
            if not found:
                raise RunDirError(f"no slices eval-<suite>.shard-I-of-N.json in {p}")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise RunDirError(f"{p} does not exist; give the slices' .json files or their folder")
    report = finalize(merge_partials(load_partials(paths)))
    out_dir = Path(args.merge_dir) if args.merge_dir else paths[0].parent
    md, js = report.save(out_dir, stem=f"eval-{report.settings.get('suite')}")
    report.save(out_dir, stem="eval")
    print(report.to_markdown())
    print(f"joined {len(paths)} slices: wrote {md} and {js}")
    return 0 if report.ok else 1


def run(args: argparse.Namespace) -> int:
    from fortify.cli.cmd_compare import compare_columns
    from fortify.errors import ConfigError
    from fortify.evaluate import EvalReport, side_by_side
    from fortify.utils.atomic import atomic_write_text

    if args.merge:
        return _merge(args)

    columns = compare_columns(args)  # checked with or without --compare
    if args.out:
        check_output_file(args.out, "--out", input_reports(args.runs, args.suite))
    if args.compare and len(args.runs) < 2:
        raise ConfigError("--compare needs at least two runs (the first is the baseline)")
    reports = {}
    paths = {}
    for r in args.runs:
        p = Path(r)
        label = run_label(p)
        while label in reports:
            label += "'"
        reports[label] = EvalReport.load(find_report(p, args.suite))
        paths[label] = p
    for label, rep in reports.items():
        unknown = [c for c in columns or [] if c not in rep.columns]
        if unknown:
            raise ConfigError(
                f"--columns: {unknown} not in the report of {label}; its columns: "
                f"{', '.join(rep.columns)}"
            )
    text = side_by_side(reports)
    if args.checks:
        lines = []
        for label, rep in reports.items():
            for c in rep.checks:
                if c.status != "ok":
                    lines.append(f"- {label}: [{c.status}] {c.name}: {c.message}")
        text += "\n" + ("\n".join(lines) if lines else "All checks ok.") + "\n"
    if args.compare:
        from fortify.cli.cmd_compare import compare_paths

        labels = list(paths)
        for other in labels[1:]:
            comp = compare_paths(paths[labels[0]], paths[other], args, (labels[0], other))
            text += "\n" + comp.to_markdown()
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
    return 0

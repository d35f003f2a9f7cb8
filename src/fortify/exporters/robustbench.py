"""``fortify export robustbench RUN --out DIR --name NAME``: RobustBench's per-model layout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

NAME = "robustbench"
HELP = "weights + model_info JSON in RobustBench's layout (models/…/<name>.pt, model_info/…)"
DESCRIPTION = (
    "Write a fortify run or checkpoint as RobustBench keeps a model: OUT/models/<dataset>/<threat>/"
    "<name>.pt (the state dict of the plain nn.Module, normalisation and defences inside) and "
    "OUT/model_info/<dataset>/<threat>/<name>.json (RobustBench's fields plus a 'fortify' block "
    "that rebuilds the model: fortify import robustbench). clean_acc / autoattack_acc come from "
    "the run's latest AutoAttack evaluation report (eval-full or eval-autoattack) if there is one."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory or checkpoint (.safetensors)")
    parser.add_argument("--out", required=True, help="folder receiving models/ and model_info/")
    parser.add_argument("--name", required=True, help="model name, e.g. Me2026FSR_R18")
    parser.add_argument("--threat", default="Linf", choices=("Linf", "L2", "corruptions"))
    parser.add_argument("--tag", default="best", help="checkpoint tag in a run directory")
    parser.add_argument(
        "--report", default=None, help="evaluation report JSON for the accuracies (default: found)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export of the same --name (refused without it)",
    )


def _find_report(run: Path) -> Path | None:
    folder = run / "reports" if run.is_dir() else run.parent.parent / "reports"
    for stem in ("eval-full", "eval-autoattack"):
        if (folder / f"{stem}.json").is_file():
            return folder / f"{stem}.json"
    return None


def _existing_export(args: argparse.Namespace) -> list[Path]:
    """The files an export of ``args`` would replace (the dataset is read from the
    checkpoint's sidecar, without loading the weights)."""
    from fortify.interop.robustbench import paths
    from fortify.runs.checkpoint import read_sidecar, resolve_checkpoint

    meta = read_sidecar(resolve_checkpoint(args.run, args.tag))
    config = meta.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    dataset = data.get("name") if isinstance(data, dict) else None
    if not isinstance(dataset, str):
        return []  # the export itself reports the incomplete checkpoint
    return [p for p in paths(args.out, dataset, args.threat, args.name) if p.exists()]


def _read_report(path: Path) -> dict[str, Any]:
    """An evaluation report as a dict with a ``table`` of accuracies; ConfigError otherwise."""
    from fortify.errors import ConfigError

    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the report {path}: {exc}") from exc
    table = report.get("table") if isinstance(report, dict) else None
    if not isinstance(table, dict) or not table:
        got = (
            "an object without a 'table'"
            if isinstance(report, dict)
            else ("null" if report is None else f"a JSON {type(report).__name__}")
        )
        raise ConfigError(
            f"the report {path} is not an evaluation report with accuracies (it holds {got}); give "
            "the eval-<suite>.json that `fortify eval` wrote (a JSON object with a 'table')"
        )
    return report


def run(args: argparse.Namespace) -> int:
    from fortify.errors import ConfigError
    from fortify.interop.robustbench import export_robustbench
    from fortify.utils.atomic import check_writable_dir

    check_writable_dir(args.out, "export folder (--out)")
    report_path = Path(args.report) if args.report else _find_report(Path(args.run))
    report = _read_report(report_path) if report_path is not None else None
    existing = _existing_export(args)
    if existing and not args.overwrite:
        raise ConfigError(
            f"{existing[0]} already exists (an earlier export named {args.name!r}); pass "
            "--overwrite to replace it, or choose another --name or --out"
        )
    weights, info = export_robustbench(
        args.run, args.out, name=args.name, threat=args.threat, tag=args.tag, report=report
    )
    print(f"wrote {weights}")
    print(f"wrote {info}" + (f" (accuracies from {report_path})" if report_path else ""))
    return 0

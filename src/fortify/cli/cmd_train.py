"""``fortify train``: train a model from a config (standard, AT, TRADES, MART, FPD, +defences)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fortify.runs.rundir import Mode

DESCRIPTION = (
    "Train a model from an experiment config (YAML preset plus section.field=value overrides) "
    "into a run directory: checkpoints/last and best (selected on the validation split), "
    "metrics.jsonl, config.yaml. Resume an interrupted run with --resume RUN. Under "
    "`torchrun --nproc_per_node=N` the same command trains with DistributedDataParallel. "
    "Examples: fortify train --config configs/train/cpu/fmnist-at.yaml ; "
    "fortify train --config configs/train/cifar10/resnet18-at.yaml train.epochs=10 ; "
    "fortify train --resume runs/fmnist-at"
)


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        short = f"{value:.6g}"
        k = round(value * 255)
        if 0 < value < 1 and short != repr(value) and abs(value * 255 - k) < 1e-9:
            return f"{short} (={k}/255)"  # pixel budgets such as 8/255
        return short
    return str(value)


def config_fields_epilog() -> str:
    """The ``--help`` epilog: every config field with its type and built-in default."""
    from fortify.config import ExperimentConfig, describe_fields

    rows = [
        (name, _show(default), tp.replace("NoneType", "null"))
        for name, tp, default in describe_fields(ExperimentConfig)
    ]
    w_name = max(len(r[0]) for r in rows)
    w_value = max(len(r[1]) for r in rows)
    lines = [
        "config fields (override with SECTION.FIELD=VALUE, values parsed as YAML; the built-in "
        "default is shown, a --config preset changes some of them):",
        "",
    ]
    lines += [f"  {n:<{w_name}} = {v:<{w_value}}  [{t}]" for n, v, t in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = config_fields_epilog()
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help="YAML preset (see configs/train/); default: built-in defaults, or the run's "
        "config.yaml with --resume",
    )  # fmt: skip
    parser.add_argument(
        "--run-dir", metavar="DIR", default=None,
        help="run directory for a new run (default: runs/<config name>)",
    )  # fmt: skip
    parser.add_argument(
        "--resume", metavar="RUN", default=None,
        help="continue the run in RUN from its 'last' checkpoint (bit-identical on CPU with the "
        "same number of processes; another number continues with a warning)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="start over in an existing run directory (the old one is moved aside)",
    )  # fmt: skip
    parser.add_argument(
        "--force", action="store_true",
        help="with --resume: continue even though the config differs from the run's, or "
        "the number of processes changes the global batch (train.batch_size // N * N); another "
        "number of processes alone is allowed with a warning (not bit-identical)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="sets", metavar="SECTION.FIELD=VALUE", action="append", default=[],
        help="override a config field (repeatable), e.g. --set train.epochs=5",
    )  # fmt: skip
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (also off when not a TTY)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="SECTION.FIELD=VALUE",
        help="more overrides, same as --set",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from fortify.config import ExperimentConfig, load_config
    from fortify.errors import ConfigError
    from fortify.train import fit
    from fortify.utils.runtime import env_int

    overrides = list(args.sets) + list(args.overrides)
    for item in overrides:
        if "=" not in item:
            hint = ""
            if item.endswith((".yaml", ".yml")) or Path(item).is_file():
                hint = f"; to train from a preset file use --config {item}"
            raise ConfigError(f"override {item!r} must look like section.field=value{hint}")
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other; choose one")
    if args.resume and args.run_dir and Path(args.run_dir) != Path(args.resume):
        raise ConfigError("--resume RUN already names the run directory; drop --run-dir")
    if args.force and not args.resume:
        raise ConfigError("--force only applies to --resume")

    if args.resume:
        run_dir = Path(args.resume)
        source = args.config or run_dir / "config.yaml"
        if not Path(source).is_file():
            raise ConfigError(
                f"cannot resume {str(run_dir)!r}: no config.yaml there (is it a run directory?)"
            )
        cfg = load_config(ExperimentConfig, source, overrides)
        mode: Mode = "resume"
    else:
        cfg = load_config(ExperimentConfig, args.config, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
        mode = "overwrite" if args.overwrite else "new"

    result = fit(cfg, run_dir, mode=mode, progress=not args.no_progress, force=args.force)
    if env_int("RANK", 0) == 0:
        last = result.history[-1] if result.history else {}
        print(f"run: {result.run_dir}")
        print(f"epochs trained now: {result.epochs_run} (of {cfg.train.epochs})")
        for key in ("val/clean", "val/robust"):
            if key in last:
                print(f"last epoch {key}: {last[key]:.4f}")
        if result.best_epoch is not None:
            metric = "n/a" if result.best_metric is None else f"{result.best_metric:.4f}"
            best = f"epoch {result.best_epoch} of {cfg.train.epochs}"
            print(f"best checkpoint: {best} ({cfg.train.select}: {metric})")
    return 0

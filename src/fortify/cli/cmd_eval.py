"""``fortify eval TARGET``: evaluate a run or checkpoint with an attack suite and checks."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fortify.data import DataSplits

DESCRIPTION = (
    "Evaluate a trained model (a run directory or a checkpoint file) with an attack suite: "
    "paper (Natural, FGSM, PGD-20, PGD-100, C&W, Ensemble), autoattack (pyautoattack, standard), "
    "quick (PGD-20), full (paper + autoattack) or a registered suite. Honest-evaluation checks "
    "(ε-ball, robust ≤ clean, gradient-masking indicators) run by default and are printed with "
    "the table. Reports go to <run>/reports/eval-<suite>.md/.json. A column on fewer points "
    "than the table says (n=k); unattacked points are never counted. Exit status: 0 = reliable; "
    "1 = a check failed; 3 = a gradient-masking check warned, so the robust accuracies are not "
    "trustworthy (--allow-unreliable turns 3 into 0); 2 = bad input. Under torchrun the chunks "
    "of points are split over the ranks and rank 0 writes the report; --shard i/n evaluates one "
    "slice (job arrays), joined by `fortify report --merge`. See docs/scaling.md."
)

EXIT_CHECK_FAILED = 1
EXIT_UNRELIABLE = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="TARGET",
        nargs="?",
        help="run directory or checkpoint file (.safetensors); or use --model",
    )
    from fortify.cli._source import add_source_arguments

    add_source_arguments(parser)
    parser.add_argument(
        "--tag", default="best", help="checkpoint tag when TARGET is a run directory"
    )
    parser.add_argument(
        "--suite", default="paper", help="paper | autoattack | quick | full | a registered suite"
    )
    parser.add_argument(
        "--eps",
        type=float,
        default=None,
        help="budget in pixel units; default: the dataset's (e.g. 8/255)",
    )
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf", help="threat model")
    parser.add_argument(
        "--n-points", type=int, default=1000, help="evaluate the first N points of the split"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="points per attack batch")
    parser.add_argument(
        "--aa-points",
        type=int,
        default=None,
        metavar="N",
        help="suites autoattack/full/adaptive: run AutoAttack on the first N points only (the "
        "AutoAttack column and every worst case containing it count only those N, and say so); "
        "default: every point",
    )
    parser.add_argument(
        "--aa-scope",
        choices=("all", "robust"),
        default=None,
        help="suite full: 'robust' runs AutoAttack only on the points every paper attack left "
        "unbroken (same worst case, AutoAttack column marked not computed); default: all",
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="evaluate slice I of N (0 <= I < N) and write eval-<suite>.shard-I-of-N.json; "
        "join the N slices with `fortify report --merge`",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for random starts, Square and AutoAttack"
    )
    parser.add_argument(
        "--mode",
        choices=("final", "best", "both"),
        default="final",
        help="final: last PGD iterate; best: broken once any iterate fools; both: two rows",
    )
    parser.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    parser.add_argument(
        "--allow-unreliable",
        action="store_true",
        help=f"exit 0 instead of {EXIT_UNRELIABLE} when a gradient-masking check warns (the "
        "report still says UNRELIABLE)",
    )
    parser.add_argument(
        "--split", choices=("test", "val"), default="test", help="which split to evaluate on"
    )
    parser.add_argument("--plot", action="store_true", help="also write robust accuracy vs ε (PNG)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", default=None, help="report folder (unset: <run>/reports)")
    parser.add_argument(
        "--data-root", default=None, help="override the dataset root stored in the run's config"
    )


def _report_dir(target: Path, out: str | None) -> Path:
    if out:
        return Path(out)
    if target.is_dir():
        return target / "reports"
    if target.parent.name == "checkpoints":
        return target.parent.parent / "reports"
    return target.parent / "reports"


def check_data_matches_checkpoint(meta: dict[str, Any], splits: DataSplits, target: Path) -> None:
    """Refuse data whose image shape or class count differs from what the model was built for."""
    from fortify.errors import DataError

    want_shape = [int(v) for v in meta.get("image_shape") or []]
    got_shape = list(splits.image_shape)
    if want_shape and want_shape != got_shape:
        raise DataError(
            f"{target} was trained on images of shape (C, H, W) = {tuple(want_shape)}, but "
            f"dataset {splits.name!r} gives {tuple(got_shape)}; evaluate it on data with the "
            "same channel count and image size (check --data-root)"
        )
    k = meta.get("num_classes")
    if k is not None and int(k) != splits.num_classes:
        raise DataError(
            f"{target} has {k} output classes but dataset {splits.name!r} has "
            f"{splits.num_classes}; labels would be out of range for the model"
        )


def run(args: argparse.Namespace) -> int:
    from fortify.cli._source import check_source_args, source_target
    from fortify.errors import ConfigError, RunDirError
    from fortify.evaluate.shard import Shard
    from fortify.train import distributed
    from fortify.utils.atomic import check_writable_dir

    target = None
    if args.model is None:
        if args.target is None:
            raise ConfigError("give TARGET (a run or checkpoint) or --model SOURCE --dataset NAME")
        target = Path(args.target)
        if not target.exists():
            raise RunDirError(
                f"{target} does not exist; TARGET must be a run directory or a checkpoint file"
            )
    else:
        check_source_args(args)
    check_eval_args(args)
    shard = Shard.parse(args.shard) if args.shard is not None else None
    if shard is not None and args.plot:
        raise ConfigError("--plot cannot be combined with --shard (plot from the merged report)")
    # The report folder is checked (and a run directory locked) before anything is computed;
    # it is created only when the report is written.
    lock = None
    if target is not None:
        out_dir = check_writable_dir(_report_dir(target, args.out), "report folder (--out)")
        lock = _lock_run_for_reports(target, out_dir)
    else:  # --model: next to --weights, else runs/<model>/reports
        source = source_target(args)
        default = _report_dir(source, None) if args.weights is not None else source / "reports"
        out_dir = check_writable_dir(args.out or default, "report folder (--out)")
    info = distributed.setup(args.device)
    try:
        if info.distributed and shard is not None:
            raise ConfigError(
                "--shard cannot be used under torchrun: the ranks already split the points; use "
                "--shard only for separate processes (job arrays)"
            )
        return _evaluate(args, target, info, out_dir, shard)
    finally:
        distributed.finish(info)
        distributed.teardown(info)
        if lock is not None:
            lock.close()


def check_eval_args(args: argparse.Namespace) -> None:
    """Refuse bad ``fortify eval`` options before any file is read."""
    from fortify.config.schema import check_eval_numbers
    from fortify.errors import ConfigError
    from fortify.evaluate import get_suite
    from fortify.runs.rundir import check_tag

    flags = {"autoattack_points": "--aa-points"}
    check_eval_numbers(
        args.n_points, args.batch_size, args.seed, args.aa_points,
        lambda f: flags.get(f, "--" + f.replace("_", "-")),
    )  # fmt: skip
    check_tag(args.tag)
    get_suite(args.suite)  # an unknown suite fails before the model and data are loaded
    if args.eps is not None and not (math.isfinite(args.eps) and args.eps > 0):
        raise ConfigError(f"--eps must be a positive number in pixel units, got {args.eps}")
    if args.eps is not None and args.norm == "linf" and args.eps > 1:
        raise ConfigError(
            f"--eps must be in (0, 1] for --norm linf (pixel units: 8/255 is 0.0314), got "
            f"{args.eps}"
        )
    if args.eps is None and args.norm == "l2":
        raise ConfigError("--norm l2 needs an explicit --eps (the dataset default is an L∞ budget)")


def _lock_run_for_reports(target: Path, out_dir: Path) -> Any:
    """Lock the run directory the reports go into (None when they go elsewhere)."""
    from fortify.runs import RunDir

    run_path = target if target.is_dir() else None
    if run_path is None and target.parent.name == "checkpoints":
        run_path = target.parent.parent
    if run_path is None or not (run_path / "config.yaml").is_file():
        return None
    try:
        out_dir.resolve().relative_to(run_path.resolve())
    except ValueError:
        return None  # the reports go elsewhere: reading checkpoints needs no lock
    return RunDir.lock(run_path)


def _evaluate(
    args: argparse.Namespace, target: Path | None, info: Any, out_dir: Path, shard: Any
) -> int:
    from fortify.cli._source import load_source_target
    from fortify.data import load_from_config
    from fortify.errors import ConfigError
    from fortify.evaluate import eps_curve, evaluate, plot_eps_curve
    from fortify.evaluate.estimate import log_suite_estimate
    from fortify.evaluate.plot import default_eps_values, model_label
    from fortify.runs import load_model

    device = info.device
    if args.model is not None:  # a model that is not a fortify run
        model, meta, target = load_source_target(args, device)
    else:
        assert target is not None
        model, meta = load_model(target, tag=args.tag, device=device)
    data_cfg = (meta.get("config") or {}).get("data") or {}
    name = data_cfg.get("name")
    if not name:
        raise ConfigError(
            f"checkpoint {target} has no data.name in its config; cannot tell which dataset to load"
        )
    splits = load_from_config(data_cfg, args.data_root, subsets=False)
    check_data_matches_checkpoint(meta, splits, target)
    imageset = splits.test if args.split == "test" else splits.val
    eps = args.eps if args.eps is not None else splits.default_eps
    x, y = imageset.head(args.n_points).floats()
    suite_options: dict[str, Any] = {}
    if args.aa_points is not None:
        suite_options["autoattack_points"] = args.aa_points
    if args.aa_scope is not None:
        suite_options["autoattack_scope"] = args.aa_scope
    if args.suite == "ood":  # lets the suite find a published corrupted set (CIFAR-10-C, ...)
        suite_options.update(
            dataset=name,
            root=args.data_root or data_cfg.get("root"),
            classes=splits.classes,
            label=args.target or args.model,
        )
    if info.is_main:
        share = len(x) if shard is None else max(1, len(x) // shard.count)
        log_suite_estimate(
            model,
            x[:share],
            args.suite,
            aa_points=args.aa_points,
            check_points=0 if args.no_checks else 200,
        )
    report = evaluate(
        model,
        x,
        y,
        suite=args.suite,
        eps=eps,
        norm=args.norm,
        batch_size=args.batch_size,
        seed=args.seed,
        mode=args.mode,
        checks=not args.no_checks,
        device=device,
        suite_options=suite_options,
        shard=shard,
        distributed=info.distributed,
        settings={
            "target": str(target),
            "tag": args.tag,
            "dataset": name,
            "split": args.split,
            "eps_source": "--eps" if args.eps is not None else "dataset default",
            **({"model_source": args.model, "weights": args.weights} if args.model else {}),
        },
    )
    if shard is not None:
        stem = f"eval-{args.suite}.shard-{shard.index}-of-{shard.count}"
        md, js = report.save(out_dir, stem=stem)
        pattern = out_dir / f"eval-{args.suite}.shard-*-of-{shard.count}.json"
        print(f"slice {shard} of the evaluation: wrote {js}; join all {shard.count} slices with")
        print(f"  fortify report --merge {pattern}")
        return 0
    if not info.is_main:
        return 0 if report.ok else 1
    md, js = report.save(out_dir, stem=f"eval-{args.suite}")
    report.save(out_dir, stem="eval")  # the latest evaluation, read by `fortify report`
    print(report.to_markdown())
    print(f"wrote {md} and {js}")
    if args.plot:
        m = min(len(x), 200)
        curve = eps_curve(
            model,
            x[:m],
            y[:m],
            default_eps_values(eps, args.norm, x[0].numel()),
            norm=args.norm,
            batch_size=args.batch_size,
        )
        label = model_label(meta.get("config"), args.model or str(target.name))
        if label != target.name and args.model is None:
            label = f"{label} ({target.name})"
        png = plot_eps_curve(
            {label: [(0.0, report.table()[report.modes[0]]["Natural"]), *curve]},
            out_dir / "eps_curve.png",
            norm=args.norm,
            mark_eps=eps,
            mark_label=f"evaluated ε = {eps:g}",
            title=f"{name}, {m} {args.split} points: PGD-20 (CE, step ε/8) accuracy vs ε",
        )
        print(f"wrote {png}")
    return exit_status(report, allow_unreliable=args.allow_unreliable)


def exit_status(report: Any, *, allow_unreliable: bool = False) -> int:
    """0 reliable, 1 a check failed, 3 a masking check warned (0 with ``allow_unreliable``)."""
    if any(c.status == "fail" for c in report.checks):
        return EXIT_CHECK_FAILED
    if not report.reliable:
        import sys

        print(
            "fortify eval: the report is UNRELIABLE (gradient masking suspected: "
            + ", ".join(dict.fromkeys(report.unreliable_reasons))
            + f"); exit status {0 if allow_unreliable else EXIT_UNRELIABLE}",
            file=sys.stderr,
        )
        return 0 if allow_unreliable else EXIT_UNRELIABLE
    return 0

"""``fortify rift {mrc,finetune,interpolate,run} RUN``: robust critical fine-tuning of an AT run."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from fortify.cli._help import HelpFormatter

if TYPE_CHECKING:
    from fortify.rift.config import RiftConfig

NAME = "rift"
HELP = "robust critical fine-tuning: mrc, finetune, interpolate, run"
DESCRIPTION = (
    "RiFT (Zhu et al., ICCV 2023) on an adversarially trained run: score every module's robust "
    "criticality (MRC) on a fixed adversarial VALIDATION set, fine-tune the least critical "
    "middle module on clean data, interpolate with the AT weights and pick α on validation; "
    "the final model is evaluated on TEST (PGD-10, paper suite, AutoAttack, OOD). Outputs go to "
    "RUN/rift/<step>/; finished steps are skipped on rerun (--force redoes them)."
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory of the adversarially trained model")
    p.add_argument(
        "--config",
        default=None,
        help="RiFT options YAML, e.g. configs/rift/default.yaml (default: built-in options)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a RiFT option, e.g. --set mrc.passes=5 (repeatable; default: none)",
    )
    p.add_argument("--tag", default=None, help="checkpoint tag of the AT run (default: best)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/rift)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument(
        "--force",
        action="store_true",
        help="redo steps even if marked done (default: reuse a finished step)",
    )


def _mrc_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MRC")
    g.add_argument("--eps", type=float, default=None, help="radius relative to ‖W‖ (default: 0.1)")
    g.add_argument(
        "--passes", type=int, default=None, help="ascent passes over the set (default: 10)"
    )
    g.add_argument(
        "--lr", dest="mrc_lr", type=float, default=None, help="ascent step (default: 1.0)"
    )
    g.add_argument(
        "--batch-size",
        dest="mrc_batch",
        type=int,
        default=None,
        help="ascent batch size (default: 512)",
    )
    g.add_argument(
        "--variant",
        choices=["max", "first-projection"],
        default=None,
        help="max over passes (release) or stop at the first projection (paper) (default: max)",
    )
    g.add_argument(
        "--points",
        dest="mrc_points",
        type=int,
        default=None,
        help="validation images in the adversarial set, capped by the split (default: 10000)",
    )
    g.add_argument(
        "--attack-eps",
        type=float,
        default=None,
        help="L∞ ε of the PGD-10 set (default: the run's training ε)",
    )


def _ft_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--module", default=None, help="module to fine-tune, or auto (default: auto)")
    g.add_argument(
        "--bn",
        choices=["adapt", "frozen"],
        default=None,
        help="BatchNorm statistics adapting to clean data (the release) or frozen (default: adapt)",
    )
    g.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: 10)")
    g.add_argument("--ft-lr", type=float, default=None, help="SGD lr (default: 0.001)")
    g.add_argument(
        "--ft-batch-size", type=int, default=None, help="fine-tuning batch size (default: 128)"
    )


def _interp_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("interpolation")
    g.add_argument("--alpha-step", type=float, default=None, help="α grid step (default: 0.1)")
    g.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="allowed robust-accuracy loss vs AT, points (default: 0.1)",
    )
    g.add_argument(
        "--alpha-rule",
        choices=["paired", "fixed"],
        default=None,
        help="α* rule: paired = CIs over the validation points, fixed = the paper's "
        "0.1-point gap on estimates (default: paired)",
    )
    g.add_argument("--val-points", type=int, default=None, help="validation images (default: 2000)")
    g.add_argument("--test-points", type=int, default=None, help="test images (default: 1000)")
    g.add_argument(
        "--suites",
        default=None,
        help="comma-separated TEST suites (default: pgd10,paper,autoattack,ood)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="step", metavar="STEP", required=True)
    specs = {
        "mrc": ("module robust criticality of every Conv2d/Linear weight", [_mrc_opts]),
        "finetune": ("fine-tune one module's weight on clean data", [_mrc_opts, _ft_opts]),
        "interpolate": (
            "α grid on validation, α* by the paired rule, evaluation on test",
            [_mrc_opts, _ft_opts, _interp_opts],
        ),
        "run": ("all steps, resumable", [_mrc_opts, _ft_opts, _interp_opts]),
    }
    for name, (help_text, groups) in specs.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=HelpFormatter,
        )
        _common(p)
        for g in groups:
            g(p)


_MAP = {
    "eps": "mrc.eps",
    "passes": "mrc.passes",
    "mrc_lr": "mrc.lr",
    "mrc_batch": "mrc.batch_size",
    "variant": "mrc.variant",
    "mrc_points": "mrc.n_points",
    "attack_eps": "mrc.attack_eps",
    "module": "module",
    "bn": "finetune.bn",
    "epochs": "finetune.epochs",
    "ft_lr": "finetune.lr",
    "ft_batch_size": "finetune.batch_size",
    "alpha_step": "interpolate.step",
    "tolerance": "interpolate.tolerance",
    "alpha_rule": "interpolate.rule",
    "val_points": "interpolate.n_points",
    "test_points": "evaluate.n_points",
    "tag": "tag",
    "device": "device",
}


def build_config(args: argparse.Namespace) -> RiftConfig:
    """The RiftConfig from --config, --set and the explicit flags (flags win)."""
    import json

    from fortify.rift.config import load_rift_config

    overrides = list(args.overrides)
    for attr, key in _MAP.items():
        v = getattr(args, attr, None)
        if v is not None:
            overrides.append(f"{key}={json.dumps(v)}")  # JSON is valid YAML
    suites = getattr(args, "suites", None)
    if suites is not None:  # "" or ",,": no suite, refused by the config's validation
        names = [s.strip() for s in suites.split(",") if s.strip()]
        overrides.append(f"evaluate.suites={json.dumps(names)}")
    return load_rift_config(args.config, overrides)  # every step's options checked here


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fortify.errors import RunDirError
    from fortify.rift.evaluation import summary_markdown
    from fortify.rift.pipeline import RiftRun
    from fortify.utils.atomic import check_writable_dir

    cfg = build_config(args)
    if not Path(args.run).is_dir():
        raise RunDirError(
            f"no run directory at {args.run!r}: RUN must be the folder of an adversarially "
            "trained run (e.g. runs/fmnist-at from fortify train --config "
            "configs/train/cpu/fmnist-at.yaml)"
        )
    if args.out:
        check_writable_dir(args.out, "output folder (--out)")
    rr = RiftRun(args.run, cfg, out=args.out)
    if args.step == "mrc":
        report = rr.mrc(force=args.force)
        print(report.table())
        print(f"\nwritten: {rr.step_dir('mrc')}/mrc.json, mrc.md, mrc.png")
    elif args.step == "finetune":
        if cfg.module == "auto":
            name, reason = rr.choose(rr.mrc())
            print(reason)
        _, summary = rr.finetune(force=args.force)
        print(
            f"fine-tuned {summary['module']}.weight; best validation clean accuracy "
            f"{summary['best_val_clean']} at epoch {summary['best_epoch']}; changed tensors: "
            f"{len(summary['changed_tensors'])}"
        )
    elif args.step == "interpolate":
        grid = rr.interpolate(force=args.force)
        _print_grid(grid)
        summary = rr.evaluate(force=args.force)
        print(summary_markdown(summary))
    else:
        summary = rr.run_all(force=args.force)
        _print_grid(rr.interpolate())
        print(summary_markdown(summary))
    return 0


def _print_grid(grid: dict[str, Any]) -> None:
    print("| α | clean (val) | PGD-10 (val) |\n|---:|---:|---:|")
    for p in grid["points"]:
        mark = " ←" if p["alpha"] == grid["chosen"]["alpha"] else ""
        print(f"| {p['alpha']:.2f} | {p['clean']:.2f} | {p['robust']:.2f}{mark} |")
    print(grid["reason"])

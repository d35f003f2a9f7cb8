"""``fortify import model --model SOURCE [--weights FILE] --dataset NAME --out RUN``: any model
(a backbone or a torchvision/timm/RobustBench/user-code source) as a fortify run, so every
command that takes a run — ``fortify rift``, ``fortify eval``, ``fortify analyze``,
``fortify train --resume``-free fine-tuning via configs — works on it."""

from __future__ import annotations

import argparse

NAME = "model"
HELP = "any model source (+ optional weights file) as a fortify run, e.g. for fortify rift"
DESCRIPTION = (
    "Write a run directory (config.yaml + checkpoints/best) for --model SOURCE on --dataset: a "
    "registered backbone or torchvision:<name> | timm:<name> | robustbench:<dataset>/<threat>/"
    "<model> | python:<module>:<callable>, with --weights FILE (.safetensors or a .pth state "
    "dict) or the source's own weights. `fortify rift run OUT` then fine-tunes it, "
    "`fortify eval OUT` evaluates it."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fortify.cli._source import add_source_arguments

    add_source_arguments(parser)
    parser.add_argument("--data-root", default=None, help="dataset folder (default: usual places)")
    parser.add_argument("--out", required=True, help="run directory to create")
    parser.add_argument(
        "--eps",
        type=float,
        default=None,
        help="the model's L∞ training budget in pixel units, recorded as train.attack.eps "
        "(RiFT's default attack budget); default: the dataset's",
    )
    parser.add_argument("--device", default="cpu", help="device used to check the model")
    parser.add_argument(
        "--overwrite", action="store_true", help="move an existing OUT folder aside (never deletes)"
    )


def run(args: argparse.Namespace) -> int:
    from fortify.cli._source import build_source_model
    from fortify.data import load_from_config
    from fortify.errors import ConfigError
    from fortify.runs import RunDir, save_checkpoint

    if not args.model or not args.dataset:
        raise ConfigError("fortify import model needs --model SOURCE and --dataset NAME")
    data = {"name": args.dataset, "root": args.data_root}
    splits = load_from_config(data, subsets=False)
    model, meta = build_source_model(args, splits.num_classes, tuple(splits.image_shape), data)
    cfg = meta["config"]
    cfg["name"] = f"import-{cfg['name']}"
    eps = args.eps if args.eps is not None else splits.default_eps
    if not 0 < eps <= 1:
        raise ConfigError(f"--eps must be in (0, 1] (pixel units), got {eps}")
    cfg["train"]["attack"]["eps"] = eps
    cfg["train"]["attack"]["step_size"] = eps / 4
    run_dir = RunDir.open(args.out, mode="overwrite" if args.overwrite else "new", config=cfg)
    target = run_dir.checkpoint_path("best")
    save_checkpoint(target, model, {**meta, "config": cfg, "tag": "best"})
    run_dir.set_state("finished")
    print(f"wrote {target}")
    return 0

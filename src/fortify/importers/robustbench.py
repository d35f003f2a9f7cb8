"""``fortify import robustbench ROOT --name NAME --dataset D --out RUN``: back from RobustBench's
layout (as written by ``fortify export robustbench``) into a fortify run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "robustbench"
HELP = "a model exported in RobustBench's layout by `fortify export robustbench`"
DESCRIPTION = (
    "Rebuild a model from ROOT/models/<dataset>/<threat>/<name>.pt and ROOT/model_info/<dataset>/"
    "<threat>/<name>.json (the 'fortify' block written by `fortify export robustbench`; the "
    "weights' SHA-256 is checked) and write it as a fortify run (checkpoints/best). RobustBench "
    "zoo models need no import: use the model source robustbench:<dataset>/<threat>/<model>."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="folder holding models/ and model_info/")
    parser.add_argument("--name", required=True, help="the model's name")
    parser.add_argument("--dataset", required=True, help="e.g. cifar10")
    parser.add_argument("--threat", default="Linf", choices=("Linf", "L2", "corruptions"))
    parser.add_argument("--out", required=True, help="run directory to create")
    parser.add_argument(
        "--overwrite", action="store_true", help="move an existing OUT folder aside (never deletes)"
    )


def run(args: argparse.Namespace) -> int:
    from fortify.interop.robustbench import load_robustbench_export
    from fortify.runs import RunDir, save_checkpoint

    model, record = load_robustbench_export(
        args.root, name=args.name, dataset=args.dataset, threat=args.threat
    )
    block = record["fortify"]
    run_dir = RunDir.open(
        args.out, mode="overwrite" if args.overwrite else "new", config=block["config"]
    )
    target = run_dir.checkpoint_path("best")
    meta = {
        "config": block["config"],
        "num_classes": block["num_classes"],
        "image_shape": block["image_shape"],
        "tag": "best",
        "source": {"kind": NAME, "root": str(Path(args.root).resolve()), "name": args.name},
    }
    save_checkpoint(target, model, meta)
    run_dir.set_state("finished")
    print(f"wrote {target}")
    return 0

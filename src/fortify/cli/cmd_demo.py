"""fortify demo: the main job in miniature (≤ 3 minutes on 2 CPU cores).

Adversarially trains a small CNN twice on Fashion-MNIST — plain PGD-AT and PGD-AT + FSR —
selects each one's best epoch on the validation split, evaluates both on test points with the
FSR paper's attack suite plus the honest-evaluation checks, prints the side-by-side table and
writes a robust-accuracy-vs-ε plot into the run directory. Falls back to scikit-learn's bundled
8×8 digits (and says so) when Fashion-MNIST is not installed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DESCRIPTION = __doc__

#: The demo's experiment, as a config dict (any field can be overridden with --set).
DEMO_CONFIG: dict = {
    "name": "demo",
    "seed": 0,
    "data": {"name": "fashion-mnist", "val_size": 2000, "train_subset": 5000},
    "model": {"name": "small-cnn", "kwargs": {"width": 16}},
    "train": {
        "objective": "at",
        "epochs": 3,
        "batch_size": 128,
        "optimizer": "sgd",
        "lr": 0.05,
        "weight_decay": 5e-4,
        "schedule": "cosine",
        "milestones": [],
        "precision": "bf16",
        "channels_last": True,
        "attack": {"eps": 0.1, "step_size": 0.04, "steps": 4, "random_start": True},
        "val_points": 500,
        "select": "robust",
    },
    "eval": {"suite": "paper", "n_points": 300, "batch_size": 300},
}

DIGITS_OVERRIDES: dict = {
    "data": {"name": "digits", "val_size": 300, "train_subset": None},
    "train": {"epochs": 8, "batch_size": 64, "val_points": 300},
    "eval": {"n_points": 359},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="where the two demo runs go")
    parser.add_argument(
        "--dataset",
        choices=["auto", "fashion-mnist", "digits"],
        default="auto",
        help="auto: Fashion-MNIST when installed, else the bundled digits",
    )
    parser.add_argument("--no-fsr", action="store_true", help="train only the plain AT model")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, e.g. --set train.epochs=1",
    )


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _pick_dataset(choice: str) -> str:
    from fortify.data import load_dataset
    from fortify.errors import DataError

    if choice != "auto":
        return choice
    try:
        load_dataset("fashion-mnist", val_size=0)
        return "fashion-mnist"
    except DataError as exc:
        print(
            "Fashion-MNIST is not installed here, so the demo uses scikit-learn's bundled 8×8 "
            "digits instead.\n  (install it with `apt-get install dataset-fashion-mnist`, or "
            f"pass --data-root)\n  reason: {str(exc).splitlines()[0]}"
        )
        return "digits"


def run(args: argparse.Namespace) -> int:
    from fortify.config import ExperimentConfig, apply_overrides, from_dict
    from fortify.config.schema import DefenseConfig
    from fortify.data import load_dataset
    from fortify.evaluate import (
        eps_curve,
        eval_config_options,
        evaluate_split,
        plot_eps_curve,
        side_by_side,
    )
    from fortify.runs import load_model
    from fortify.train import fit
    from fortify.utils.runtime import seed_everything

    t0 = time.perf_counter()
    dataset = _pick_dataset(args.dataset)
    data = _merge(DEMO_CONFIG, DIGITS_OVERRIDES) if dataset == "digits" else dict(DEMO_CONFIG)
    data = apply_overrides(_merge(data, {}), list(args.overrides))
    base = from_dict(ExperimentConfig, data)
    splits = load_dataset(
        base.data.name,
        base.data.root,
        val_size=base.data.val_size,
        split_seed=base.data.split_seed,
        train_subset=base.data.train_subset,
        test_subset=base.data.test_subset,
    )
    eps = base.train.attack.eps
    print(
        f"fortify demo: {splits.name} ({len(splits.train)} train / {len(splits.val)} validation / "
        f"{len(splits.test)} test images), {base.model.name}, PGD-{base.train.attack.steps} AT "
        f"at L∞ ε = {eps:g}, {base.train.epochs} epochs"
    )
    variants = {"AT": []} if args.no_fsr else {"AT": [], "AT+FSR": [DefenseConfig(kind="fsr")]}
    root = Path(args.run_dir)
    reports = {}
    curves = {}
    for label, defenses in variants.items():
        cfg = from_dict(ExperimentConfig, _merge(data, {"name": f"demo-{label.lower()}"}))
        cfg.defenses = defenses
        run_dir = root / label.lower().replace("+", "-")
        mode = "overwrite" if run_dir.exists() else "new"
        print(f"\n[{label}] training into {run_dir} ...")
        seed_everything(cfg.seed)
        result = fit(cfg, run_dir, mode=mode, splits=splits)
        if result.best_epoch is not None and result.best_metric is not None:
            print(
                f"[{label}] best epoch: {result.best_epoch} of {cfg.train.epochs}, chosen on "
                f"validation robust accuracy ({100 * result.best_metric:.1f}%), never on test"
            )
        model, _meta = load_model(run_dir, tag="best")
        report = evaluate_split(
            model,
            splits.test,
            cfg.eval.n_points,
            eps=eps,
            suite=cfg.eval.suite,
            batch_size=cfg.eval.batch_size,
            seed=cfg.eval.seed,
            suite_options=eval_config_options(cfg.eval),
            check_points=100,
            square_queries=300,
        )
        report.save(run_dir / "reports")
        reports[label] = report
        sweep = report.extras.get("eps_sweep", {}).get("curve")
        if sweep:
            curves[label] = [tuple(p) for p in sweep]
        else:
            x, y = splits.test.head(200).floats()
            curves[label] = eps_curve(model, x, y, [eps / 2, eps, 2 * eps, 4 * eps])
    table = side_by_side(reports)
    for label, report in reports.items():
        print(f"\n## {label}\n{report.to_markdown()}")
    print("\n## Side by side (test split, accuracy %)\n" + table)
    (root / "demo.md").write_text(table)
    plot = plot_eps_curve(
        curves,
        root / "robust_vs_eps.png",
        title=f"{splits.name}: robust accuracy vs ε",
        mark_eps=eps,
    )
    print(
        f"plot: {plot}\nreports: {root}/*/reports/eval.md\ntime: {time.perf_counter() - t0:.0f} s"
    )
    return 0

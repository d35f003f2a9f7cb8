"""fortify demo: the main job in miniature (≤ 3 minutes on 2 quiet CPU cores).

Adversarially trains a small CNN twice on Fashion-MNIST — plain PGD-AT and PGD-AT + FSR, the
FSR block sized like the paper's relative to its backbone — selects each one's best epoch on
the validation split, evaluates both on the same test points with the FSR paper's attack suite
plus the honest-evaluation checks, and prints:

* the side-by-side table with each row's cost (parameters, FLOPs),
* the paired difference AT+FSR − AT per column with its 95 % bootstrap confidence interval, the
  exact McNemar p-value and a verdict that follows from the interval alone,
* two figures in the run directory: accuracy per attack with 95 % intervals, and accuracy vs ε
  on exactly the table's points with the training ε marked.

Falls back to scikit-learn's bundled 8×8 digits (and says so) when Fashion-MNIST is not
installed.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fortify.errors import ConfigError
from fortify.utils.shapes import as_chw

if TYPE_CHECKING:
    from fortify.runs.rundir import Mode

DESCRIPTION = __doc__

#: The demo's experiment, as a config dict (any field can be overridden with --set).
#: 24,000 images × 2 epochs of PGD-3 AT (bf16 + channels-last) reach ≈ 75 % clean accuracy on
#: Fashion-MNIST at ε = 0.1 in about a minute per model on 2 cores; see docs/quickstart.md.
DEMO_CONFIG: dict[str, Any] = {
    "name": "demo",
    "seed": 0,
    "data": {"name": "fashion-mnist", "val_size": 2000, "train_subset": 24000},
    "model": {"name": "small-cnn", "kwargs": {"width": 16}},
    "train": {
        "objective": "at",
        "epochs": 2,
        "batch_size": 128,
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 5e-4,
        "schedule": "cosine",
        "milestones": [],
        "precision": "bf16",
        "channels_last": True,
        "attack": {"eps": 0.1, "step_size": 0.05, "steps": 3, "random_start": True},
        "val_points": 500,
        "val_attack_steps": 10,
        "select": "robust",
    },
    "eval": {"suite": "paper", "n_points": 300, "batch_size": 300},
}

DIGITS_OVERRIDES: dict[str, Any] = {
    "data": {"name": "digits", "val_size": 300, "train_subset": None},
    "train": {"epochs": 8, "batch_size": 64, "val_points": 300},
    "eval": {"n_points": 359},
}

#: FSR's hidden width relative to the channels it defends. The paper's block (ResNet-18,
#: layer4: 512 channels, hidden 64) adds 11 % parameters; on the demo's 4-conv CNN the same
#: 1/8 ratio would add ≈ 30 %, so the demo uses 1/16 (≈ +15 % parameters, ≈ +3 % FLOPs).
FSR_HIDDEN_FRACTION = 1 / 16
#: Multiples of the training ε at which the ε-curve is drawn (plus ε = 0: clean accuracy).
CURVE_FACTORS = (0.5, 1.0, 2.0)
BOOTSTRAP_RESAMPLES = 2000


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


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _pick_dataset(choice: str, root: str | None = None) -> str:
    """``choice``, or for ``auto`` Fashion-MNIST when it is found (under ``root`` when given),
    else the bundled digits. An explicit ``root`` means Fashion-MNIST: if it is not there that
    is an error, not a fallback (digits take no data root)."""
    from fortify.data import load_dataset
    from fortify.errors import DataError

    if choice != "auto":
        return choice
    try:
        load_dataset("fashion-mnist", root, val_size=0)
        return "fashion-mnist"
    except DataError as exc:
        if root is not None:
            raise DataError(
                f"{exc}\n(the demo falls back to the bundled digits only without a data root; "
                "fix data.root, or drop it)"
            ) from exc
        print(
            "Fashion-MNIST is not installed here, so the demo uses scikit-learn's bundled 8×8 "
            "digits instead.\n  (install it with `apt-get install dataset-fashion-mnist`, or "
            f"pass --set data.root=DIR)\n  reason: {str(exc).splitlines()[0]}"
        )
        return "digits"


def fsr_hidden_for(cfg: Any, image_shape: tuple[int, int, int], num_classes: int) -> int:
    """FSR hidden width for the demo's backbone: ``FSR_HIDDEN_FRACTION`` of the channels at the
    backbone's FSR position (at least 1)."""
    from fortify.defenses.attach import infer_feature_shapes
    from fortify.models import create, spec

    backbone = create(
        cfg.model.name, num_classes=num_classes, in_channels=image_shape[0], **cfg.model.kwargs
    )
    where = spec(cfg.model.name).fsr_position
    if where is None:
        raise ConfigError(f"model {cfg.model.name!r} has no default FSR position for the demo")
    channels = infer_feature_shapes(backbone, [where], image_shape)[where][0]
    return max(1, round(channels * FSR_HIDDEN_FRACTION))


def paired_rows(reports: dict[str, Any], base: str, other: str) -> list[dict[str, Any]]:
    """Per column: ``other − base`` in points with its 95 % paired-bootstrap CI, the exact
    McNemar p-value and the CI's verdict (both reports must be on the same points)."""
    from fortify.stats import mcnemar_exact, paired_bootstrap, verdict

    a, b = reports[base], reports[other]
    rows = []
    for col in a.columns:
        if col not in b.columns:
            continue
        ca, cb = a.correct(col), b.correct(col)
        ra, rb = a.ran(col), b.ran(col)
        if ca is None or cb is None or ra is None or rb is None or len(ca) != len(cb):
            continue
        both = ra & rb  # only points on which the column's attacks ran for both models count
        if not bool(both.any()):
            continue
        ca, cb = ca[both], cb[both]
        iv = paired_bootstrap(ca, cb, resamples=BOOTSTRAP_RESAMPLES, seed=0)
        rows.append(
            {
                "column": col,
                "n": len(ca),
                "difference": iv.estimate,
                "ci95": [iv.low, iv.high],
                "mcnemar_p": mcnemar_exact(ca, cb),
                "verdict": verdict(iv),
            }
        )
    return rows


def cost_table(reports: dict[str, Any], costs: dict[str, Any]) -> str:
    """The side-by-side accuracy table with the cost columns (parameters, MFLOPs per image)."""
    cols: list[str] = []
    for r in reports.values():
        cols += [c for c in r.columns if c not in cols]
    lines = [
        "| model | params | MFLOPs | n | " + " | ".join(cols) + " | checks |",
        "|---|---|---|---|" + "---|" * (len(cols) + 1),
    ]
    for label, r in reports.items():
        c = costs[label]
        table, ns = r.table(), r.table_n()
        mode = "final" if "final" in table else next(iter(table))
        row, n_row = table[mode], ns.get(mode, {})
        warn = [ch.name for ch in r.checks if ch.status != "ok"]
        status = "ok" if not warn else "WARN: " + ", ".join(warn)
        n_all = r.settings.get("n_points")
        # a column computed on fewer points than the row's n says its own n
        cells = [
            "–"
            if k not in row
            else f"{row[k]:.2f}" + (f" (n={n_row[k]})" if n_row.get(k, n_all) != n_all else "")
            for k in cols
        ]
        lines.append(
            f"| {label} | {c.params_total / 1e3:.1f} k | {c.flops_total / 1e6:.2f} | "
            f"{r.settings.get('n_points')} | " + " | ".join(cells) + f" | {status} |"
        )
    return "\n".join(lines) + "\n"


def difference_table(rows: list[dict[str, Any]], base: str, other: str) -> str:
    """Markdown table of :func:`paired_rows`."""
    lines = [
        f"| column | n | {other} − {base} (points) | 95 % CI | McNemar p | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(
            f"| {r['column']} | {r['n']} | {r['difference']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | "
            f"{r['mcnemar_p']:.3g} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from fortify.analysis.cost import cost_report
    from fortify.config import ExperimentConfig, apply_overrides, from_dict
    from fortify.config.schema import DefenseConfig
    from fortify.data import load_dataset
    from fortify.evaluate import eval_config_options, evaluate_split
    from fortify.evaluate.plot import eps_curve, plot_accuracy_bars, plot_eps_curve
    from fortify.runs import load_model
    from fortify.train import fit
    from fortify.utils.atomic import atomic_write_text
    from fortify.utils.runtime import seed_everything

    t0 = time.perf_counter()
    given = apply_overrides(copy.deepcopy(DEMO_CONFIG), list(args.overrides)).get("data")
    root = given.get("root") if isinstance(given, dict) else None
    dataset = _pick_dataset(args.dataset, root if isinstance(root, str) else None)
    data = _merge(DEMO_CONFIG, DIGITS_OVERRIDES) if dataset == "digits" else DEMO_CONFIG
    data = apply_overrides(copy.deepcopy(data), list(args.overrides))
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
    image_shape = as_chw(splits.test.images.shape[1:])
    hidden = fsr_hidden_for(base, image_shape, splits.num_classes)
    print(
        f"fortify demo: {splits.name} ({len(splits.train)} train / {len(splits.val)} validation / "
        f"{len(splits.test)} test images), {base.model.name} {base.model.kwargs}, "
        f"PGD-{base.train.attack.steps} AT at L∞ ε = {eps:g}, {base.train.epochs} epochs; "
        f"FSR hidden width {hidden}"
    )
    variants: dict[str, list[DefenseConfig]] = {"AT": []}
    if not args.no_fsr:
        variants["AT+FSR"] = [DefenseConfig(kind="fsr", options={"hidden": hidden})]
    root = Path(args.run_dir)
    reports: dict[str, Any] = {}
    costs: dict[str, Any] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    timing: dict[str, dict[str, float]] = {}
    x_eval, y_eval = splits.test.head(base.eval.n_points).floats()
    for label, defenses in variants.items():
        cfg = from_dict(ExperimentConfig, _merge(data, {"name": f"demo-{label.lower()}"}))
        cfg.defenses = defenses
        run_dir = root / label.lower().replace("+", "-")
        mode: Mode = "overwrite" if run_dir.exists() else "new"
        print(f"\n[{label}] training into {run_dir} ...", flush=True)
        seed_everything(cfg.seed)
        t_train = time.perf_counter()
        result = fit(cfg, run_dir, mode=mode, splits=splits)
        t_train = time.perf_counter() - t_train
        if result.best_epoch is not None and result.best_metric is not None:
            print(
                f"[{label}] best epoch: {result.best_epoch} of {cfg.train.epochs}, chosen on "
                f"validation robust accuracy ({100 * result.best_metric:.1f}%), never on test"
            )
        model, _meta = load_model(run_dir, tag="best")
        costs[label] = cost_report(model, image_shape)
        print(f"[{label}] evaluating on {len(x_eval)} test points ...", flush=True)
        t_eval = time.perf_counter()
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
        natural = report.table()
        natural_acc = next(iter(natural.values())).get("Natural", float("nan"))
        curve = eps_curve(
            model, x_eval, y_eval, [f * eps for f in CURVE_FACTORS], steps=20, step_fraction=0.1
        )
        curves[label] = [(0.0, natural_acc), *curve]
        timing[label] = {"train_s": t_train, "eval_s": time.perf_counter() - t_eval}

    print("\n## Side by side (test split, accuracy %, cost per image)\n")
    table = cost_table(reports, costs)
    print(table)
    diff_md, diff_rows = "", []
    if len(reports) == 2:
        diff_rows = paired_rows(reports, "AT", "AT+FSR")
        diff_md = difference_table(diff_rows, "AT", "AT+FSR")
        n = len(x_eval)
        print(
            f"## Paired difference on the same {n} test points (one training seed; 95 % paired "
            f"bootstrap CI over points, {BOOTSTRAP_RESAMPLES} resamples; exact McNemar test)\n"
        )
        print(diff_md)
        print(
            "The verdict follows from the interval alone: a CI that covers 0 means no detectable "
            "difference at this scale (one seed, few points; see docs/quickstart.md)."
        )
    title_n = f"{splits.name}, n = {len(x_eval)} test points"
    bars = plot_accuracy_bars(
        reports,
        root / "accuracy_per_attack.png",
        title=f"{title_n}, L∞ ε = {eps:g}: accuracy per attack (95 % CI)",
    )
    curve_png = plot_eps_curve(
        curves,
        root / "robust_vs_eps.png",
        title=f"{title_n}: PGD-20 (step 0.1ε, as in the table) vs ε",
        mark_eps=eps,
        mark_label=f"training ε = {eps:g}",
    )
    md = (
        f"# fortify demo ({splits.name})\n\n{table}\n"
        + (f"## Paired difference AT+FSR − AT\n\n{diff_md}\n" if diff_md else "")
        + "\n".join(
            f"- {k}: training {v['train_s']:.0f} s, evaluation {v['eval_s']:.0f} s"
            for k, v in timing.items()
        )
        + "\n"
    )
    atomic_write_text(root / "demo.md", md)
    summary = {
        "dataset": splits.name,
        "eps": eps,
        "n_points": len(x_eval),
        "fsr_hidden": hidden,
        "cost": {k: c.as_dict() for k, c in costs.items()},
        "table": {k: r.table() for k, r in reports.items()},
        "paired": diff_rows,
        "timing": timing,
        "curves": curves,
    }
    atomic_write_text(root / "demo.json", json.dumps(summary, indent=1, default=str))
    for label, t in timing.items():
        print(f"{label}: training {t['train_s']:.0f} s, evaluation {t['eval_s']:.0f} s")
    print(
        f"plots: {bars}, {curve_png}\nsummary: {root}/demo.md, {root}/demo.json\n"
        f"reports: {root}/*/reports/eval.md\ntime: {time.perf_counter() - t0:.0f} s"
    )
    return 0

"""The page and the time estimate of ``fortify replicate fsr-table1``
(:mod:`fortify.replicate.fsr_table1`): :func:`write_report` renders the mean ± sd table, the
generated readings and the settings; :func:`estimate` (``--estimate``) measures the building
blocks and prints the wall time of the whole command."""

from __future__ import annotations

import argparse
import logging
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fortify.replicate import fsr_table1 as t1
from fortify.replicate._fsr_recipe import lr_schedule_text, precision_text, row_config
from fortify.replicate.seed_grid import SeedGrid

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- estimate


def estimate(args: argparse.Namespace, rows: list[str], n_seeds: int) -> int:
    """Measure the building blocks and print the estimated wall time of the whole command.

    Training: one epoch on ``PROBE`` images per objective (with FSR, and AT without) through
    ``fit``. Evaluation: the time of one fp32 input-gradient and one forward per image (batch
    256), times the attack budgets — paper suite 151 gradients per point (+ checks on 200 points:
    6 × PGD-20 and 1,000 Square queries), AutoAttack 100 APGD-CE gradients per clean-correct point
    plus, on the ``--assume-robust`` fraction, 9×100 APGD-T and ~9×150 FAB-T gradients and 5,000
    Square forwards.
    """
    import copy
    import tempfile

    import torch

    from fortify.evaluate.estimate import suite_seconds, unit_costs
    from fortify.train import fit

    probe = 1024
    per_img: dict[str, float] = {}
    val_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for row in ("at", "at", "at-fsr", "trades-fsr", "mart-fsr"):  # first "at" = warm-up
            a = copy.copy(args)
            a.epochs, a.train_subset = 1, probe
            cfg = row_config(row, a)
            out_dir = Path(tmp) / f"{row}-{len(per_img)}"
            res = fit(cfg, out_dir, mode="new", progress=False)
            rec = res.history[-1]
            per_img[row] = float(rec["time/train"]) / probe
            val_s = max(val_s, float(rec.get("time/val", 0.0)))
    costs = unit_costs(res.model.eval(), torch.rand(256, 1, 28, 28))
    cg, cf, r = costs.grad_s, costs.forward_s, args.assume_robust
    parts = suite_seconds(
        costs,
        "full",
        args.test_points,
        aa_points=args.aa_points,
        check_points=0 if args.no_checks else 200,
        assume_robust=r,
    )
    assert parts is not None
    t_paper, t_checks = parts["paper"], parts.get("checks", 0.0)
    t_aa = parts["autoattack"]
    total = 0.0
    lines = []
    for row in rows:
        key = row if row in per_img else "at-fsr"
        t_train = (per_img[key] * args.train_subset + val_s) * args.epochs
        t_eval = t_paper + t_checks + t_aa
        total += t_train + t_eval
        lines.append(
            f"{row:11s} train ~{t_train / 60:5.1f} min"
            f"   paper ~{(t_paper + t_checks) / 60:5.1f} min"
            f"   AutoAttack ~{t_aa / 60:5.1f} min"
        )
    print("\n".join(lines))
    print(
        f"measured: training {1e3 * per_img['at']:.2f} ms/img (AT), {1e3 * per_img['at-fsr']:.2f} "
        f"(AT+FSR), {1e3 * per_img['trades-fsr']:.2f} (TRADES+FSR), "
        f"{1e3 * per_img['mart-fsr']:.2f} "
        f"(MART+FSR) per image per epoch incl. PGD-{args.attack_steps}, + {val_s:.0f} s "
        f"validation per epoch; eval "
        f"{1e3 * cg:.2f} ms per input gradient, {1e3 * cf:.2f} ms per forward (fp32, per image); "
        f"AutoAttack assumes {100 * r:.0f}% of points survive APGD-CE; "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"estimated total: {total / 60:.0f} min per seed, {n_seeds * total / 60:.0f} min for "
        f"{n_seeds} seed(s) (one process; split --rows over processes to divide the wall time)"
    )
    return 0


def log_grid_estimate(
    args: argparse.Namespace, rows: list[str], seeds: list[int], splits: Any
) -> float:
    """Log a rough duration of the whole grid before it starts: training costs about
    ``attack_steps + 2`` input gradients per image and epoch (the attack, then the update's
    forward/backward), evaluation as :func:`fortify.evaluate.estimate.suite_seconds`; both from
    one timed batch of the first row's untrained model. ``--estimate`` measures a real epoch."""
    import torch

    from fortify.evaluate.estimate import minutes, suite_seconds, unit_costs
    from fortify.factory import build_model

    cfg = row_config(rows[0], args, seeds[0])
    model = build_model(cfg.model, cfg.defenses, splits.num_classes, splits.image_shape).eval()
    x, _ = splits.test.head(min(64, args.test_points)).floats()
    costs = unit_costs(model, x)
    train_s = args.epochs * (args.train_subset + args.val_points) * (args.attack_steps + 2)
    train_s *= costs.grad_s
    parts = suite_seconds(
        costs,
        "full" if args.aa_points else "paper",
        args.test_points,
        aa_points=args.aa_points,
        check_points=0 if args.no_checks else 200,
    )
    eval_s = sum((parts or {}).values())
    total = (train_s + eval_s) * len(rows) * len(seeds)
    log.info(
        "estimated time: %s for %d row(s) × %d seed(s) (per job: training %s, evaluation %s; "
        "rough, from one timed batch at %d threads; jobs already finished are reused; "
        "--estimate measures a real epoch)",
        minutes(total),
        len(rows),
        len(seeds),
        minutes(train_s),
        minutes(eval_s),
        torch.get_num_threads(),
    )
    return total


# --------------------------------------------------------------------------- report


def weak_baselines(grid: SeedGrid, rows: Sequence[str]) -> list[str]:
    """Sentences for baselines whose mean clean accuracy is more than
    ``fsr_table1.WEAK_BASELINE_GAP`` points below the mean of the other baselines (a gain over
    them may be a weak baseline)."""
    clean = {}
    for r in rows:
        if r in grid.reports:
            vals = [rep.table()[grid.mode]["Natural"] for rep in grid.reports[r].values()]
            clean[r] = sum(vals) / len(vals)
    out = []
    for r, v in clean.items():
        others = [w for k, w in clean.items() if k != r]
        if others and v < sum(others) / len(others) - t1.WEAK_BASELINE_GAP:
            ref = sum(others) / len(others)
            out.append(
                f"{t1.LABELS[r]}'s clean accuracy ({v:.2f} %) is {ref - v:.1f} points below the "
                f"other baselines' mean ({ref:.2f} %): a difference against it may reflect a "
                "weak baseline run rather than the method. Its training curve is in "
                f"`<out>/{r}/seed-<s>/metrics.jsonl`."
            )
    return out


def write_report(
    grid: SeedGrid,
    summary: dict[str, Any],
    args: argparse.Namespace,
    path: Path,
    command: str,
    per_seed_dir: Path,
) -> str:
    """The Markdown page (mean ± sd table, generated readings, settings); returns its text."""
    from fortify.runs import write_json_atomic, write_text_atomic

    seeds = sorted({s for reps in grid.reports.values() for s in reps})
    pairs = [(a, b) for a, b in t1.PAIRS if a in grid.reports and b in grid.reports]
    readings = grid.readings(pairs, t1.READING_COLUMNS, resamples=args.resamples)
    summary["readings"] = [r.to_dict() for r in readings]
    n_aa = min(args.aa_points, args.test_points)
    lines = [
        "# FSR Table 1 at CPU scale (Fashion-MNIST, L∞ ε = 0.1)",
        "",
        f"Command: `{command}` (regenerates this page; finished jobs are reused).",
        "",
        f"Accuracy (%) on the first {args.test_points} Fashion-MNIST test images, mean ± sd "
        f"(sample sd) over the training seeds listed per row; AutoAttack on the first {n_aa} "
        "(n in its header). Worst case = per-point worst case over every column, AutoAttack and "
        "the masking checks' attacks included, on the points where all of them ran.",
        "",
        *grid.table(t1.COLUMNS),
        "",
        "## FSR minus baseline (generated from the intervals)",
        "",
        *grid.readings_markdown(readings),
    ]
    weak = weak_baselines(grid, [a for a, _ in t1.PAIRS])
    if weak:
        lines += ["", *[f"- **Weak baseline:** {w}" for w in weak]]
    settings = summary["settings"]
    lines += [
        "",
        "## How this was produced",
        "",
        f"    {command}",
        "",
        f"- wall time: {summary['wall_time_min']:.1f} min of training + evaluation summed over "
        f"the (row, seed) jobs (this call: {summary['wall_time_this_call_min']:.1f} min) on "
        f"{platform.machine()} CPU",
        f"- how the jobs ran: {settings['how_run']}; jobs finished in an earlier call or by "
        "another process with the same `--out` were reused as they were (their run directories "
        "record their own thread counts)",
        f"- seeds: training seeds {', '.join(str(s) for s in seeds)} (the evaluation seed is the "
        "training seed), validation split seed 0; every seed is evaluated on the same test "
        "points",
        f"- data: Fashion-MNIST, {args.train_subset} training images (after a 1000-image "
        "validation split), no augmentation",
        f"- model: small-resnet (ResNet-18 layout) width {args.width}; FSR after `layer4` with "
        f"hidden {args.fsr_hidden}, τ = 0.1, λ_sep = λ_rec = 1",
        f"- training: {args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9, wd 5e-4; "
        f"{lr_schedule_text(args.epochs)}; PGD-{args.attack_steps} inner attack (step 0.025, "
        "random start, eval mode), "
        + precision_text(args)
        + "; TRADES/MART β = 6; the last epoch is evaluated (as the release does)",
        "- evaluation (fp32, eval mode, deterministic FSR mask): FGSM; PGD-20 and PGD-100 with "
        "step 0.1ε, no random start; C&W = PGD-30 on the margin loss with κ = 50; Ensemble = "
        "per-point worst case over these; AutoAttack standard via pyautoattack; checks = the "
        "gradient-masking checks on the first 200 points (docs/evaluation.md)",
        f"- per-(row, seed) reports with per-sample outcomes: `{per_seed_dir}/` "
        "(re-aggregate with `fortify.replicate.seed_grid.SeedGrid.load_per_seed`)",
        "",
        "Paper (ResNet-18, CIFAR-10, ε = 8/255), for orientation only — different dataset, model "
        "size and budget: AT 48.22 → AT+FSR 52.47 PGD-20; TRADES 50.74 → 52.27; "
        "MART 50.88 → 54.80.",
        "",
    ]
    appendix = getattr(args, "appendix", None)
    if appendix:
        lines += [Path(appendix).read_text().strip(), ""]
    text = "\n".join(lines)
    write_text_atomic(path, text)
    write_json_atomic(path.with_suffix(".json"), summary)
    return text

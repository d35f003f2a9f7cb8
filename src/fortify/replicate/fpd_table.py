"""``fortify replicate fpd-table``: a CPU-scale FPD table on Fashion-MNIST.

Trains (1) a plain small ResNet, (2) the same backbone wrapped in FPD with two-phase training,
(3) that FPD model after adversarial fine-tuning (standard ``at`` objective, FGSM with random
start by default, plus the FPD restoration loss through the aux contract) and (4) the plain model
after the same fine-tuning, then scores each with the ``adaptive`` suite on the first test
points: clean; white-box on the bounded output (FGSM, PGD-CE) and on the pre-bound logits (C&W,
DLR); AutoAttack; black box (Square and transfer from the plain model); and the per-sample worst
case. Writes the table to
``docs/results/fpd_table.md`` (or ``--results``) with the command, seeds and wall time; the
full evaluation reports go to each run directory's ``reports/``.

Default budget, measured on 1 CPU thread of a shared 2-core machine: plain 5 epochs 1.8 min,
FPD 8 epochs 14.2 min, fine-tuning 2 epochs 3.0 / 0.8 min (FPD / plain), evaluation 1.9 / 8.0 /
17.5 / 2.9 min (plain / FPD / FPD+AT / plain+AT) on 500 points with AutoAttack on 100 — 50 min
in total, under the 2 h budget.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from fortify.replicate.common import SeedGrid, add_seed_arguments, file_sha256, per_seed_args

NAME = "fpd-table"
HELP = (
    "FPD on Fashion-MNIST: plain vs FPD vs FPD+AT, with adaptive, black-box and AutoAttack columns"
)
DESCRIPTION = __doc__

log = logging.getLogger("fortify.replicate.fpd_table")

COLUMNS = [
    ("Natural", "clean"),
    ("FGSM", "FGSM (output)"),
    ("PGD-{k} CE", "PGD-CE (output)"),
    ("PGD-{k} C&W", "C&W (logits)"),
    ("PGD-{k} DLR", "DLR (logits)"),
    ("AutoAttack", "AutoAttack (output)"),
    ("AutoAttack (logits)", "AutoAttack (logits)"),
    ("Square", "Square (output)"),
    ("Square (logits)", "Square (logits)"),
    ("Transfer", "transfer from plain"),
    ("Ensemble", "worst case"),
]


_LAST = Path("checkpoints") / "last.safetensors"
SOURCE_FILE = "source.json"  # in a derived row's run directory: the starting weights' SHA-256

# row -> the row whose trained model initialises it (None: trained from scratch)
ROWS: dict[str, str | None] = {"plain": None, "fpd": None, "fpd+at": "fpd", "plain+at": "plain"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="runs/fpd-table", help="root of the run directories (one per row)"
    )
    p.add_argument("--results", default="docs/results/fpd_table.md", help="markdown table to write")
    p.add_argument(
        "--data-root", default=None, help="where Fashion-MNIST lives (default: usual places)"
    )
    p.add_argument("--train-subset", type=int, default=10000, help="training images used")
    p.add_argument("--width", type=int, default=8, help="small-resnet width")
    p.add_argument("--decoder-width", type=int, default=32, help="FPD decoder width")
    p.add_argument("--epochs-plain", type=int, default=5)
    p.add_argument("--epochs-fpd", type=int, default=8)
    p.add_argument("--epochs-ft", type=int, default=2, help="adversarial fine-tuning epochs")
    p.add_argument("--ft-attack", choices=["fgsm-rs", "pgd"], default="fgsm-rs")
    p.add_argument("--threshold", type=float, default=0.08, help="FPD phase threshold T (MSE)")
    p.add_argument("--eps", type=float, default=0.1, help="L∞ budget (Fashion-MNIST standard 0.1)")
    p.add_argument("--n-points", type=int, default=500, help="test points evaluated")
    p.add_argument("--steps", type=int, default=40, help="PGD steps of the white-box columns")
    p.add_argument("--aa-points", type=int, default=100, help="points given to AutoAttack")
    p.add_argument("--square-queries", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="seed when --seeds is not given")
    add_seed_arguments(p, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--rows",
        nargs="+",
        choices=ROWS,
        default=list(ROWS),
        help="models to train and evaluate (plain+at: the plain model with the same adversarial "
        "fine-tuning as fpd+at, the baseline that tells whether FPD adds anything)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep finished runs whose config is unchanged and reports whose settings and "
        "checkpoint are unchanged (continue an interrupted replication)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny smoke run (minutes): checks the pipeline only"
    )


def _configs(a: argparse.Namespace) -> dict[str, Any]:
    from fortify.config.schema import (
        DataConfig,
        DefenseConfig,
        EvalConfig,
        ExperimentConfig,
        InnerAttackConfig,
        ModelConfig,
        TrainConfig,
    )

    data = DataConfig(
        name="fashion-mnist",
        root=a.data_root,
        val_size=5000,
        train_subset=a.train_subset,
        augment="none",
    )
    model = ModelConfig(name="small-resnet", kwargs={"width": a.width})
    fpd = DefenseConfig(
        kind="fpd", options={"width": a.decoder_width, "bound": "tanh", "middle": "input"}
    )
    ev = EvalConfig(suite="adaptive", eps=a.eps, n_points=a.n_points, autoattack_points=a.aa_points)
    common = dict(
        batch_size=128, val_points=500, val_attack_steps=0, select="clean", grad_clip=10.0
    )
    plain = ExperimentConfig(
        name="fpd-table-plain",
        seed=a.seed,
        device=a.device,
        data=data,
        model=model,
        eval=ev,
        train=TrainConfig(
            objective="standard",
            optimizer="adam",
            lr=1e-3,
            weight_decay=0.0,
            epochs=a.epochs_plain,
            schedule="cosine",
            **common,
        ),
    )
    fpd_cfg = ExperimentConfig(
        name="fpd-table-fpd",
        seed=a.seed,
        device=a.device,
        data=data,
        model=model,
        defenses=[fpd],
        eval=ev,
        train=TrainConfig(
            objective="fpd",
            optimizer="adamax",
            lr=1e-3,
            weight_decay=1e-5,
            epochs=a.epochs_fpd,
            schedule="plateau",
            gamma=0.1,
            plateau_patience=2,
            options={
                "threshold": a.threshold,
                "noise": 0.01,
                "second_weight": 1.0,
                "warn_after_epochs": 2,
            },
            **common,
        ),
    )
    if a.ft_attack == "pgd":
        attack = InnerAttackConfig(kind="pgd", eps=a.eps, step_size=a.eps / 4, steps=10)
    else:
        attack = InnerAttackConfig(kind="fgsm-rs", eps=a.eps, step_size=1.25 * a.eps)
    ft = ExperimentConfig(
        name="fpd-table-fpd-at",
        seed=a.seed,
        device=a.device,
        data=data,
        model=model,
        defenses=[fpd],
        eval=ev,
        train=TrainConfig(
            objective="at",
            optimizer="adam",
            lr=1e-4,
            weight_decay=0.0,
            epochs=a.epochs_ft,
            schedule="constant",
            attack=attack,
            **common,
        ),
    )
    plain_ft = copy.deepcopy(ft)
    plain_ft.name, plain_ft.defenses = "fpd-table-plain-at", []
    return {"plain": plain, "fpd": fpd_cfg, "fpd+at": ft, "plain+at": plain_ft}


def run(a: argparse.Namespace) -> int:
    """Train and evaluate every requested row for each seed; write the page."""
    if a.quick:
        a.train_subset, a.epochs_plain, a.epochs_fpd, a.epochs_ft = 512, 1, 2, 1
        a.n_points, a.aa_points, a.square_queries, a.steps = 32, 8, 50, 5
        a.threshold = max(a.threshold, 0.2)
    grid = SeedGrid(labels={k: k for k in ROWS})
    pages = {}
    for a_s in per_seed_args(a):
        reports, times = _run_seed(a_s)
        for key, rep in reports.items():
            grid.add(key, a_s.seed, rep)
        pages[a_s.seed] = _markdown(a_s, reports, times)
    seeds = list(pages)
    from fortify.utils.atomic import atomic_write_text

    readings = grid.readings(
        [p for p in READING_PAIRS if p[0] in grid.reports and p[1] in grid.reports],
        READING_COLUMNS,
    )
    results = Path(a.results)
    if len(seeds) == 1:
        text = pages[seeds[0]] + _readings_section(grid, readings)
    else:
        for seed, page in pages.items():
            atomic_write_text(results.with_name(f"{results.stem}_seed{seed}.md"), page)
        text = _multi_seed_page(a, seeds, grid, readings, results)
    grid.save_per_seed(results.with_suffix(""))
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results, text)
    sys.stdout.write(text)
    return 0


READING_PAIRS = (("plain", "fpd"), ("plain+at", "fpd+at"), ("plain", "plain+at"))
READING_COLUMNS = ("Natural", "Ensemble", "AutoAttack", "AutoAttack (logits)")


def _readings_section(grid: SeedGrid, readings: list[Any]) -> str:
    lines = [
        "",
        "## Differences (generated from the intervals)",
        "",
        "Ensemble is the worst case over every column (AutoAttack included, so on the points "
        "AutoAttack ran on).",
        "",
        *grid.readings_markdown(readings),
    ]
    return "\n".join(lines) + "\n"


def _multi_seed_page(
    a: argparse.Namespace, seeds: list[int], grid: SeedGrid, readings: list[Any], results: Path
) -> str:
    cmd = "fortify replicate fpd-table " + " ".join(shlex.quote(s) for s in sys.argv[3:])
    cols = [c.format(k=a.steps) for c, _ in COLUMNS]
    lines = [
        "# FPD on Fashion-MNIST (CPU scale), several seeds"
        + (" — QUICK SMOKE RUN, numbers meaningless" if a.quick else ""),
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Seeds {', '.join(str(s) for s in seeds)}; {a.n_points} test points, AutoAttack on the "
        f"first {min(a.aa_points, a.n_points)}. Accuracy (%), mean ± sd over seeds; a column on "
        "fewer points gives its n. Per-seed pages: "
        + ", ".join(f"`{results.stem}_seed{s}.md`" for s in seeds)
        + f"; per-seed reports with per-sample outcomes in `{results.with_suffix('')}/`.",
        "",
        *grid.table(cols),
    ]
    return "\n".join(lines) + "\n" + _readings_section(grid, readings)


def _run_seed(a: argparse.Namespace) -> tuple[dict[str, Any], dict[str, float]]:
    """Train and evaluate the rows for ``a.seed`` under ``a.out``; returns (reports, times)."""
    import torch

    from fortify.data import load_dataset
    from fortify.evaluate import EvalReport
    from fortify.evaluate.adaptive import AdaptiveOptions, adaptive_evaluate
    from fortify.runs import load_model
    from fortify.train import fit
    from fortify.utils.atomic import atomic_write_text as write_text_atomic
    from fortify.utils.runtime import seed_everything

    t_start = time.perf_counter()
    seed_everything(a.seed)
    cfgs = _configs(a)
    out = Path(a.out)
    splits = load_dataset(
        "fashion-mnist",
        a.data_root,
        val_size=5000,
        split_seed=0,
        train_subset=a.train_subset,
        test_subset=a.n_points,
    )
    rows = rows_to_train(a.rows)
    summary_path = out / "summary.json"
    times: dict[str, float] = {}
    if a.reuse and summary_path.exists():
        times.update(json.loads(summary_path.read_text()).get("times", {}))
    models: dict[str, Any] = {}
    for key in rows:
        run_dir = out / key.replace("+", "-")
        src = ROWS[key]
        src_sha = file_sha256(out / src.replace("+", "-") / _LAST) if src else None
        if a.reuse and _finished_with(run_dir, cfgs[key], src_sha):
            models[key] = load_model(run_dir, tag="last", device=a.device)[0]
            log.info("reusing the finished run %s", run_dir)
            continue
        t0 = time.perf_counter()
        init = copy.deepcopy(models[src]) if src else None
        res = fit(cfgs[key], run_dir, mode="overwrite", splits=splits, model=init, progress=False)
        if src:  # which weights this row started from, for --reuse
            write_text_atomic(run_dir / SOURCE_FILE, json.dumps({"row": src, "sha256": src_sha}))
        models[key] = res.model.eval()
        times[f"train {key}"] = time.perf_counter() - t0
        last = res.history[-1] if res.history else {}
        log.info("trained %s in %.0fs: %s", key, times[f"train {key}"], last)
        if key == "fpd" and last.get("train/fpd_phase2", 1.0) == 0.0:
            log.warning(
                "FPD never reached phase 2 in its last epoch; "
                "the table reflects restoration-only training"
            )

    x, y = splits.test.floats(torch.device(a.device))
    x, y = x[: a.n_points], y[: a.n_points]
    reports = {}
    for key in [r for r in rows if r in a.rows]:
        model = models[key]
        rep_dir = out / key.replace("+", "-") / "reports"
        fingerprint = eval_fingerprint(a, out, key)
        key_path = rep_dir / "adaptive.key.json"
        if (
            a.reuse
            and key_path.exists()
            and (rep_dir / "adaptive.json").exists()
            and json.loads(key_path.read_text()) == fingerprint
        ):
            reports[key] = EvalReport.load(rep_dir / "adaptive.json")
            log.info("reusing the evaluation in %s", rep_dir)
            continue
        t0 = time.perf_counter()
        opts = AdaptiveOptions(
            steps=a.steps,
            autoattack="both",
            autoattack_points=a.aa_points,
            square_queries=a.square_queries,
            surrogate=models["plain"] if _uses_surrogate(key) else None,
        )
        rep = adaptive_evaluate(
            model,
            x,
            y,
            eps=a.eps,
            options=opts,
            seed=a.seed,
            batch_size=250,
            check_points=min(200, a.n_points),
            square_queries=a.square_queries,
        )
        times[f"eval {key}"] = time.perf_counter() - t0
        rep_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(rep_dir / "adaptive.md", rep.to_markdown())
        write_text_atomic(rep_dir / "adaptive.json", rep.to_json())
        write_text_atomic(key_path, json.dumps(fingerprint, indent=1))
        reports[key] = rep
    wall = time.perf_counter() - t_start
    summary = {"times": times, "last_call_seconds": wall, "args": vars(a)}
    write_text_atomic(summary_path, json.dumps(summary, indent=1, default=str))
    return reports, times


def rows_to_train(requested: list[str]) -> list[str]:
    """The requested rows, the rows they start from and ``plain`` (the transfer surrogate), in
    training order."""
    needed = set(requested) | {"plain"}
    while any(ROWS[r] and ROWS[r] not in needed for r in needed):
        needed |= {ROWS[r] for r in needed if ROWS[r]}
    return [r for r in ROWS if r in needed]


def _uses_surrogate(row: str) -> bool:
    """The FPD rows get a transfer column, attacked from the plain model."""
    return not row.startswith("plain")


def eval_fingerprint(a: argparse.Namespace, out: Path, key: str) -> dict[str, Any]:
    """What an evaluation of row ``key`` depends on: budgets, seed and the checkpoints' hashes."""
    ckpt = _LAST
    return {
        "eps": a.eps,
        "n_points": a.n_points,
        "steps": a.steps,
        "aa_points": a.aa_points,
        "square_queries": a.square_queries,
        "seed": a.seed,
        "checkpoint": file_sha256(out / key.replace("+", "-") / ckpt),
        "surrogate": file_sha256(out / "plain" / ckpt) if _uses_surrogate(key) else None,
    }


def _finished_with(run_dir: Path, cfg: Any, source_sha: str | None = None) -> bool:
    """True when ``run_dir`` holds a finished run of ``cfg`` (its ``eval`` and ``device``
    sections aside: they do not change what is trained) that started from the weights whose
    SHA-256 is ``source_sha`` (rows trained from another row's model; None: from scratch)."""
    from fortify.runs import RunDir
    from fortify.train.loop import training_changes

    rd = RunDir(run_dir)
    stored = rd.read_config() if run_dir.is_dir() else None
    return (
        stored is not None
        and rd.state == "finished"
        and not training_changes(stored, cfg)
        and (run_dir / _LAST).exists()
        and (source_sha is None or _recorded_source(run_dir) == source_sha)
    )


def _recorded_source(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / SOURCE_FILE).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


def subset_accuracy(rep: Any, column: str, k: int) -> tuple[float, int] | None:
    """Accuracy (%) of ``column`` over those of the first ``k`` points it ran on, and their
    number (None if the column is absent or ran on none of them)."""
    col = rep.column(column, "final")
    if col is None:
        return None
    ran = col[1][:k]
    n = int(ran.sum())
    if n == 0:
        return None
    return 100.0 * float(col[0][:k][ran].float().mean()), n


def _table(reports: dict, cols: list[tuple[str, str]], k: int, steps: int) -> list[str]:
    """Markdown rows: one per model, accuracy of each column over the first ``k`` points (a
    column that ran on fewer of them says its n)."""
    lines = [
        "| model | " + " | ".join(label for _, label in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for key, rep in reports.items():
        cells = []
        for col, _ in cols:
            got = subset_accuracy(rep, col.format(k=steps), k)
            if got is None:
                cells.append("–")
            else:
                cells.append(f"{got[0]:.1f}" + ("" if got[1] == k else f" (n={got[1]})"))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def _markdown(a: argparse.Namespace, reports: dict, times: dict[str, float]) -> str:
    """The results page: all-point table, AutoAttack-subset table, checks and stage times."""
    cmd = "fortify replicate fpd-table " + " ".join(shlex.quote(s) for s in sys.argv[3:])
    k = min(a.aa_points, a.n_points)
    main_cols = [(c, label) for c, label in COLUMNS if not c.startswith("AutoAttack")]
    aa_cols = [("Natural", f"clean (first {k})")] + [
        (c, label) for c, label in COLUMNS if c.startswith("AutoAttack")
    ]
    aa_cols.append(("Ensemble", f"worst case (first {k})"))
    total = sum(times.values())
    lines = [
        "# FPD on Fashion-MNIST (CPU scale)"
        + (" — QUICK SMOKE RUN, numbers meaningless" if a.quick else ""),
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Seed {a.seed}; small-resnet width {a.width}, FPD decoder width {a.decoder_width}; "
        f"{a.train_subset} training images; L∞ ε = {a.eps:g}; {a.n_points} test points; "
        f"PGD-{a.steps}, Square {a.square_queries} queries; AutoAttack (standard) on the first "
        f"{k} points; fine-tuning attack {a.ft_attack} for {a.epochs_ft} epochs. Each model is "
        f"its last epoch's weights. Compute time {total / 60:.1f} min (sum of the stages below).",
        "",
        "Accuracy (%). *output* = attacks on the model's (tanh-bounded) output; *logits* = "
        "white-box attacks on the pre-bound logits, scored on the bounded model. Worst case = "
        "per-sample minimum over every column, AutoAttack included, on the points where every "
        "column ran (the headline; (n=k) says how many).",
        "",
        f"## All {a.n_points} points",
        "",
        *_table(reports, main_cols, a.n_points, a.steps),
        "",
        f"## AutoAttack, on the first {k} points",
        "",
        *_table(reports, aa_cols, k, a.steps),
    ]
    lines += ["", "## Checks (warnings only)", ""]
    for key, rep in reports.items():
        warns = [c for c in rep.checks if c.status != "ok"]
        lines.append(
            f"- **{key}** ({rep.checks_status()}): "
            + ("none" if not warns else "; ".join(f"{c.name}: {c.message}" for c in warns))
        )
    lines += ["", "## Time", ""] + [f"- {n}: {v / 60:.1f} min" for n, v in times.items()]
    return "\n".join(lines) + "\n"

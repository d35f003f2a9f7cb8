"""``fortify replicate fsr-table1``: a CPU-scale version of FSR's Table 1 on Fashion-MNIST.

Six rows — AT, AT+FSR, TRADES, TRADES+FSR, MART, MART+FSR — each trained with
:func:`fortify.train.fit` (narrow ResNet-18 layout ``small-resnet``, a training subset, a few
epochs, bf16 autocast + channels-last) and evaluated with :func:`fortify.evaluate.evaluate`:
the FSR paper suite (Natural, FGSM, PGD-20, PGD-100, C&W κ=50, Ensemble) on ``--test-points``
test images and AutoAttack (standard) on the first ``--aa-points`` of them; L∞ ε = 0.1.

Everything lives under ``--out`` (one run directory per row plus ``<row>/reports/
fsr_table1_eval.json``); re-running the command resumes unfinished training and skips finished
rows and evaluations whose settings match. The table goes to ``--doc`` (Markdown) and
``--out/fsr_table1.json`` (and a JSON copy next to the Markdown).
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

NAME = "fsr-table1"
HELP = "FSR Table 1 at CPU scale: AT/TRADES/MART with and without FSR on Fashion-MNIST"
DESCRIPTION = __doc__

ROWS = ("at", "at-fsr", "trades", "trades-fsr", "mart", "mart-fsr")
LABELS = {
    "at": "AT",
    "at-fsr": "AT + FSR",
    "trades": "TRADES",
    "trades-fsr": "TRADES + FSR",
    "mart": "MART",
    "mart-fsr": "MART + FSR",
}
COLUMNS = ("Natural", "FGSM", "PGD-20", "PGD-100", "C&W", "Ensemble", "AutoAttack")
EPS = 0.1

# Defaults chosen from measured costs on the shared 2-core machine (see docs/fsr.md).
DEFAULTS = {
    "epochs": 5,
    "train_subset": 10000,
    "width": 4,
    "test_points": 2000,
    "aa_points": 500,
    "batch_size": 128,
    "attack_steps": 7,
    "fsr_hidden": 8,
}

log = logging.getLogger("fortify.replicate.fsr_table1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument("--out", default="runs/fsr-table1", help="folder for the six run dirs")
    parser.add_argument(
        "--doc", default="docs/results/fsr_table1.md", help="Markdown table to write"
    )
    parser.add_argument("--epochs", type=int, default=d["epochs"])
    parser.add_argument(
        "--train-subset", type=int, default=d["train_subset"], help="training images"
    )
    parser.add_argument("--width", type=int, default=d["width"], help="small-resnet width")
    parser.add_argument("--fsr-hidden", type=int, default=d["fsr_hidden"], help="FSR hidden width")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"])
    parser.add_argument(
        "--attack-steps", type=int, default=d["attack_steps"], help="PGD steps in training"
    )
    parser.add_argument(
        "--test-points", type=int, default=d["test_points"], help="paper-suite points"
    )
    parser.add_argument(
        "--aa-points", type=int, default=d["aa_points"], help="AutoAttack points (0: skip)"
    )
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="time a short epoch + small eval, print the estimate, stop",
    )
    parser.add_argument(
        "--assume-robust",
        type=float,
        default=0.7,
        help="--estimate: robust fraction for AutoAttack's cost",
    )


# --------------------------------------------------------------------------- configs


def row_config(row: str, args: argparse.Namespace) -> Any:
    """The ExperimentConfig of one row (Fashion-MNIST, small-resnet, ε = 0.1)."""
    from fortify.config.loader import from_dict
    from fortify.config.schema import ExperimentConfig

    objective = row.split("-")[0]
    data = {
        "seed": args.seed,
        "name": f"fsr-table1-{row}",
        "data": {
            "name": "fashion-mnist",
            "val_size": 1000,
            "train_subset": args.train_subset,
            "augment": "none",
        },
        "model": {"name": "small-resnet", "kwargs": {"width": args.width}},
        "defenses": (
            [{"kind": "fsr", "options": {"hidden": args.fsr_hidden}}]
            if row.endswith("-fsr")
            else []
        ),
        "train": {
            "objective": objective,
            "beta": 6.0,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "multistep",
            "milestones": [max(1, int(args.epochs * 0.75)), max(1, int(args.epochs * 0.9))],
            "warmup_epochs": 1 if args.epochs > 2 else 0,
            "precision": "bf16",
            "channels_last": True,
            "attack": {
                "kind": "pgd",
                "eps": EPS,
                "step_size": 0.25 * EPS,
                "steps": args.attack_steps,
                "random_start": True,
                "bn_mode": "eval",
            },
            "val_points": 500,
            "select": "last",
        },
        "eval": {"suite": "paper", "eps": EPS, "n_points": args.test_points, "mode": "final"},
    }
    return from_dict(ExperimentConfig, data)


# --------------------------------------------------------------------------- one row


def _train(cfg: Any, run_dir: Path) -> tuple[Any, float]:
    """Train (or resume / reuse) one row; returns (model in eval mode, seconds spent now)."""
    from fortify.train import fit

    t0 = time.perf_counter()
    if (run_dir / "checkpoints" / "last.safetensors").is_file():
        mode = "resume"
    elif run_dir.exists() and any(run_dir.iterdir()):
        mode = "overwrite"  # an aborted start without a checkpoint: moved aside, not deleted
    else:
        mode = "new"
    log.info("%s: training (%s)", run_dir.name, mode)
    result = fit(cfg, run_dir, mode=mode, progress=sys.stderr.isatty())
    return result.model.eval(), time.perf_counter() - t0


def _eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "eps": EPS,
        "test_points": args.test_points,
        "aa_points": args.aa_points,
        "seed": args.seed,
        "checks": not args.no_checks,
        "checkpoint": "last",
    }


def _evaluate(model: Any, row_dir: Path, args: argparse.Namespace, splits: Any) -> dict[str, Any]:
    """Paper suite + AutoAttack for one row, cached in ``reports/fsr_table1_eval.json``."""
    import json

    from fortify.evaluate import evaluate
    from fortify.runs import write_json_atomic

    cache = row_dir / "reports" / "fsr_table1_eval.json"
    settings = _eval_settings(args)
    ckpt = row_dir / "checkpoints" / "last.safetensors"
    stamp = ckpt.stat().st_mtime if ckpt.is_file() else None
    if cache.is_file():
        old = json.loads(cache.read_text())
        if old.get("settings") == settings and old.get("checkpoint_mtime") == stamp:
            log.info("%s: evaluation cached", row_dir.name)
            return old
    x, y = splits.test.head(args.test_points).floats()
    t0 = time.perf_counter()
    paper = evaluate(model, x, y, suite="paper", eps=EPS, seed=args.seed, checks=not args.no_checks)
    t_paper = time.perf_counter() - t0
    row = dict(paper.table()["final"])
    checks = [{"name": c.name, "status": c.status, "message": c.message} for c in paper.checks]
    t_aa = 0.0
    if args.aa_points > 0:
        t0 = time.perf_counter()
        n = min(args.aa_points, len(x))
        aa = evaluate(
            model,
            x[:n],
            y[:n],
            suite="autoattack",
            eps=EPS,
            seed=args.seed,
            checks=False,
            batch_size=max(256, n),
        )
        t_aa = time.perf_counter() - t0
        row["AutoAttack"] = aa.table()["final"]["AutoAttack"]
        row["Natural (AA points)"] = aa.table()["final"].get("Natural", float("nan"))
        checks += [{"name": c.name, "status": c.status, "message": c.message} for c in aa.checks]
    out = {
        "settings": settings,
        "checkpoint_mtime": stamp,
        "accuracy": row,
        "checks": checks,
        "seconds": {"paper": round(t_paper, 1), "autoattack": round(t_aa, 1)},
    }
    write_json_atomic(cache, out)
    return out


def _train_seconds(run_dir: Path) -> float:
    """Training + validation seconds over all epochs recorded in the run's metrics.jsonl."""
    from fortify.runs import RunDir

    return sum(
        float(r.get("time/train", 0.0)) + float(r.get("time/val", 0.0))
        for r in RunDir(run_dir).read_metrics()
    )


def _last_record(run_dir: Path) -> dict[str, Any]:
    from fortify.runs import RunDir

    records = RunDir(run_dir).read_metrics()
    if not records:
        return {}
    return {k: v for k, v in records[-1].items() if isinstance(v, (int, float, str))}


def _argv(args: argparse.Namespace, **override: str) -> list[str]:
    """``replicate fsr-table1 --flag value ...`` of ``args`` (``override``: flag -> value)."""
    parts = ["replicate", NAME]
    for flag in (
        "out", "doc", "epochs", "train_subset", "width", "fsr_hidden", "batch_size",
        "attack_steps", "test_points", "aa_points", "rows", "seed",
    ):  # fmt: skip
        parts += [f"--{flag.replace('_', '-')}", str(override.get(flag, getattr(args, flag)))]
    if args.no_checks:
        parts.append("--no-checks")
    return parts


def _command(args: argparse.Namespace) -> str:
    return " ".join(shlex.quote(p) for p in ["fortify", *_argv(args)])


def jobs(args: argparse.Namespace) -> list[Any]:
    """One independent job per row (``--workers``): trains and evaluates that row only.

    A job writes its single-row page under ``<out>/jobs/`` (not ``--doc``); the full table is
    assembled afterwards from the rows' cached results.
    """
    from fortify.replicate.workers import Job

    out = Path(args.out) / "jobs"
    return [
        Job(row, tuple(_argv(args, rows=row, doc=str(out / f"{row}.md"))))
        for row in _parse_rows(args.rows)
    ]


def _parse_rows(text: str) -> list[str]:
    from fortify.errors import ConfigError

    rows = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise ConfigError(f"unknown row(s) {bad}; choose from {list(ROWS)}")
    return rows


# --------------------------------------------------------------------------- estimate


def _estimate(args: argparse.Namespace, rows: list[str]) -> int:
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
    model = res.model.eval()
    x = torch.rand(256, 1, 28, 28)
    c_grad, c_fwd = [], []
    for _ in range(4):
        xg = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        (g,) = torch.autograd.grad(model(xg).logsumexp(1).sum(), xg)
        c_grad.append((time.perf_counter() - t0) / 256)
        with torch.no_grad():
            t0 = time.perf_counter()
            model(x)
            c_fwd.append((time.perf_counter() - t0) / 256)
    cg, cf = min(c_grad[1:]), min(c_fwd[1:])
    r = args.assume_robust
    t_paper = args.test_points * 151 * cg
    t_checks = 0.0 if args.no_checks else min(200, args.test_points) * (120 * cg + 1000 * cf)
    t_aa = args.aa_points * 0.9 * (100 * cg + r * (900 * cg + 1350 * cg + 5000 * cf))
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
    print(f"estimated total: {total / 60:.0f} min")
    return 0


# --------------------------------------------------------------------------- report


def _fmt(v: float | None) -> str:
    return "–" if v is None or v != v else f"{v:.2f}"


def write_report(
    results: dict[str, Any], args: argparse.Namespace, path: Path, command: str
) -> str:
    """Markdown table + settings; returns the text written to ``path``."""
    from fortify.runs import write_json_atomic, write_text_atomic

    lines = [
        "# FSR Table 1 at CPU scale (Fashion-MNIST, L∞ ε = 0.1)",
        "",
        f"Accuracy (%) on the first {args.test_points} Fashion-MNIST test images "
        f"(AutoAttack: first {args.aa_points}).",
        "",
        "| method | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row, res in results["rows"].items():
        acc = res["accuracy"]
        lines.append(f"| {LABELS[row]} | " + " | ".join(_fmt(acc.get(c)) for c in COLUMNS) + " |")
    verdict = _verdict(results)
    settings = results["settings"]
    lines += [
        "",
        f"**Did FSR help?** {verdict}",
        "",
        "## How this was produced",
        "",
        f"    {command}",
        "",
        f"- wall time: {results['wall_time_min']:.1f} min of training + evaluation in total "
        f"(this call: {results['wall_time_this_call_min']:.1f} min) on {settings['machine']}",
        f"- seeds: training seed {args.seed}, evaluation seed {args.seed}, validation split seed 0",
        f"- data: Fashion-MNIST, {args.train_subset} training images "
        "(after a 1000-image validation "
        "split), no augmentation",
        f"- model: small-resnet (ResNet-18 layout) width {args.width}; FSR after `layer4` with "
        f"hidden {args.fsr_hidden}, τ = 0.1, λ_sep = λ_rec = 1",
        f"- training: {args.epochs} epochs, batch {args.batch_size}, SGD lr 0.05 ("
        f"{'1 warm-up ' if args.epochs > 2 else 'no warm-up '}"
        f"epoch, ×0.1 at 75 % and 90 %), wd 5e-4, PGD-{args.attack_steps} inner attack "
        "(step 0.025, random start, eval mode), bf16 autocast + channels-last; TRADES/MART β = 6; "
        "the last epoch is evaluated (as the release does)",
        "- evaluation (fp32, eval mode, deterministic FSR mask): FGSM; PGD-20 and PGD-100 with "
        "step 0.1ε, no random start; C&W = PGD-30 on the margin loss with κ = 50; Ensemble = "
        "per-point worst case over all of them; AutoAttack standard via pyautoattack",
        "",
        "Per-row details (training/eval seconds, check results) are in `fsr_table1.json`.",
        "",
        "Paper (ResNet-18, CIFAR-10, ε = 8/255), for orientation only — different dataset, model "
        "size and budget: AT 48.22 → AT+FSR 52.47 PGD-20; TRADES 50.74 → 52.27; "
        "MART 50.88 → 54.80.",
        "",
    ]
    text = "\n".join(lines)
    write_text_atomic(path, text)
    write_json_atomic(path.with_suffix(".json"), results)
    return text


def _verdict(results: dict[str, Any]) -> str:
    parts, better, total = [], 0, 0
    for base in ("at", "trades", "mart"):
        a, b = results["rows"].get(base), results["rows"].get(f"{base}-fsr")
        if not a or not b:
            continue
        key = (
            "AutoAttack"
            if "AutoAttack" in a["accuracy"] and "AutoAttack" in b["accuracy"]
            else "Ensemble"
        )
        d = b["accuracy"][key] - a["accuracy"][key]
        total += 1
        better += d > 0
        parts.append(f"{LABELS[base]} {d:+.2f} points ({key})")
    if not total:
        return "not enough rows to compare."
    summary = (
        "yes, in every pair"
        if better == total
        else "no, in no pair"
        if better == 0
        else f"mixed: in {better} of {total} pairs"
    )
    return (
        f"{summary} — FSR minus baseline: {'; '.join(parts)}. Differences of about one point "
        "are within the noise of a single seed at this scale."
    )


# --------------------------------------------------------------------------- entry point


def run(args: argparse.Namespace) -> int:
    from fortify.data import load_dataset
    from fortify.errors import ConfigError
    from fortify.runs import load_model

    rows = _parse_rows(args.rows)
    for name in ("epochs", "train_subset", "width", "test_points", "batch_size", "attack_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.aa_points < 0:
        raise ConfigError(f"--aa-points must be >= 0, got {args.aa_points}")
    if args.estimate:
        return _estimate(args, rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_dataset("fashion-mnist", val_size=1000)
    command = _command(args)
    t_start = time.perf_counter()
    results: dict[str, Any] = {"rows": {}, "settings": {}}
    for row in rows:
        cfg = row_config(row, args)
        run_dir = out / row
        model, t_train = _train(cfg, run_dir)
        model, _ = load_model(run_dir, tag="last")  # evaluate exactly what is on disk
        t0 = time.perf_counter()
        ev = _evaluate(model, run_dir, args, splits)
        ev["seconds"]["train_this_call"] = round(t_train, 1)
        ev["seconds"]["eval_this_call"] = round(time.perf_counter() - t0, 1)
        ev["seconds"]["train_total"] = round(_train_seconds(run_dir), 1)
        ev["final_epoch"] = _last_record(run_dir)
        results["rows"][row] = ev
        acc = ev["accuracy"]
        log.info("%s: %s", LABELS[row], ", ".join(f"{c} {_fmt(acc.get(c))}" for c in COLUMNS))
    import torch

    results["wall_time_this_call_min"] = round((time.perf_counter() - t_start) / 60, 2)
    results["wall_time_min"] = round(
        sum(
            r["seconds"]["train_total"] + r["seconds"]["paper"] + r["seconds"]["autoattack"]
            for r in results["rows"].values()
        )
        / 60,
        2,
    )
    results["settings"] = {
        **{k: getattr(args, k) for k in DEFAULTS},
        "seed": args.seed,
        "eps": EPS,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    text = write_report(results, args, Path(args.doc), command)
    from fortify.runs import write_json_atomic

    write_json_atomic(out / "fsr_table1.json", results)
    print(text)
    return 0

"""``fortify replicate rift-table1``: RiFT's Table 1 at CPU scale on Fashion-MNIST.

Takes an adversarially trained run (``--run``) or trains one with the CPU preset
``configs/train/cpu/fmnist-resnet-at.yaml`` (small-resnet width 8, ResNet-18 module names, PGD
AT at L∞ 0.1), runs the whole RiFT workflow on it (MRC on validation → fine-tune the chosen
module → α on validation) and reports, for AT and AT+RiFT on the TEST split: Std (clean), OOD
(mean accuracy over generated corruptions, 5 severities), PGD-10 and AutoAttack (standard).
Every step is resumable: rerunning the command skips finished work. The table goes to ``--doc``.

``--bn adapt,frozen`` (default) runs the fine-tuning with BN statistics adapting (the release)
and with BN frozen on the same AT model, side by side; the second run reuses the first one's MRC
step and the AT model's reports.

Budget per seed: ≈ 1.4 h wall for both settings with three seeds' processes sharing the 2-core
machine (2026-11-27): AT training ≈ 7 min CPU, AutoAttack on 500 points ≈ 16–23 min per model
(the test evaluation dominates); a RiFT model equal to the AT model (α* = 0) takes its reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fortify.replicate.common import (
    add_seed_arguments,
    check_outputs,
    extend_with_prefix,
    per_seed_args,
    train_or_reuse,
)
from fortify.replicate.seed_grid import SeedGrid

if TYPE_CHECKING:  # for annotations only
    from fortify.rift.config import RiftConfig

NAME = "rift-table1"
HELP = "RiFT Table 1 at CPU scale: AT vs AT+RiFT (Std, OOD, PGD-10, AutoAttack) on Fashion-MNIST"
DESCRIPTION = __doc__

DEFAULT_PRESET = "configs/train/cpu/fmnist-resnet-at.yaml"
BN_SETTINGS = ("adapt", "frozen")
DEFAULT_RIFT = "configs/rift/fashion-mnist-cpu.yaml"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default=None, help="existing AT run (default: train one)")
    parser.add_argument("--out", default="runs/rift-table1", help="working folder")
    parser.add_argument(
        "--doc", default=None,
        help="Markdown output (default: OUT/rift_table1.md; --doc docs/results/rift_table1.md "
        "updates the published page)",
    )  # fmt: skip
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="training preset for the AT run")
    parser.add_argument("--rift-config", default=DEFAULT_RIFT, help="RiFT options YAML")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="RiFT option override, e.g. --set finetune.lr=0.01",
    )
    parser.add_argument(
        "--train-set",
        dest="train_overrides",
        action="append",
        default=[],
        help="training override, e.g. --train-set train.epochs=3",
    )
    parser.add_argument(
        "--bn",
        default=",".join(BN_SETTINGS),
        help="fine-tuning BatchNorm settings run on the same AT model, side by side: adapt (the "
        "release: BN statistics follow the clean fine-tuning data) and/or frozen",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed when --seeds is not given")
    add_seed_arguments(parser, default=None)
    parser.add_argument("--device", default="auto")


def _train_at(args: argparse.Namespace, out: Path) -> Path:
    from fortify.config import ExperimentConfig
    from fortify.config.loader import load_config

    run = out / "at"
    cfg = load_config(
        ExperimentConfig,
        args.preset,
        [f"seed={args.seed}", f"device={args.device}", *args.train_overrides],
    )
    # a finished run of the same training config is reused, an interrupted one resumed
    trained = train_or_reuse(cfg, run)
    log.info("AT model (%s) in %s: %s", args.preset, run, trained.how)
    return run


READING_COLUMNS = ("Natural", "PGD-10", "Ensemble", "AutoAttack")


@dataclass
class BNResult:
    """One RiFT run (one BN setting) on one seed's AT model."""

    bn: str
    page: str
    eval_dir: Path
    summary: dict[str, Any]
    grid: dict[str, Any]  # the α grid on validation (interpolate's grid.json)


def _bns(args: argparse.Namespace) -> list[str]:
    from fortify.errors import ConfigError

    bns = [b.strip() for b in str(args.bn).split(",") if b.strip()]
    if not bns or any(b not in BN_SETTINGS for b in bns) or len(set(bns)) != len(bns):
        raise ConfigError(
            f"--bn must name distinct settings from {', '.join(BN_SETTINGS)}, got {args.bn!r}"
        )
    if any(o.split("=")[0].strip() == "finetune.bn" for o in args.overrides):
        raise ConfigError("choose the BN setting with --bn, not --set finetune.bn=...")
    return bns


def _row(bn: str) -> str:
    return f"RiFT-{bn}"


def run(args: argparse.Namespace) -> int:
    """One AT run + RiFT per seed and BN setting (``--seeds``: one folder per seed); the page."""
    from fortify.stats import mean_sd
    from fortify.utils.atomic import atomic_write_text

    if args.doc is None:
        args.doc = str(Path(args.out) / "rift_table1.md")
    bns = _bns(args)
    check_outputs(
        files={"--doc": args.doc},
        folders={
            "--out folder": args.out,
            "per-seed (--doc without .md) folder": Path(args.doc).with_suffix(""),
        },
    )
    for bn in bns:  # a bad --rift-config / --set fails now, not after the AT training
        _rift_config(args, bn)
    grid = SeedGrid(labels={"AT": "AT", **{_row(b): f"AT + RiFT (BN {b})" for b in bns}})
    results: dict[int, list[BNResult]] = {}
    for a_s in per_seed_args(args):
        results[a_s.seed] = _run_seed(a_s, bns)
        for r in results[a_s.seed]:
            add_eval_reports(grid, a_s.seed, r.eval_dir, rift_row=_row(r.bn))
    seeds = list(results)
    pairs = [("AT", _row(b)) for b in bns]
    if len(bns) == 2:
        pairs.append((_row("frozen"), _row("adapt")))
    readings = grid.readings(pairs, READING_COLUMNS)
    doc = Path(args.doc)
    section = [
        "",
        "## Differences (generated from the intervals)",
        "",
        *grid.readings_markdown(readings),
        "",
    ]
    if len(seeds) == 1 and len(bns) == 1:
        text = results[seeds[0]][0].page + "\n".join(section)
    else:
        names = []
        for seed, per_bn in results.items():
            for r in per_bn:
                name = f"{doc.stem}_seed{seed}_{r.bn}.md"
                atomic_write_text(doc.with_name(name), r.page)
                names.append(f"[{name}]({name})")
        ood_rows = []
        for row, label in grid.labels.items():
            if row == "AT":  # one AT model per seed, the same for every BN setting
                picked = [(per_bn[0], "AT") for per_bn in results.values()]
            else:
                picked = [(r, "RiFT") for per_bn in results.values() for r in per_bn
                          if _row(r.bn) == row]  # fmt: skip
            vals = [r.summary["models"][name].get("ood_mean") for r, name in picked]
            vals = [v for v in vals if isinstance(v, (int, float))]
            if vals:
                ood_rows.append(f"| {label} | {len(vals)} | {mean_sd(vals).format(2)} |")
        text = "\n".join(
            [
                "# RiFT Table 1 — CPU-scale replication, BN settings side by side",
                "",
                f"Command: `{_command()}`",
                "",
                f"Seeds {', '.join(str(s) for s in seeds)}; fine-tuning BN "
                f"{' and '.join(bns)} on the same AT model of each seed (adapt = the release). "
                "Accuracy (%) mean ± sd over seeds on the TEST split (a column on fewer points "
                "gives its n). Per-seed, per-setting pages (fine-tuned module, α grid, checks): "
                + ", ".join(names)
                + ".",
                "",
                *grid.table(READING_COLUMNS),
                "",
                "OOD (mean accuracy over the generated corruptions; mean ± sd over seeds — no "
                "per-point interval, the OOD score is a mean over corruption sets):",
                "",
                "| method | seeds | OOD |",
                "|---|---|---|",
                *ood_rows,
                "",
                *_alpha_rows(results),
                *section,
            ]
        )
    grid.save_per_seed(doc.with_suffix(""))
    atomic_write_text(doc, text)
    print(f"written: {doc}")
    return 0


def _diff(point: dict[str, Any], base: dict[str, Any], key: str) -> str:
    """``point[key] − base[key]`` with the point's paired CI (``<key>_ci``), or "–"."""
    ci = point.get("robust_ci" if key == "robust" else f"{key}_ci")
    if key not in point or key not in base or not isinstance(ci, (list, tuple)):
        return "–"
    return f"{point[key] - base[key]:+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}]"


def _alpha_rows(results: dict[int, list[BNResult]]) -> list[str]:
    """Per seed and BN setting: the chosen α* and what the fine-tuned model (α = 1) did on the
    validation grid — the numbers the α* rule decided on."""
    lines = [
        "α\\* per seed and BN setting, and the fine-tuned model (α = 1) against AT on the "
        "VALIDATION grid (percentage points, paired 95 % CI):",
        "",
        "| seed | BN | module | α* | clean, α = 1 − AT | PGD-10, α = 1 − AT |",
        "|---|---|---|---|---|---|",
    ]
    for seed, per_bn in results.items():
        for r in per_bn:
            points: dict[float, dict[str, Any]] = {
                p.get("alpha"): p for p in r.grid.get("points", [])
            }
            one, zero = points.get(1.0, {}), points.get(0.0, {})
            lines.append(
                f"| {seed} | {r.bn} | `{r.summary.get('module')}` | {r.summary.get('alpha')} | "
                f"{_diff(one, zero, 'clean')} | {_diff(one, zero, 'robust')} |"
            )
    return lines


def _command() -> str:
    if not sys.argv[1:]:
        return "fortify replicate rift-table1"
    return "fortify " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def add_eval_reports(grid: SeedGrid, seed: int, eval_dir: Path, rift_row: str = "RiFT") -> None:
    """Add the AT and RiFT reports of one seed (``<model>-<suite>.json`` of the pipeline's
    evaluate step: PGD-10 and paper on the test points, AutoAttack on a prefix) to ``grid``, the
    RiFT model's as row ``rift_row``."""
    from fortify.evaluate import EvalReport

    for name in ("AT", "RiFT"):
        main = None
        for suite in ("pgd10", "paper", "autoattack"):
            p = eval_dir / f"{name.lower()}-{suite}.json"
            if p.is_file():
                rep = EvalReport.load(p)
                main = rep if main is None else extend_with_prefix(main, rep)
        if main is not None:
            grid.add(name if name == "AT" else rift_row, seed, main)


def _rift_config(args: argparse.Namespace, bn: str) -> RiftConfig:
    """The RiFT options of one seed and BN setting (validated: bad options fail here)."""
    from fortify.rift.config import load_rift_config

    return load_rift_config(
        args.rift_config,
        [f"seed={args.seed}", f"device={args.device}", *args.overrides, f"finetune.bn={bn}"],
    )


def _run_seed(args: argparse.Namespace, bns: list[str]) -> list[BNResult]:
    """Train (or reuse) the AT run of ``args.seed`` and run RiFT once per BN setting on it (the
    later settings reuse the first one's MRC step and AT-model reports)."""
    from fortify.rift.evaluation import summary_markdown
    from fortify.rift.pipeline import RiftRun
    from fortify.utils.atomic import atomic_write_text

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    at_run = Path(args.run) if args.run else _train_at(args, out)
    t_train = time.perf_counter() - t0
    results: list[BNResult] = []
    for bn in bns:
        t_bn = time.perf_counter()
        cfg = _rift_config(args, bn)
        rift_out = out / f"rift-{bn}"
        if results:
            _share_at_work(out / f"rift-{results[0].bn}", rift_out)
        rr = RiftRun(at_run, cfg, out=rift_out)
        summary = rr.run_all()
        grid = json.loads((rr.step_dir("interpolate") / "grid.json").read_text())
        ft = json.loads((rr.step_dir("finetune") / "finetune.json").read_text())
        wall = time.perf_counter() - t_bn + (t_train if not results else 0.0)
        text = render(summary, grid, ft, args, at_run, wall, t_train, rr)
        atomic_write_text(
            out / f"rift_table1_{bn}.json",
            json.dumps(
                {"summary": summary, "grid": grid, "module": ft["module"], "wall_seconds": wall},
                indent=2,
            ),
        )
        print(summary_markdown(summary))
        results.append(BNResult(bn, text, rr.step_dir("evaluate"), summary, grid))
    return results


def _share_at_work(src: Path, dst: Path) -> None:
    """Copy what does not depend on the BN setting from one RiFT run folder to another (if
    absent): the MRC step (reused when its options match) and the AT model's evaluation
    reports (reused when the weights, points and settings match)."""
    import shutil

    if (src / "mrc" / "done.json").is_file() and not (dst / "mrc").exists():
        shutil.copytree(src / "mrc", dst / "mrc")
    for f in sorted((src / "evaluate").glob("at-*")):
        target = dst / "evaluate" / f.name
        if f.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)


def _time_text(wall: float, at_run: Path, *, reused: bool) -> str:
    """This call's wall time (saying when finished steps were reused, whose time it lacks) and
    the AT run's recorded training time (wall and CPU, summed over its epochs)."""
    from fortify.runs import RunDir

    records = RunDir(at_run).read_metrics()
    train_wall = sum(float(r.get("time/train", 0.0)) for r in records)
    train_cpu = sum(float(r.get("time/train_cpu", 0.0)) for r in records)
    note = " (finished steps reused; their time is not included)" if reused else ""
    return (
        f"wall time of this call {wall / 60:.1f} min{note}; the AT run recorded "
        f"{train_wall / 60:.1f} min of training wall time ({train_cpu / 60:.1f} min CPU)"
    )


def render(
    summary: dict[str, Any],
    grid: dict[str, Any],
    ft: dict[str, Any],
    args: argparse.Namespace,
    at_run: Path,
    wall: float,
    t_train: float,
    rr: Any,
) -> str:
    """The Markdown results page."""
    from fortify.evaluate.corruptions import FAMILIES

    m = summary["models"]

    def cell(r: dict[str, Any], key: str) -> str:
        if key == "std":
            v = r.get("std")
        elif key == "ood":
            v = r.get("ood_mean")
        elif key == "pgd10":
            v = r.get("pgd10", {}).get("PGD-10")
        else:
            aa = r.get("autoattack", {})
            v = next((x for k, x in aa.items() if k.lower().startswith("autoattack")), None)
        return f"{v:.2f}" if isinstance(v, (int, float)) else "–"

    rows = [
        "| method | Std | OOD | PGD-10 | AutoAttack |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("AT", "RiFT"):
        if name in m:
            label = "AT" if name == "AT" else "AT + RiFT"
            rows.append(
                f"| {label} | "
                + " | ".join(cell(m[name], k) for k in ("std", "ood", "pgd10", "aa"))
                + " |"
            )
    cmd = _command()
    grid_rows = [
        "| α | clean (val) | PGD-10 (val) | clean − AT [95 % CI] | PGD-10 − AT [95 % CI] |",
        "|---:|---:|---:|---:|---:|",
    ]

    def ci(v: Any) -> str:
        return f"[{v[0]:+.2f}, {v[1]:+.2f}]" if v else "–"

    for p in grid["points"]:
        mark = " (α*)" if p["alpha"] == grid["chosen"]["alpha"] else ""
        grid_rows.append(
            f"| {p['alpha']:.1f}{mark} | {p['clean']:.2f} | {p['robust']:.2f} | "
            f"{ci(p.get('clean_ci'))} | {ci(p.get('robust_ci'))} |"
        )
    return "\n".join(
        [
            f"# RiFT Table 1 — CPU-scale replication ({rr.exp.data.name})",
            "",
            f"Command: `{cmd}`  ",
            f"AT run: `{at_run}` (preset `{args.preset}`{' — given' if args.run else ''}); RiFT "
            f"options: `{args.rift_config}` {args.overrides or ''}  ",
            f"Seeds: training/RiFT seed {args.seed}, data split seed from the run's config; "
            f"{_time_text(wall, at_run, reused=bool(rr.reused_steps))} on "
            f"{platform.machine()} / {platform.python_version()}.",
            "",
            f"TEST split: {summary['n_points']} points for Std/PGD-10/OOD, AutoAttack on "
            f"{rr.cfg.evaluate.autoattack_points or summary['n_points']}; "
            f"L∞ ε = {summary['eps']:.4g}. "
            f"OOD = mean accuracy over generated corruptions ({', '.join(FAMILIES)} families × "
            "5 severities; fortify.evaluate.corruptions, no frost), not a published set.",
            "",
            *rows,
            "",
            "Checks (gradient masking): "
            + "; ".join(
                f"{name}: "
                + ", ".join(
                    f"{k.removeprefix('checks_')} {v}"
                    for k, v in r.items()
                    if k.startswith("checks_")
                )
                for name, r in m.items()
            )
            + ".",
            "",
            f"Fine-tuned module: `{ft['module']}` — {ft.get('reason', '')}. "
            f"BN {ft['options']['bn']}, "
            f"lr {ft['options']['lr']}, {ft['options']['epochs']} epochs, best epoch "
            f"{ft['best_epoch']} by validation clean accuracy.",
            "",
            "α grid on the VALIDATION split (the selection never sees the test split):",
            "",
            *grid_rows,
            "",
            grid["reason"],
            "",
            "Paper (ResNet-18, CIFAR-10): AT 81.46 / 73.56 / 53.63 → RiFT 83.44 / 75.69 / 53.65 "
            "(Std / OOD / PGD-10).",
            "",
        ]
    )

"""Shared machinery of ``fortify replicate fsr-table4``, ``fsr-ablations`` and ``bf16-parity``.

Each row is AT with some feature-level defence on Fashion-MNIST (the ``fsr-table1`` CPU recipe:
narrow ResNet-18 ``small-resnet``, training subset, a few epochs, PGD inner attack, ε = 0.1),
trained once per seed. Every (row, seed) is evaluated on the same test points with the FSR paper
suite and AutoAttack on the first ``--aa-points``; per-point outcomes are kept so that each row
can be compared with the baseline row by :func:`fortify.stats.seed_point_bootstrap` (seeds, then
points) and a CI-derived verdict. Run directories live under ``--out/<row>/seed<k>``; the two
commands share the default ``--out``, so a row they have in common (AT + FSR) is trained once.
Re-running resumes unfinished training and skips finished evaluations with the same settings; a
(row, seed) whose run directory holds no finished run but whose per-seed JSON (``--json-dir``,
committed under docs/results/) was computed from the same training config and evaluation
settings is reused from the JSON, so a later session adds seeds or rows without retraining.

Here: the table spec (:class:`FeatureTable`), its arguments, the time estimate and the run. The
rows are in :mod:`~fortify.replicate._feature_table_rows`, the evaluation, committed results and
differences in :mod:`~fortify.replicate._feature_table_results`, the page in
:mod:`~fortify.replicate._feature_table_page`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fortify.replicate import _fsr_recipe as recipe
from fortify.replicate import fsr_table1 as t1
from fortify.replicate._feature_table_page import write_page
from fortify.replicate._feature_table_results import RULES, committed, compare, evaluate_row
from fortify.replicate._feature_table_rows import Row, _expand, row_config
from fortify.replicate.common import check_outputs, parse_rows, parse_seeds, train_or_reuse
from fortify.stats import BootstrapOptions

log = logging.getLogger(__name__)

DEFAULT_OUT = "runs/fsr-feature-defences"


@dataclass(frozen=True)
class FeatureTable:
    """One ``fortify replicate`` table over AT rows: its rows, the baseline every row is compared
    with, the page's title and notes (Markdown lines), the default page and seeds.
    ``add_arguments`` and ``run`` are the plug-in's entry points (a table module assigns them
    to module-level names)."""

    name: str
    title: str
    rows: dict[str, Row]
    baseline: str
    doc: str
    notes: str
    seeds: str = "0,1,2"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_common_arguments(parser, self.rows, self.doc, self.seeds)

    def run(self, args: argparse.Namespace) -> int:
        return run_table(
            args,
            name=self.name,
            title=self.title,
            rows=self.rows,
            baseline=self.baseline,
            notes=self.notes.strip().splitlines(),
        )


def add_common_arguments(
    parser: argparse.ArgumentParser, rows: dict[str, Row], doc: str, seeds: str
) -> None:
    """Arguments shared by both commands (the fsr-table1 recipe plus seeds and peers' sizes)."""
    d = recipe.DEFAULTS
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the run dirs")
    parser.add_argument("--doc", default=doc, help="Markdown page to write")
    parser.add_argument(
        "--json-dir",
        default=None,
        help="folder for the per-row, per-seed JSON (default: next to --doc, named after it)",
    )
    parser.add_argument("--seeds", default=seeds, help="comma-separated training seeds")
    parser.add_argument("--epochs", type=int, default=d["epochs"])
    parser.add_argument("--train-subset", type=int, default=d["train_subset"])
    parser.add_argument("--width", type=int, default=d["width"], help="small-resnet width")
    parser.add_argument("--fsr-hidden", type=int, default=d["fsr_hidden"], help="FSR hidden width")
    parser.add_argument(
        "--cifs-hidden",
        type=int,
        default=8,
        help="hidden width of CIFS's non-linear probe (paper 128 for 512 channels; 8 keeps that "
        "ratio for width 4's 32 channels)",
    )
    parser.add_argument(
        "--fd-at",
        default="",
        help="comma-separated FD positions (default: after every stage, the release design)",
    )
    parser.add_argument("--batch-size", type=int, default=d["batch_size"])
    parser.add_argument("--attack-steps", type=int, default=d["attack_steps"])
    recipe.add_precision_argument(parser)
    parser.add_argument("--test-points", type=int, default=d["test_points"])
    parser.add_argument("--aa-points", type=int, default=d["aa_points"], help="0: skip")
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the attacks")
    parser.add_argument("--rows", default=",".join(rows), help=f"subset of {','.join(rows)}")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--no-checks", action="store_true", help="skip gradient-masking checks")
    parser.add_argument(
        "--estimate", action="store_true", help="time a short run, print the estimate, stop"
    )


def _check_args(args: argparse.Namespace, rows: dict[str, Row], baseline: str) -> list[str]:
    from fortify.errors import ConfigError

    chosen = parse_rows(args.rows, list(rows))
    for name in ("epochs", "train_subset", "width", "test_points", "batch_size", "attack_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("fsr_hidden", "cifs_hidden"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.aa_points < 0:
        raise ConfigError(f"--aa-points must be >= 0, got {args.aa_points}")
    if args.resamples < 2000:
        raise ConfigError(f"--resamples must be >= 2000, got {args.resamples}")
    BootstrapOptions(resamples=args.resamples).validate()  # the upper bound, before any work
    if args.fd_at and not [p for p in args.fd_at.split(",") if p.strip()]:
        raise ConfigError(
            f"--fd-at must name at least one position such as layer3,layer4, got {args.fd_at!r}"
        )
    if baseline not in chosen:
        log.warning("baseline row %r not selected: no differences will be computed", baseline)
    return chosen


# --------------------------------------------------------------------------- estimate


def estimate(rows: dict[str, Row], chosen: list[str], args: argparse.Namespace) -> int:
    """Train one epoch on 512 images and evaluate 50 points (AutoAttack 20) per row; scale up."""
    from fortify.data import load_dataset
    from fortify.train import fit

    probe, pts, aa = 512, 50, 20
    splits = load_dataset("fashion-mnist", val_size=1000)
    total = 0.0
    for row in chosen:
        a = copy.copy(args)
        a.epochs, a.train_subset, a.test_points, a.aa_points = 1, probe, pts, aa
        cfg = row_config(row, rows[row], 0, a)
        with tempfile.TemporaryDirectory() as tmp:
            res = fit(cfg, Path(tmp) / row, mode="new", progress=False)
            rec = res.history[-1]
            t_img = float(rec["time/train"]) / probe
            t_val = float(rec.get("time/val", 0.0))
            ev = evaluate_row(res.model.eval(), Path(tmp) / row, a, splits)
        t_train = (t_img * args.train_subset + t_val) * args.epochs
        t_eval = ev["seconds"]["paper"] * args.test_points / pts
        t_eval += ev["seconds"]["autoattack"] * args.aa_points / aa
        per_seed = t_train + t_eval
        total += per_seed * len(parse_seeds(args.seeds))
        print(
            f"{row:18s} per seed: train ~{t_train / 60:6.1f} min, eval ~{t_eval / 60:6.1f} min "
            "(AutoAttack scaled from an untrained-for-long model: a lower bound)"
        )
    print(f"estimated total for seeds {args.seeds}: {total / 3600:.1f} h on one process")
    return 0


# --------------------------------------------------------------------------- entry point


def run_table(
    args: argparse.Namespace,
    *,
    name: str,
    title: str,
    rows: dict[str, Row],
    baseline: str,
    notes: list[str],
) -> int:
    """Train/evaluate every chosen (row, seed), compare with ``baseline``, write page + JSON."""
    from fortify.data import load_dataset
    from fortify.runs import RunDir, load_model, write_json_atomic
    from fortify.train.resume import training_fingerprint

    chosen = _check_args(args, rows, baseline)
    seeds = parse_seeds(args.seeds)
    if args.estimate:
        return estimate(rows, chosen, args)
    json_dir = Path(args.json_dir) if args.json_dir else Path(args.doc).with_suffix("")
    json_what = "--json-dir" if args.json_dir else "per-seed (--doc without .md)"
    check_outputs(
        files={"--doc": args.doc},
        folders={"--out folder": args.out, f"{json_what} folder": json_dir},
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_dataset("fashion-mnist", val_size=1000)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for row in chosen:
        results[row] = {}
        for seed in seeds:
            cfg = row_config(row, rows[row], seed, args)
            run_dir = out / row / f"seed{seed}"
            json_path = json_dir / f"{row}-seed{seed}.json"
            ev = None if RunDir(run_dir).state == "finished" else committed(json_path, cfg, args)
            if ev is None:
                train_or_reuse(cfg, run_dir, progress=sys.stderr.isatty())
                model, _ = load_model(run_dir, tag="last")  # evaluate exactly what is on disk
                ev = evaluate_row(model, run_dir, args, splits)
                ev = {**ev, "train_seconds": round(t1._train_seconds(run_dir), 1)}
                ev["final_epoch"] = t1._last_record(run_dir)
                ev["config"] = {"defenses": _expand(rows[row].defences, args), "seed": seed}
                ev["training_sha256"] = training_fingerprint(cfg)
                ev["rules"] = RULES
                write_json_atomic(json_path, ev)
            results[row][seed] = ev
            log.info("%s seed %d: %s", row, seed, ev["accuracy"])
    diffs = compare(results, baseline, args.resamples)
    write_json_atomic(json_dir / "differences.json", diffs)
    text = write_page(name, title, rows, baseline, results, diffs, args, notes)
    print(text, file=sys.stdout)
    return 0

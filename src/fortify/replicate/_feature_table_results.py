"""The results of a feature table (:mod:`fortify.replicate._feature_table`): one (row, seed)
evaluated with the FSR paper suite and AutoAttack with per-point outcomes (cached in the run's
reports folder), a committed per-(row, seed) JSON reused when it matches the training config and
evaluation settings, and every row's differences to the baseline (seed-then-point bootstrap)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from fortify.replicate import fsr_table1 as t1
from fortify.replicate._fsr_recipe import EPS
from fortify.replicate.common import cached, checkpoint_key

log = logging.getLogger(__name__)

# Natural, FGSM, PGD-20, PGD-100, C&W, Ensemble, AutoAttack (fsr-table1 adds a Worst case column)
COLUMNS = tuple(c for c in t1.COLUMNS if c != "Worst case")
EVAL_CACHE = "feature_table_eval.json"
RULES = "fortify-eval/2"  # the evaluation rules a committed result was computed under


def _bits(t: Any) -> str:
    return "".join("1" if v else "0" for v in t.tolist())


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "eps": EPS,
        "test_points": args.test_points,
        "aa_points": args.aa_points,
        "eval_seed": args.eval_seed,
        "checks": not args.no_checks,
        "checkpoint": "last",
    }


def evaluate_row(
    model: Any, run_dir: Path, args: argparse.Namespace, splits: Any
) -> dict[str, Any]:
    """Paper suite + AutoAttack with per-point outcomes, cached in the run's reports folder
    (:func:`~fortify.replicate.common.cached`: reused while the settings and the checkpoint's
    SHA-256 are unchanged)."""
    settings = _settings(args)
    # the rules are part of the key (not of the committed settings): new rules, new evaluation
    key = checkpoint_key(
        {**settings, "rules": RULES}, checkpoint=run_dir / "checkpoints" / "last.safetensors"
    )
    value, _ = cached(
        run_dir / "reports" / EVAL_CACHE, key, lambda: _evaluate_row(model, args, splits, settings)
    )
    return value


def _evaluate_row(
    model: Any, args: argparse.Namespace, splits: Any, settings: dict[str, Any]
) -> dict[str, Any]:
    from fortify.evaluate import evaluate

    x, y = splits.test.head(args.test_points).floats()
    t0 = time.perf_counter()
    rep = evaluate(
        model, x, y, suite="paper", eps=EPS, seed=args.eval_seed, checks=not args.no_checks
    )
    outcomes, n = {}, {}
    for col in COLUMNS:
        c = rep.correct(col, "final")
        if c is not None:
            outcomes[col], n[col] = _bits(c), len(c)
    checks = [{"name": c.name, "status": c.status, "message": c.message} for c in rep.checks]
    t_paper = time.perf_counter() - t0
    t_aa = 0.0
    if args.aa_points > 0:
        k = min(args.aa_points, len(x))
        t0 = time.perf_counter()
        aa = evaluate(
            model, x[:k], y[:k], suite="autoattack", eps=EPS, seed=args.eval_seed, checks=False
        )
        c = aa.correct("AutoAttack", "final")
        if c is not None:
            outcomes["AutoAttack"], n["AutoAttack"] = _bits(c), len(c)
        t_aa = time.perf_counter() - t0
    return {
        "settings": settings,
        "n": n,
        "outcomes": outcomes,
        "accuracy": {col: 100.0 * s.count("1") / len(s) for col, s in outcomes.items()},
        "checks": checks,
        "seconds": {"paper": round(t_paper, 1), "autoattack": round(t_aa, 1)},
    }


def committed(path: Path, cfg: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """The per-(row, seed) JSON at ``path`` if it was computed with the same evaluation settings
    and rules from a run of the same training config
    (:func:`~fortify.train.resume.training_fingerprint`), else None: a later session
    re-aggregates committed results without the run directories."""
    from fortify.train.resume import training_fingerprint

    if not path.is_file():
        return None
    try:
        ev = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); training/evaluating again", path, exc)
        return None
    if not isinstance(ev, dict) or ev.get("settings") != _settings(args):
        return None
    if ev.get("training_sha256") != training_fingerprint(cfg) or ev.get("rules") != RULES:
        return None
    log.info("%s: committed result reused (same training config and evaluation settings)", path)
    return ev


# --------------------------------------------------------------------------- statistics


def compare(
    results: dict[str, dict[int, dict[str, Any]]], baseline: str, resamples: int
) -> dict[str, dict[str, Any]]:
    """``{row: {column: interval dict}}``: row − baseline over the seeds both have."""
    import numpy as np

    from fortify.stats import seed_point_bootstrap

    out: dict[str, dict[str, Any]] = {}
    base = results.get(baseline, {})
    for row, per_seed in results.items():
        if row == baseline:
            continue
        seeds = sorted(set(per_seed) & set(base))
        if not seeds:
            continue
        cols: dict[str, Any] = {}
        for col in COLUMNS:
            a = [base[s]["outcomes"].get(col) for s in seeds]
            b = [per_seed[s]["outcomes"].get(col) for s in seeds]
            if any(v is None for v in a + b):
                continue
            iv = seed_point_bootstrap(
                [np.frombuffer(v.encode(), dtype=np.uint8) - 48 for v in a],
                [np.frombuffer(v.encode(), dtype=np.uint8) - 48 for v in b],
                resamples=resamples,
                seed=0,
            )
            cols[col] = {**iv.to_dict(), "text": iv.format(2), "verdict": iv.verdict}
        out[row] = cols
    return out

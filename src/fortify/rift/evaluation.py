"""Step 4 of RiFT: the models on the TEST split (:func:`evaluate_models`: the suites of
:class:`~fortify.rift.config.EvalOptions`, each report saved per model and suite and reused by
:func:`stored_report` while the weights, points and settings are unchanged) and the summary
table (:func:`summary_markdown`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fortify.data.base import DataSplits
from fortify.errors import FortifyError
from fortify.rift.config import EvalOptions

if TYPE_CHECKING:
    from fortify.evaluate.report import EvalReport

log = logging.getLogger(__name__)


def evaluate_models(
    models: dict[str, nn.Module],
    splits: DataSplits,
    *,
    eps: float,
    opts: EvalOptions,
    seed: int = 0,
    out_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    reuse: bool = True,
) -> dict[str, Any]:
    """Std / PGD / AutoAttack / OOD on the TEST split for each model; reports saved per suite.

    ``data_root`` is where the run's data lives; the OOD suite also looks for published
    corrupted sets (CIFAR-10-C, ...) there. With ``reuse``, a report already saved in
    ``out_dir`` for the same weights, points and settings (:func:`stored_report`) is used
    instead of evaluating again.

    Returns ``{"models": {name: {"std", "pgd10"?, "paper": table, "autoattack", "ood"}}, ...}``.
    """
    from fortify.evaluate import evaluate
    from fortify.evaluate.registry import describe_option, get_suite

    ood_options = {"dataset": splits.name, "root": data_root, "classes": splits.classes}

    out: dict[str, Any] = {"eps": eps, "n_points": opts.n_points, "seed": seed, "models": {}}
    for name, model in models.items():
        res: dict[str, Any] = {}
        for suite in opts.suites:
            n = opts.n_points
            if suite == "autoattack" and opts.autoattack_points is not None:
                n = opts.autoattack_points
            if suite == "ood" and opts.ood_points is not None:
                n = opts.ood_points
            x, y = splits.test.head(n).floats()
            t0 = time.perf_counter()
            stem = f"{name.lower()}-{suite}"
            checks = opts.checks and suite != "ood"
            extra = {**ood_options, "label": name} if suite == "ood" else None
            want = {
                "suite": suite, "eps": float(eps), "seed": seed, "checks": checks,
                "batch_size": opts.batch_size,
                "suite_options": describe_option(get_suite(suite).check_options(extra)),
            }  # fmt: skip
            report = stored_report(out_dir, stem, model, x, y, want) if reuse else None
            for other in (o for o in models if o != name and report is None and reuse):
                # identical weights (e.g. RiFT with α* = 0 is the AT model): the same report
                report = stored_report(out_dir, f"{other.lower()}-{suite}", model, x, y, want)
                if report is not None and out_dir is not None:
                    log.info("%s has the weights of %s: its %s report is reused", name, other,
                             suite)  # fmt: skip
                    report.save(out_dir, stem=stem)
            if report is None:
                report = evaluate(
                    model, x, y, suite=suite, eps=eps, batch_size=opts.batch_size, seed=seed,
                    checks=checks, suite_options=extra,
                )  # fmt: skip
                if out_dir is not None:
                    report.save(out_dir, stem=stem)
            table = report.table()
            row = table.get("final") or next(iter(table.values()))
            res[suite] = row
            res.setdefault("std", row.get("Natural"))
            if suite == "ood":
                res["ood_mean"] = report.extras.get("ood", {}).get("mean")
            res[f"seconds_{suite}"] = round(time.perf_counter() - t0, 1)
            res[f"checks_{suite}"] = report.checks_status()
            res[f"points_{suite}"] = report.table_n().get("final", {})
        out["models"][name] = res
    return out


def stored_report(
    out_dir: str | Path | None,
    stem: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    want: dict[str, Any],
) -> EvalReport | None:
    """The report saved as ``<out_dir>/<stem>.json`` if it evaluated these weights
    (``model_digest``) on these points (``points_sha256``) with the settings in ``want``; else
    None. Lets an interrupted evaluate step resume, and lets two RiFT runs on one AT model share
    the AT model's reports."""
    from fortify.evaluate import EvalReport
    from fortify.evaluate.shard import model_digest, points_fingerprint

    if out_dir is None or not (Path(out_dir) / f"{stem}.json").is_file():
        return None
    try:
        report = EvalReport.load(Path(out_dir) / f"{stem}.json")
    except (OSError, ValueError, KeyError, TypeError, FortifyError) as exc:
        log.warning("%s/%s.json is unreadable (%s); evaluating again", out_dir, stem, exc)
        return None
    s = report.settings
    same = all(s.get(k) == v for k, v in want.items())
    same = same and s.get("points_sha256") == points_fingerprint(x, y)
    same = same and s.get("model_digest") == model_digest(model)
    if same:
        log.info("%s/%s.json: reusing the stored report (same weights, points, settings)",
                 out_dir, stem)  # fmt: skip
    return report if same else None


def summary_markdown(summary: dict[str, Any]) -> str:
    """A Std / OOD / PGD / AutoAttack table of :func:`evaluate_models` output."""
    lines = [
        "| model | Std | OOD | PGD-10 | PGD-20 | PGD-100 | AutoAttack |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, (int, float)) else "–"

    for name, r in summary["models"].items():
        paper = r.get("paper", {})
        aa = r.get("autoattack", {})
        aa_val = next((v for k, v in aa.items() if k.lower().startswith("autoattack")), None)
        lines.append(
            f"| {name} | {f(r.get('std'))} | {f(r.get('ood_mean'))} | "
            f"{f(r.get('pgd10', {}).get('PGD-10'))} | {f(paper.get('PGD-20'))} | "
            f"{f(paper.get('PGD-100'))} | {f(aa_val)} |"
        )
    extra = []
    if "alpha" in summary:
        extra.append(f"α* = {summary['alpha']}, module {summary.get('module')}")
    extra.append(f"TEST split, {summary['n_points']} points, L∞ ε = {summary['eps']:.4g}")
    return "\n".join(lines) + "\n\n" + "; ".join(extra) + "\n"

"""The Markdown pages of ``fortify replicate rift-table1`` (:mod:`fortify.replicate.rift_table1`).

:func:`render` writes the page of one seed and BN setting (RiFT summary, α grid, checks, fine-tuned
module, times); :func:`main_page` the command's page: with one seed and one BN setting that page
plus the generated readings, else the mean ± sd table over seeds, the OOD means, α* per seed and
BN setting, and the readings. Pure presentation: the caller runs the seeds and writes the files.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fortify.replicate import rift_table1 as t1
from fortify.replicate.seed_grid import SeedGrid

if TYPE_CHECKING:  # for annotations only
    from fortify.replicate.rift_table1 import BNResult


def _command() -> str:
    if not sys.argv[1:]:
        return "fortify replicate rift-table1"
    return "fortify " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# --------------------------------------------------------------------------- the command's page


def main_page(
    grid: SeedGrid,
    results: dict[int, list[BNResult]],
    bns: list[str],
    seed_pages: list[str],
    from_json: list[int],
    per_seed_dir: Path,
) -> str:
    """The command's page from the seed grid and each seed's results per BN setting.

    One seed and one BN setting: that seed's page plus the readings. Else the mean ± sd table,
    linking ``seed_pages`` (the file names of the per-seed, per-setting pages written next to it),
    saying which seeds (``from_json``) were taken from the committed JSON in ``per_seed_dir``.
    """
    pairs = [("AT", t1._row(b)) for b in bns]
    if len(bns) == 2:
        pairs.append((t1._row("frozen"), t1._row("adapt")))
    readings = grid.readings(pairs, t1.READING_COLUMNS)
    section = [
        "",
        "## Differences (generated from the intervals)",
        "",
        *grid.readings_markdown(readings),
        "",
    ]
    seeds = list(results)
    if len(seeds) == 1 and len(bns) == 1:
        return results[seeds[0]][0].page + "\n".join(section)
    return "\n".join(
        [
            "# RiFT Table 1 — CPU-scale replication, BN settings side by side",
            "",
            f"Command: `{_command()}`",
            "",
            f"Seeds {', '.join(str(s) for s in seeds)}; fine-tuning BN "
            f"{' and '.join(bns)} on the same AT model of each seed (adapt = the release). "
            "Accuracy (%) mean ± sd over seeds on the TEST split (a column on fewer points "
            "gives its n). Per-seed, per-setting pages (fine-tuned module, α grid, checks): "
            + ", ".join(f"[{name}]({name})" for name in seed_pages)
            + ".",
            *_committed_note(from_json, per_seed_dir),
            "",
            *grid.table(t1.READING_COLUMNS),
            "",
            "OOD (mean accuracy over the generated corruptions; mean ± sd over seeds — no "
            "per-point interval, the OOD score is a mean over corruption sets):",
            "",
            "| method | seeds | OOD |",
            "|---|---|---|",
            *_ood_rows(grid, results),
            "",
            *_alpha_rows(results),
            *section,
        ]
    )


def _ood_rows(grid: SeedGrid, results: dict[int, list[BNResult]]) -> list[str]:
    """One table row per grid row: the OOD mean ± sd over the seeds that have it."""
    from fortify.stats import mean_sd

    ood_rows = []
    for row, label in grid.labels.items():
        if row == "AT":  # one AT model per seed, the same for every BN setting
            picked = [(per_bn[0], "AT") for per_bn in results.values()]
        else:
            picked = [(r, "RiFT") for per_bn in results.values() for r in per_bn
                      if t1._row(r.bn) == row]  # fmt: skip
        vals = [r.summary["models"][name].get("ood_mean") for r, name in picked]
        vals = [v for v in vals if isinstance(v, (int, float))]
        if vals:
            ood_rows.append(f"| {label} | {len(vals)} | {mean_sd(vals).format(2)} |")
    return ood_rows


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


def _committed_note(seeds: list[int], per_seed_dir: Path) -> list[str]:
    """The page's sentence on the seeds taken from the committed per-seed JSON (none: [])."""
    if not seeds:
        return []
    return [
        "",
        f"Seed(s) {', '.join(map(str, seeds))} taken from the committed per-seed JSON in "
        f"`{per_seed_dir}/` (no finished AT run under `--out`; the JSON records the same AT "
        "training config, RiFT options and evaluation settings): nothing was trained or "
        "evaluated for them in this call.",
    ]


# --------------------------------------------------------------------------- one seed's page


def _time_text(page: dict[str, Any]) -> str:
    """The wall time of the call that computed the page (saying when finished steps were reused,
    whose time it lacks) and the AT run's recorded training time."""
    note = " (finished steps reused; their time is not included)" if page["steps_reused"] else ""
    return (
        f"wall time of this call {page['wall_seconds'] / 60:.1f} min{note}; the AT run recorded "
        f"{page['at_train_wall_seconds'] / 60:.1f} min of training wall time "
        f"({page['at_train_cpu_seconds'] / 60:.1f} min CPU)"
    )


def render(
    summary: dict[str, Any],
    grid: dict[str, Any],
    page: dict[str, Any],
    args: argparse.Namespace,
    committed: Path | None = None,
) -> str:
    """The Markdown page of one seed and BN setting from its RiFT summary, α grid and the page
    facts (:func:`fortify.replicate.rift_table1._page_facts`); ``committed``: the per-seed JSON
    they were read from (the page says so)."""
    from fortify.evaluate.corruptions import FAMILIES

    m = summary["models"]
    ft = page["finetune"]

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
    source = [
        "",
        f"Taken from the committed per-seed JSON `{committed}`: the AT run folder holds no "
        "finished run and the JSON records the same AT training config, RiFT options and "
        "evaluation settings; nothing was trained or evaluated in this call (the times above are "
        "those of the call that computed it).",
    ]
    return "\n".join(
        [
            f"# RiFT Table 1 — CPU-scale replication ({page['data']})",
            "",
            f"Command: `{cmd}`  ",
            f"AT run: `{page['at_run']}` (preset `{args.preset}`"
            f"{' — given' if page['given_run'] else ''}); RiFT "
            f"options: `{args.rift_config}` {args.overrides or ''}  ",
            f"Seeds: training/RiFT seed {page['seed']}, data split seed from the run's config; "
            f"{_time_text(page)} on {page['machine']} / {page['python']}.",
            *(source if committed is not None else []),
            "",
            f"TEST split: {summary['n_points']} points for Std/PGD-10/OOD, AutoAttack on "
            f"{page['autoattack_points'] or summary['n_points']}; "
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

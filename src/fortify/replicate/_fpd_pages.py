"""The pages of ``fortify replicate fpd-table`` (:mod:`fortify.replicate.fpd_table`): the rows
and columns of the FPD table, the one-seed page with its per-point JSON, and the multi-seed page
(``--combine``) built from such JSON files."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

# row -> the row whose trained model initialises it (None: trained from scratch)
ROWS: dict[str, str | None] = {
    "plain": None,
    "fpd": None,
    "fpd+at": "fpd",
    "plain+at": "plain",
    "plain+at-eq": "plain",
}
EQUAL = "plain+at-eq"  # its fine-tuning length is derived from the trained FPD run
# (baseline, method) pairs compared on the multi-seed page
PAIRS = [("plain", "fpd"), ("plain+at", "fpd+at"), (EQUAL, "fpd+at")]


def subset_accuracy(rep: Any, column: str, k: int) -> float | None:
    """Accuracy (%) of ``column`` over the first ``k`` points (None if the column is absent)."""
    c = rep.correct(column, "final")
    if c is None or len(c) == 0:
        return None
    return 100.0 * float(c[:k].float().mean())


def worst_case(rep: Any, columns: list[str], k: int) -> Any:
    """Per-point survival of every listed column that is present, over the first ``k`` points
    (each column must have run on all of them); None if none is present."""
    out = None
    for col in columns:
        c = rep.correct(col, "final")
        if c is None:
            continue
        c = c[:k].bool()
        out = c.clone() if out is None else out & c
    return out


def _present(rep: Any, steps: int, with_aa: bool) -> list[str]:
    cols = [c.format(k=steps) for c, _ in COLUMNS if c != "Ensemble"]
    return [c for c in cols if with_aa or not c.startswith("AutoAttack")]


def _pct(c: Any) -> float:
    return 100.0 * float(c.float().mean())


def _header(labels: list[str]) -> list[str]:
    """The two header lines of a table: model, ``labels``, worst case."""
    return [
        "| model | " + " | ".join(labels) + " | **worst case** |",
        "|---|" + "---|" * (len(labels) + 1),
    ]


def _table(
    reports: dict[str, Any], cols: list[tuple[str, str]], k: int, steps: int, with_aa: bool
) -> list[str]:
    """Markdown rows: one per model, accuracy of each column over the first ``k`` points, then
    the worst case over the columns that ran on all ``k`` points."""
    lines = _header([label for _, label in cols])
    for key, rep in reports.items():
        cells = []
        for col, _ in cols:
            acc = subset_accuracy(rep, col.format(k=steps), k)
            cells.append("–" if acc is None else f"{acc:.1f}")
        w = worst_case(rep, _present(rep, steps, with_aa), k)
        cells.append("–" if w is None else f"**{_pct(w):.1f}**")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def _budget_lines(a: argparse.Namespace, cfgs: dict[str, Any] | None) -> list[str]:
    if not cfgs:
        return []
    eq = cfgs[EQUAL].train.epochs
    return [
        f"Training: plain {a.epochs_plain} epochs; FPD {a.epochs_fpd} epochs (T = "
        f"{a.threshold:g}, bn_stats {a.bn_stats}, denoise_scale {a.denoise_scale}); fine-tuning "
        f"({a.ft_attack}) {a.epochs_ft} epochs for fpd+at and plain+at, {eq} epochs for "
        "plain+at-eq (equal forward/backward passes to FPD training + its fine-tuning).",
    ]


def markdown(
    a: argparse.Namespace,
    reports: dict[str, Any],
    times: dict[str, float],
    cfgs: dict[str, Any] | None = None,
) -> str:
    """The results page: all-point table, AutoAttack-subset table, checks and stage times."""
    cmd = "fortify replicate fpd-table " + " ".join(shlex.quote(s) for s in sys.argv[3:])
    k = min(a.aa_points, a.n_points)
    main_cols = [(c, label) for c, label in COLUMNS if not c.startswith("AutoAttack")]
    main_cols = [(c, label) for c, label in main_cols if c != "Ensemble"]
    aa_cols = [("Natural", f"clean (first {k})")] + [
        (c, label) for c, label in COLUMNS if c.startswith("AutoAttack")
    ]
    total = sum(times.values())
    lines = [
        "# FPD on Fashion-MNIST (CPU scale)"
        + (" — QUICK SMOKE RUN, numbers meaningless" if a.quick else ""),
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Seed {a.seed}; small-resnet width {a.width}, FPD decoder width {a.decoder_width}; "
        f"{a.train_subset} training images; L∞ ε = {a.eps:g}; {a.n_points} test points; "
        f"PGD-{a.steps}, Square {a.square_queries} queries; AutoAttack (standard) on the first "
        f"{k} points. Each model is its last epoch's weights. Compute time {total / 60:.1f} min "
        "(sum of the stages below).",
        *_budget_lines(a, cfgs),
        "",
        "Accuracy (%). *output* = attacks on the model's (tanh-bounded) output; *logits* = "
        "white-box attacks on the pre-bound logits, scored on the bounded model. Worst case = "
        "per-point minimum over every attack that ran on all the table's points: every column "
        f"but AutoAttack on all {a.n_points} points; every column, AutoAttack included, on the "
        f"first {k}.",
        "",
        f"## All {a.n_points} points (AutoAttack not included)",
        "",
        *_table(reports, main_cols, a.n_points, a.steps, with_aa=False),
        "",
        f"## The first {k} points, AutoAttack included (n = {k})",
        "",
        *_table(reports, aa_cols, k, a.steps, with_aa=True),
    ]
    lines += ["", "## Checks (warnings only)", ""]
    for key, rep in reports.items():
        warns = [c for c in rep.checks if c.status != "ok"]
        lines.append(
            f"- **{key}**: "
            + ("none" if not warns else "; ".join(f"{c.name}: {c.message}" for c in warns))
        )
    lines += ["", "## Time", ""] + [f"- {n}: {v / 60:.1f} min" for n, v in times.items()]
    return "\n".join(lines) + "\n"


def outcomes_json(
    a: argparse.Namespace,
    reports: dict[str, Any],
    times: dict[str, float],
    cfgs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-row, per-column per-point outcomes ("1" = correct) of one seed, for re-aggregation."""
    rows = {}
    for key, rep in reports.items():
        cols = {}
        for col in _present(rep, a.steps, with_aa=True):
            c = rep.correct(col, "final")
            if c is not None:
                cols[col] = "".join("1" if v else "0" for v in c.bool().tolist())
        rows[key] = cols
    return {
        "seed": a.seed,
        "n_points": a.n_points,
        "aa_points": min(a.aa_points, a.n_points),
        "eps": a.eps,
        "steps": a.steps,
        "epochs": {
            "plain": a.epochs_plain,
            "fpd": a.epochs_fpd,
            "ft": a.epochs_ft,
            EQUAL: cfgs[EQUAL].train.epochs if cfgs else None,
        },
        "threshold": a.threshold,
        "fpd_options": {"bn_stats": a.bn_stats, "denoise_scale": a.denoise_scale},
        "times_s": times,
        "rows": rows,
    }


def _bits(s: str) -> Any:
    import torch

    return torch.tensor([ch == "1" for ch in s], dtype=torch.bool)


def combine(a: argparse.Namespace) -> int:
    """Write the multi-seed page from per-seed JSON files (``--combine``): mean ± sd over seeds
    per cell, and for each method-vs-baseline pair the difference with a seed-then-point
    bootstrap CI and the verdict it implies (:mod:`fortify.stats`)."""
    from fortify import stats
    from fortify.utils.atomic import atomic_write_text

    seeds = [json.loads(Path(p).read_text()) for p in a.combine]
    n, k = seeds[0]["n_points"], seeds[0]["aa_points"]
    if any((d["n_points"], d["aa_points"]) != (n, k) for d in seeds):
        from fortify.errors import ConfigError

        raise ConfigError("--combine needs files evaluated on the same n-points and aa-points")
    rows = [r for r in ROWS if all(r in d["rows"] for d in seeds)]
    cols = [c for c in seeds[0]["rows"][rows[0]]]  # noqa: C416

    def acc(d: dict[str, Any], row: str, col: str, m: int) -> float | None:
        bits = d["rows"][row].get(col)
        return None if bits is None else _pct(_bits(bits[:m]))

    def worst_bits(d: dict[str, Any], row: str, m: int, with_aa: bool) -> Any:
        out = None
        for col, bits in d["rows"][row].items():
            if not with_aa and col.startswith("AutoAttack"):
                continue
            b = _bits(bits[:m])
            out = b if out is None else out & b
        return out

    def worst(d: dict[str, Any], row: str, m: int, with_aa: bool) -> float:
        return _pct(worst_bits(d, row, m, with_aa))

    def cell(vals: list[float | None]) -> str:
        v = [x for x in vals if x is not None]
        if not v:
            return "–"
        per = " / ".join(f"{x:.1f}" for x in v)
        return f"{stats.mean_sd(v).format()} ({per})"

    labels = dict((c.format(k=seeds[0]["steps"]), lab) for c, lab in COLUMNS)
    main = [c for c in cols if not c.startswith("AutoAttack")]
    aa = [c for c in cols if c.startswith("AutoAttack")]
    seed_ids = ", ".join(str(d["seed"]) for d in seeds)
    lines = [
        "# FPD on Fashion-MNIST (CPU scale), seeds " + seed_ids,
        "",
        f"Command: `fortify replicate fpd-table --combine {' '.join(a.combine)} --results "
        f"{a.results}`  ",
        f"Cells: mean over {len(seeds)} seeds (per-seed values, seed order {seed_ids}). "
        f"{n} test points; AutoAttack on the first {k}. Worst case over attacks that ran on "
        "every counted point.",
        "",
        f"## All {n} points (AutoAttack not included)",
        "",
        *_header([labels.get(c, c) for c in main]),
    ]
    for r in rows:
        cells = [cell([acc(d, r, c, n) for d in seeds]) for c in main]
        cells.append("**" + cell([worst(d, r, n, False) for d in seeds]) + "**")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## The first {k} points, AutoAttack included (n = {k})",
        "",
        *_header(["clean"] + [labels.get(c, c) for c in aa]),
    ]
    for r in rows:
        cells = [cell([acc(d, r, "Natural", k) for d in seeds])]
        cells += [cell([acc(d, r, c, k) for d in seeds]) for c in aa]
        cells.append("**" + cell([worst(d, r, k, True) for d in seeds]) + "**")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Differences (B − A, percentage points)",
        "",
        f"95 % CI from a bootstrap over the {len(seeds)} seeds, then over test points "
        "(`fortify.stats.seed_point_bootstrap`, 2,000 resamples, seed 0); the verdict follows "
        "from the CI alone.",
        "",
        "| A → B | measure | n | difference [95 % CI] | verdict |",
        "|---|---|---|---|---|",
    ]
    measures: list[tuple[str, int, Callable[[dict[str, Any], str, int], Any]]] = [
        ("clean", n, lambda d, r, m: _bits(d["rows"][r]["Natural"][:m])),
        ("worst case, no AutoAttack", n, lambda d, r, m: worst_bits(d, r, m, False)),
        ("worst case with AutoAttack", k, lambda d, r, m: worst_bits(d, r, m, True)),
    ]
    for base, method in PAIRS:
        if base not in rows or method not in rows:
            continue
        for label, m, get in measures:
            ci = stats.seed_point_bootstrap(
                [get(d, base, m) for d in seeds], [get(d, method, m) for d in seeds]
            )
            lines.append(f"| {base} → {method} | {label} | {m} | {ci.format()} | {ci.verdict} |")
    missing = [f"{b} → {m}" for b, m in PAIRS if b not in rows or m not in rows]
    if missing:
        lines += [
            "",
            "No comparison is drawn for "
            + ", ".join(missing)
            + ": a row of the pair is not in every seed's results (not trained or evaluated).",
        ]
    text = "\n".join(lines) + "\n"
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(a.results), text)
    sys.stdout.write(text)
    return 0

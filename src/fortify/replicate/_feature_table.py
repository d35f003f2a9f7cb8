"""Shared machinery of ``fortify replicate fsr-table4`` and ``fsr-ablations``.

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
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fortify.replicate import fsr_table1 as t1
from fortify.replicate.common import cached, checkpoint_key, train_or_reuse

log = logging.getLogger(__name__)

# Natural, FGSM, PGD-20, PGD-100, C&W, Ensemble, AutoAttack (fsr-table1 adds a Worst case column)
COLUMNS = tuple(c for c in t1.COLUMNS if c != "Worst case")
EPS = t1.EPS
DEFAULT_OUT = "runs/fsr-feature-defences"
EVAL_CACHE = "feature_table_eval.json"
RULES = "fortify-eval/2"  # the evaluation rules a committed result was computed under


@dataclass(frozen=True)
class Row:
    """One table row: a label, the defences (config dicts), what the paper reports for it and
    ``train`` settings that replace the recipe's (e.g. ``{"precision": "fp32"}``)."""

    label: str
    defences: list[dict[str, Any]] = field(default_factory=list)
    paper: str = ""
    train: dict[str, Any] = field(default_factory=dict)


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
    d = t1.DEFAULTS
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
    t1.add_precision_argument(parser)
    parser.add_argument("--test-points", type=int, default=d["test_points"])
    parser.add_argument("--aa-points", type=int, default=d["aa_points"], help="0: skip")
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the attacks")
    parser.add_argument("--rows", default=",".join(rows), help=f"subset of {','.join(rows)}")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--no-checks", action="store_true", help="skip gradient-masking checks")
    parser.add_argument(
        "--estimate", action="store_true", help="time a short run, print the estimate, stop"
    )


def _seeds(text: str) -> list[int]:
    from fortify.errors import ConfigError

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct integers >= 0 such as 0,1,2, got {text!r}")
    return seeds


def _expand(defences: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fill the CPU-scale sizes (FSR hidden, CIFS probe width) into a row's defences."""
    out = []
    for d in copy.deepcopy(defences):
        opts = d.setdefault("options", {})
        if d["kind"] == "fsr":
            opts.setdefault("hidden", args.fsr_hidden)
        if d["kind"] == "cifs":
            opts.setdefault("hidden", args.cifs_hidden)
        if d["kind"] == "fd" and args.fd_at:
            d["at"] = [p.strip() for p in args.fd_at.split(",") if p.strip()]
        out.append(d)
    return out


def row_config(row: str, spec: Row, seed: int, args: argparse.Namespace) -> Any:
    """The ExperimentConfig of one (row, seed): fsr-table1's AT recipe plus the row's defences."""
    from fortify.config.loader import from_dict, to_dict
    from fortify.config.schema import ExperimentConfig

    data = to_dict(t1.row_config("at", args, seed=seed))
    data["name"] = f"fsr-feature-{row}-seed{seed}"
    data["defenses"] = _expand(spec.defences, args)
    data["train"].update(copy.deepcopy(spec.train))
    return from_dict(ExperimentConfig, data)


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
    key = checkpoint_key(settings, checkpoint=run_dir / "checkpoints" / "last.safetensors")
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


def _command(name: str, args: argparse.Namespace) -> str:
    parts = ["fortify", "replicate", name]
    for flag in (
        "out", "doc", "seeds", "epochs", "train_subset", "width", "fsr_hidden", "cifs_hidden",
        "fd_at", "batch_size", "attack_steps", "test_points", "aa_points", "eval_seed", "rows",
        "resamples",
    ):  # fmt: skip
        if getattr(args, flag) != "":
            parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.precision != "fp32":
        parts += ["--precision", args.precision]
    if args.json_dir:
        parts += ["--json-dir", args.json_dir]
    if args.no_checks:
        parts.append("--no-checks")
    return " ".join(shlex.quote(p) for p in parts)


def _check_args(args: argparse.Namespace, rows: dict[str, Row], baseline: str) -> list[str]:
    from fortify.errors import ConfigError

    chosen = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in chosen if r not in rows]
    if bad or not chosen:
        raise ConfigError(f"unknown or no row(s) {bad}; choose from {list(rows)}")
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
    if baseline not in chosen:
        log.warning("baseline row %r not selected: no differences will be computed", baseline)
    return chosen


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


# --------------------------------------------------------------------------- report


def _masking_warned(ev: dict[str, Any]) -> bool:
    """Whether any check of one (row, seed) evaluation did not pass (the masking checks and the
    robust ≤ clean sanity check, which masking also trips)."""
    return any(c["status"] != "ok" for c in ev.get("checks", []))


def write_page(
    name: str,
    title: str,
    rows: dict[str, Row],
    baseline: str,
    results: dict[str, dict[int, dict[str, Any]]],
    diffs: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    notes: list[str],
) -> str:
    """The Markdown page (command, seeds, n per column, mean ± sd, CIs, verdicts)."""
    from fortify.runs import write_text_atomic
    from fortify.stats import mean_sd

    any_row = next(iter(results.values()))
    any_eval = next(iter(any_row.values()))
    n = any_eval["n"]
    head = "AutoAttack" if "AutoAttack" in n else "Ensemble"
    lines = [
        f"# {title}",
        "",
        "Generated by:",
        "",
        f"    {_command(name, args)}",
        "",
        f"Accuracy (%) on Fashion-MNIST test points, L∞ ε = {EPS}, mean ± sd over training seeds "
        f"(seeds {args.seeds}; the seed count per row is in the table). Points per column: "
        + ", ".join(f"{c} n = {k}" for c, k in n.items())
        + " (AutoAttack on the first of the paper-suite points). The same points and attack "
        f"seed ({args.eval_seed}) for every row and seed.",
        "",
        "| method | seeds | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for row, per_seed in results.items():
        cells = []
        for col in COLUMNS:
            vals = [e["accuracy"][col] for e in per_seed.values() if col in e["accuracy"]]
            cells.append(mean_sd(vals).format(2) if vals else "–")
        lines.append(f"| {rows[row].label} | {len(per_seed)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Differences to {rows[baseline].label}",
        "",
        "Row − baseline in percentage points with a 95 % CI from a bootstrap over seeds, then "
        f"over points (one point draw shared by the seeds; {args.resamples} resamples; "
        "`fortify.stats.seed_point_bootstrap`); the verdict is read from the CI alone.",
        "",
        f"| method | {head} | verdict | Ensemble | PGD-20 | Natural |",
        "|---|---|---|---|---|---|",
    ]
    for row, cols in diffs.items():
        h = cols.get(head)
        t = {c: v["text"] for c, v in cols.items()}
        lines.append(
            f"| {rows[row].label} | {t.get(head, '–')} | {h['verdict'] if h else '–'} | "
            f"{t.get('Ensemble', '–')} | {t.get('PGD-20', '–')} | {t.get('Natural', '–')} |"
        )
    lines += ["", "Readings:", ""]
    for row, cols in diffs.items():
        h = cols.get(head)
        if h:
            warned = [s for s, e in results[row].items() if _masking_warned(e)]
            caveat = (
                f" Gradient-masking checks warned on {len(warned)} of {len(results[row])} "
                "seeds: its white-box columns (FGSM … Ensemble) may overstate its robustness; only "
                f"the {head} column is read."
                if warned
                else ""
            )
            lines.append(
                f"- {rows[row].label} vs {rows[baseline].label} ({head}): {h['text']} points — "
                f"{h['verdict']}.{caveat}"
            )
    flagged = sorted(
        {
            f"{rows[r].label} seed {s}: {c['name']} ({c['status']})"
            for r, per_seed in results.items()
            for s, e in per_seed.items()
            for c in e.get("checks", [])
            if c["status"] != "ok"
        }
    )
    lines += ["", "## Gradient-masking checks", ""]
    lines += [f"- {f}" for f in flagged] or ["- every check of every row and seed passed"]
    papers = [
        f"- {spec.label}: {spec.paper}" for r, spec in rows.items() if r in results and spec.paper
    ]
    if papers:
        lines += ["", "## Paper (CIFAR-10, ResNet-18, ε = 8/255, AutoAttack), for orientation", ""]
        lines += papers
    lines += ["", "## Settings", "", *notes]
    if args.fd_at and any(d["kind"] == "fd" for r in results for d in rows[r].defences):
        lines.append(
            f"- **FD placement changed by `--fd-at`: after {args.fd_at}** (the release, and this "
            "command's default, add a block after every stage)"
        )
    lines.append("")
    lines += [
        f"- training: fsr-table1's AT recipe — small-resnet width {args.width}, "
        f"{args.train_subset} training images, {args.epochs} epochs, batch {args.batch_size}, "
        f"PGD-{args.attack_steps} inner attack (step 0.25ε, random start, eval mode), SGD lr "
        "0.05 (×0.1 at 75 % and 90 % of the epochs), "
        + t1.precision_text(args, "; every row here trains the same way")
        + " unless a row says otherwise; the last epoch is evaluated",
        f"- sizes scaled to the narrow backbone: FSR hidden {args.fsr_hidden}, CIFS probe hidden "
        f"{args.cifs_hidden}",
        "- evaluation (fp32): FGSM; PGD-20/PGD-100 step 0.1ε, no random start; C&W = PGD-30 on "
        "the margin loss, κ = 50; Ensemble = per-point worst case of those; AutoAttack standard",
        f"- machine: {platform.machine()} CPU; per-row, per-seed JSON (per-point outcomes) next "
        "to this page",
        "",
    ]
    text = "\n".join(lines)
    write_text_atomic(Path(args.doc), text)
    return text


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
        total += per_seed * len(_seeds(args.seeds))
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
    seeds = _seeds(args.seeds)
    if args.estimate:
        return estimate(rows, chosen, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_dir = Path(args.json_dir) if args.json_dir else Path(args.doc).with_suffix("")
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

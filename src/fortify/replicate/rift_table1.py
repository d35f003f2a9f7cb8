"""``fortify replicate rift-table1``: RiFT's Table 1 at CPU scale on Fashion-MNIST.

Takes an adversarially trained run (``--run``) or trains one with the CPU preset
``configs/train/cpu/fmnist-resnet-at.yaml`` (small-resnet width 8, ResNet-18 module names, PGD
AT at L∞ 0.1), runs the whole RiFT workflow on it (MRC on validation → fine-tune the chosen
module → α on validation) and reports, for AT and AT+RiFT on the TEST split: Std (clean), OOD
(mean accuracy over generated corruptions, 5 severities), PGD-10 and AutoAttack (standard).
Every step is resumable: rerunning the command skips finished work. The table goes to ``--doc``,
one JSON per (row, seed) with the per-point outcomes to ``--doc`` without ``.md``; a seed's RiFT
rows also record its RiFT summary (module, α*, OOD means), the α validation grid and what its page
needs. A seed whose AT run folder holds no finished run (e.g. a fresh clone) but whose per-seed
JSON records the same AT training fingerprint, RiFT options and evaluation settings is taken from
the JSON, without training or attacks, and the page says so; a JSON of other settings is ignored
(the seed is computed as before). The pages are rendered by
:mod:`fortify.replicate._rift_table1_page`.

``--bn adapt,frozen`` (default) runs the fine-tuning with BN statistics adapting (the release)
and with BN frozen on the same AT model, side by side; the second run reuses the first one's MRC
step and the AT model's reports.

Budget per seed: ≈ 1.4 h wall for both settings with three seeds' processes sharing the 2-core
machine (2026-11-27): AT training ≈ 7 min CPU, AutoAttack on 500 points ≈ 16–23 min per model
(the test evaluation dominates); a RiFT model equal to the AT model (α* = 0) takes its reports.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fortify.replicate.common import (
    add_seed_arguments,
    check_outputs,
    extend_with_prefix,
    parse_rows,
    per_seed_args,
    train_or_reuse,
)
from fortify.replicate.seed_grid import SeedGrid

if TYPE_CHECKING:  # for annotations only
    from fortify.config import ExperimentConfig
    from fortify.evaluate import EvalReport
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


def _at_config(args: argparse.Namespace) -> ExperimentConfig:
    """The training config of the seed's AT run (preset + seed, device, ``--train-set``)."""
    from fortify.config import ExperimentConfig
    from fortify.config.loader import load_config

    return load_config(
        ExperimentConfig,
        args.preset,
        [f"seed={args.seed}", f"device={args.device}", *args.train_overrides],
    )


def _train_at(args: argparse.Namespace, out: Path) -> Path:
    run = out / "at"
    # a finished run of the same training config is reused, an interrupted one resumed
    trained = train_or_reuse(_at_config(args), run)
    log.info("AT model (%s) in %s: %s", args.preset, run, trained.how)
    return run


READING_COLUMNS = ("Natural", "PGD-10", "Ensemble", "AutoAttack")


@dataclass
class BNResult:
    """One RiFT run (one BN setting) on one seed's AT model."""

    bn: str
    page: str
    summary: dict[str, Any]
    grid: dict[str, Any]  # the α grid on validation (interpolate's grid.json)
    #: job facts saved with the per-seed JSON, per grid row ("AT" and this setting's RiFT row)
    facts: dict[str, dict[str, Any]]
    eval_dir: Path | None = None  # None: taken from the committed per-seed JSON


def _bns(args: argparse.Namespace) -> list[str]:
    from fortify.errors import ConfigError

    bns = parse_rows(str(args.bn), BN_SETTINGS, "--bn", "BN setting")
    if any(o.split("=")[0].strip() == "finetune.bn" for o in args.overrides):
        raise ConfigError("choose the BN setting with --bn, not --set finetune.bn=...")
    return bns


def _row(bn: str) -> str:
    return f"RiFT-{bn}"


def run(args: argparse.Namespace) -> int:
    """One AT run + RiFT per seed and BN setting (``--seeds``: one folder per seed); the page."""
    from fortify.replicate._rift_table1_page import main_page
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
    per_seed_dir = Path(args.doc).with_suffix("")
    from_json: list[int] = []
    for a_s in per_seed_args(args):
        committed = _committed(a_s, bns, per_seed_dir)
        if committed is not None:
            from_json.append(a_s.seed)
            for row, (report, stored) in committed.items():
                grid.add(row, a_s.seed, report, stored)
            results[a_s.seed] = [_committed_result(a_s, b, committed, per_seed_dir) for b in bns]
            continue
        results[a_s.seed] = _run_seed(a_s, bns)
        for r in results[a_s.seed]:
            assert r.eval_dir is not None
            add_eval_reports(grid, a_s.seed, r.eval_dir, rift_row=_row(r.bn), facts=r.facts)
    if from_json:
        log.info("seed(s) %s taken from the committed per-seed JSON in %s (nothing trained or "
                 "evaluated for them)", ", ".join(map(str, from_json)), per_seed_dir)  # fmt: skip
    doc = Path(args.doc)
    seed_pages: list[str] = []
    if len(results) > 1 or len(bns) > 1:  # one page per seed and BN setting, linked
        for seed, per_bn in results.items():
            for r in per_bn:
                name = f"{doc.stem}_seed{seed}_{r.bn}.md"
                atomic_write_text(doc.with_name(name), r.page)
                seed_pages.append(name)
    text = main_page(grid, results, bns, seed_pages, from_json, per_seed_dir)
    grid.save_per_seed(per_seed_dir)
    atomic_write_text(doc, text)
    print(f"written: {doc}")
    return 0


def add_eval_reports(
    grid: SeedGrid,
    seed: int,
    eval_dir: Path,
    rift_row: str = "RiFT",
    facts: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Add the AT and RiFT reports of one seed (``<model>-<suite>.json`` of the pipeline's
    evaluate step: PGD-10 and paper on the test points, AutoAttack on a prefix) to ``grid``, the
    RiFT model's as row ``rift_row``, with ``facts[row]`` (if given) as the row's job facts."""
    from fortify.evaluate import EvalReport

    for name in ("AT", "RiFT"):
        main = None
        for suite in ("pgd10", "paper", "autoattack"):
            p = eval_dir / f"{name.lower()}-{suite}.json"
            if p.is_file():
                rep = EvalReport.load(p)
                main = rep if main is None else extend_with_prefix(main, rep)
        if main is not None:
            row = name if name == "AT" else rift_row
            grid.add(row, seed, main, (facts or {}).get(row))


def _rift_config(args: argparse.Namespace, bn: str) -> RiftConfig:
    """The RiFT options of one seed and BN setting (validated: bad options fail here)."""
    from fortify.rift.config import load_rift_config

    return load_rift_config(
        args.rift_config,
        [f"seed={args.seed}", f"device={args.device}", *args.overrides, f"finetune.bn={bn}"],
    )


def _seed_facts(
    args: argparse.Namespace, bns: list[str], at_cfg: ExperimentConfig
) -> dict[str, dict[str, Any]]:
    """Per grid row of one seed, what a committed result must match to stand for it: the AT
    training fingerprint and the evaluation settings, and for a RiFT row the fingerprint of all
    its RiFT options (the device aside)."""
    from fortify.train.resume import training_fingerprint

    cfgs = {bn: _rift_config(args, bn) for bn in bns}
    c = cfgs[bns[0]]  # the evaluation does not depend on the BN setting
    evaluation = {"evaluate": asdict(c.evaluate), "tag": c.tag, "seed": c.seed,
                  "attack_eps": c.mrc.attack_eps}  # fmt: skip
    common = {"training_sha256": training_fingerprint(at_cfg), "evaluation": evaluation}
    facts = {"AT": common}
    for bn, cfg in cfgs.items():
        options = {k: v for k, v in asdict(cfg).items() if k != "device"}
        blob = json.dumps(options, sort_keys=True, default=str).encode()
        facts[_row(bn)] = {**common, "rift_sha256": hashlib.sha256(blob).hexdigest()}
    return json.loads(json.dumps(facts, default=str))  # as read back from the JSON


PAGE_KEYS = ("summary", "grid", "page")  # what a RiFT row's committed result must hold


def _committed(
    args: argparse.Namespace, bns: list[str], per_seed_dir: Path
) -> dict[str, tuple[EvalReport, dict[str, Any]]] | None:
    """The committed results of seed ``args.seed`` (grid row → report and job facts) when its AT
    run folder holds no finished run (an unfinished one is not resumed then) and every row's
    per-seed JSON records the same AT training config, RiFT options and evaluation settings (a
    later session re-aggregates the page without training); else None. Not with ``--run``."""
    from fortify.runs import RunDir

    if args.run or RunDir(Path(args.out) / "at").state == "finished":
        return None
    found = {}
    for row, want in _seed_facts(args, bns, _at_config(args)).items():
        loaded = SeedGrid.load_one(per_seed_dir / f"{row}-seed{args.seed}.json")
        if loaded is None:
            return None
        report, stored = loaded
        changed = [k for k, v in want.items() if stored.get(k) != v]
        if changed:
            log.info("seed %d: the committed %s result was computed with other settings (%s); "
                     "computing the seed", args.seed, row, ", ".join(changed))  # fmt: skip
            return None
        if row != "AT" and not set(PAGE_KEYS) <= set(stored):
            log.warning("seed %d: the committed %s result lacks its RiFT summary; computing the "
                        "seed", args.seed, row)  # fmt: skip
            return None
        found[row] = (report, stored)
    log.info("seed %d: committed results reused (%s; no finished AT run in %s)",
             args.seed, per_seed_dir, Path(args.out) / "at")  # fmt: skip
    return found


def _committed_result(
    args: argparse.Namespace,
    bn: str,
    committed: dict[str, tuple[EvalReport, dict[str, Any]]],
    per_seed_dir: Path,
) -> BNResult:
    """The :class:`BNResult` of one BN setting rebuilt from the committed job facts."""
    from fortify.replicate._rift_table1_page import render

    row = _row(bn)
    stored = committed[row][1]
    source = per_seed_dir / f"{row}-seed{args.seed}.json"
    page = render(stored["summary"], stored["grid"], stored["page"], args, committed=source)
    facts = {"AT": committed["AT"][1], row: stored}
    return BNResult(bn, page, stored["summary"], stored["grid"], facts)


def _run_seed(args: argparse.Namespace, bns: list[str]) -> list[BNResult]:
    """Train (or reuse) the AT run of ``args.seed`` and run RiFT once per BN setting on it (the
    later settings reuse the first one's MRC step and AT-model reports)."""
    from fortify.replicate._rift_table1_page import render
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
        page = _page_facts(ft, rr, at_run, args, wall)
        text = render(summary, grid, page, args)
        atomic_write_text(
            out / f"rift_table1_{bn}.json",
            json.dumps(
                {"summary": summary, "grid": grid, "module": ft["module"], "wall_seconds": wall},
                indent=2,
            ),
        )
        print(summary_markdown(summary))
        facts = _seed_facts(args, bns, rr.exp)  # the AT run's own training config
        facts[_row(bn)].update(summary=summary, grid=grid, page=page)
        results.append(BNResult(bn, text, summary, grid, facts, rr.step_dir("evaluate")))
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


def _page_facts(
    ft: dict[str, Any], rr: Any, at_run: Path, args: argparse.Namespace, wall: float
) -> dict[str, Any]:
    """What a seed's page needs besides the RiFT summary and the α grid (saved with the per-seed
    JSON, so the page can be regenerated without the run folders): the fine-tuning summary, the
    AT run, this call's wall time and whether it reused finished steps, the AT run's recorded
    training time (wall and CPU, summed over its epochs) and the machine."""
    from fortify.runs import RunDir

    records = RunDir(at_run).read_metrics()
    train_wall = sum(float(r.get("time/train", 0.0)) for r in records)
    train_cpu = sum(float(r.get("time/train_cpu", 0.0)) for r in records)
    return {
        "data": rr.exp.data.name,
        "at_run": str(at_run),
        "given_run": bool(args.run),
        "seed": args.seed,
        "autoattack_points": rr.cfg.evaluate.autoattack_points,
        "wall_seconds": round(wall, 1),
        "steps_reused": sorted(rr.reused_steps),
        "at_train_wall_seconds": round(train_wall, 1),
        "at_train_cpu_seconds": round(train_cpu, 1),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "finetune": {k: ft[k] for k in ("module", "reason", "options", "best_epoch") if k in ft},
    }

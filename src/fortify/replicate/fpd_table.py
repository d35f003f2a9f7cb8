"""``fortify replicate fpd-table``: a CPU-scale FPD table on Fashion-MNIST.

Trains (1) a plain small ResNet, (2) the same backbone wrapped in FPD (the release structure)
with two-phase training, (3) that FPD model after adversarial fine-tuning (standard ``at``
objective, FGSM with random start by default, plus the FPD restoration loss through the aux
contract), (4) the plain model after the same fine-tuning and (5) the plain model fine-tuned for
as many forward/backward passes as FPD + fine-tuning took in all (``plain+at-eq``, the
equal-compute baseline), then scores each with the ``adaptive`` suite on the first test points:
clean; white-box on the bounded output (FGSM, PGD-CE) and on the pre-bound logits (C&W, DLR);
AutoAttack; black box (Square and transfer from the plain model). The worst case is taken per
point over attacks that ran on every counted point: over every non-AutoAttack column on all
points, and over every column on the AutoAttack subset (with its n). Writes the page to
``<out>/fpd_table.md`` (``--results docs/results/fpd_table.md`` updates the published page) with
the command, seed and wall time, and
next to it a JSON file with every row's per-point outcomes (``--combine`` builds the multi-seed
page from such files); the full evaluation reports go to each run directory's ``reports/``.

Equal compute is counted in training forward/backward passes of the model being trained: a
standard step is 1, an FGSM-RS step 2 (attack + update), a PGD-k step k + 1, an FPD phase-1
step 1 and an FPD phase-2 step 2 (its no-grad restoration of the second step is not counted).
An FPD pass runs the backbone twice plus the decoder, so in FLOPs the baseline still gets less.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

# the table's rows, columns and pages (one seed, --combine)
from fortify.replicate._fpd_pages import EQUAL, ROWS, combine, markdown, outcomes_json

NAME = "fpd-table"
HELP = (
    "FPD on Fashion-MNIST: plain vs FPD vs FPD+AT, with adaptive, black-box and AutoAttack columns"
)
DESCRIPTION = __doc__

log = logging.getLogger(__name__)


_LAST = Path("checkpoints") / "last.safetensors"
SOURCE_FILE = "source.json"  # in a derived row's run directory: the starting weights' SHA-256


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="runs/fpd-table", help="root of the run directories (one per row)"
    )
    p.add_argument(
        "--results", default=None,
        help="markdown table to write (default: OUT/fpd_table.md; --results "
        "docs/results/fpd_table.md updates the published page)",
    )  # fmt: skip
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
    p.add_argument(
        "--threshold", type=float, default=3.0, help="FPD phase threshold T (MSE; release: 3)"
    )
    p.add_argument("--eps", type=float, default=0.1, help="L∞ budget (Fashion-MNIST standard 0.1)")
    p.add_argument("--n-points", type=int, default=500, help="test points evaluated")
    p.add_argument("--steps", type=int, default=40, help="PGD steps of the white-box columns")
    p.add_argument("--aa-points", type=int, default=100, help="points given to AutoAttack")
    p.add_argument("--square-queries", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bn-stats", choices=["shared", "per-pass"], default="shared")
    p.add_argument("--denoise-scale", choices=["n", "nc"], default="n")
    p.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="JSON",
        help="write the multi-seed page (--results) from per-seed JSON files; trains nothing",
    )
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
    from fortify.config import schema

    data = schema.DataConfig(
        name="fashion-mnist",
        root=a.data_root,
        val_size=5000,
        train_subset=a.train_subset,
        augment="none",
    )
    model = schema.ModelConfig(name="small-resnet", kwargs={"width": a.width})
    fpd = schema.DefenseConfig(
        kind="fpd",
        options={
            "width": a.decoder_width,
            "bound": "tanh",
            "middle": "input",
            "activation": "relu",
            "dropout": 0.0,
            "decoder": "linear",
            "pyramid": "raw",
            "bn_stats": a.bn_stats,
            "denoise_scale": a.denoise_scale,
        },
    )
    ev = schema.EvalConfig(
        suite="adaptive", eps=a.eps, n_points=a.n_points, autoattack_points=a.aa_points
    )
    common: dict[str, Any] = dict(
        batch_size=128, val_points=500, val_attack_steps=0, select="clean", grad_clip=10.0
    )

    def experiment(
        name: str, defenses: list[Any], train: schema.TrainConfig
    ) -> schema.ExperimentConfig:
        return schema.ExperimentConfig(
            name=name, seed=a.seed, device=a.device, data=data, model=model,
            defenses=defenses, eval=ev, train=train,
        )  # fmt: skip

    def train(objective: str, optimizer: Any, lr: float, wd: float, epochs: int, schedule: Any,
              **more: Any) -> schema.TrainConfig:  # fmt: skip
        return schema.TrainConfig(
            objective=objective, optimizer=optimizer, lr=lr, weight_decay=wd, epochs=epochs,
            schedule=schedule, **more, **common,
        )  # fmt: skip

    plain = experiment(
        "fpd-table-plain", [], train("standard", "adam", 1e-3, 0.0, a.epochs_plain, "cosine")
    )
    fpd_options = {"threshold": a.threshold, "noise": 0.01, "second_weight": 1.0}
    fpd_options["warn_after_epochs"] = 2
    fpd_train = train(
        "fpd", "adamax", 1e-3, 1e-5, a.epochs_fpd, "plateau", gamma=0.1, plateau_patience=2,
        options=fpd_options,
    )  # fmt: skip
    fpd_cfg = experiment("fpd-table-fpd", [fpd], fpd_train)
    if a.ft_attack == "pgd":
        attack = schema.InnerAttackConfig(kind="pgd", eps=a.eps, step_size=a.eps / 4, steps=10)
    else:
        attack = schema.InnerAttackConfig(kind="fgsm-rs", eps=a.eps, step_size=1.25 * a.eps)
    ft_train = train("at", "adam", 1e-4, 0.0, a.epochs_ft, "constant", attack=attack)
    ft = experiment("fpd-table-fpd-at", [fpd], ft_train)
    plain_ft = copy.deepcopy(ft)
    plain_ft.name, plain_ft.defenses = "fpd-table-plain-at", []
    equal = copy.deepcopy(plain_ft)
    equal.name = "fpd-table-plain-at-eq"
    return {"plain": plain, "fpd": fpd_cfg, "fpd+at": ft, "plain+at": plain_ft, EQUAL: equal}


def passes_per_step(cfg: Any) -> int:
    """Training forward/backward passes of one step of an ``at`` / ``standard`` run."""
    if cfg.train.objective == "standard":
        return 1
    a = cfg.train.attack
    return 2 if a.kind == "fgsm-rs" else a.steps + 1


def fpd_passes(history: list[dict[str, Any]]) -> float:
    """FPD training passes in units of steps·epochs: Σ over epochs of (1 + phase-2 fraction)."""
    return sum(1.0 + float(h.get("train/fpd_phase2", 1.0)) for h in history)


def equal_compute_epochs(cfgs: dict[str, Any], fpd_history: list[dict[str, Any]]) -> int:
    """Fine-tuning epochs for ``plain+at-eq`` so that plain training + its fine-tuning uses as
    many passes (per training image) as FPD training + FPD's fine-tuning (rounded to nearest)."""
    ft = cfgs["fpd+at"]
    total = fpd_passes(fpd_history) + ft.train.epochs * passes_per_step(ft)
    left = total - cfgs["plain"].train.epochs * passes_per_step(cfgs["plain"])
    return max(1, int(left / passes_per_step(cfgs[EQUAL]) + 0.5))


def run(a: argparse.Namespace) -> int:
    import torch

    from fortify.data import load_dataset
    from fortify.evaluate import EvalReport
    from fortify.evaluate.adaptive import AdaptiveOptions, adaptive_evaluate
    from fortify.replicate.common import cached_report, file_sha256
    from fortify.runs import load_model
    from fortify.train import fit
    from fortify.utils.atomic import atomic_write_text as write_text_atomic
    from fortify.utils.runtime import seed_everything

    if a.results is None:
        a.results = str(Path(a.out) / "fpd_table.md")
    if a.combine:
        return combine(a)
    if a.quick:
        a.train_subset, a.epochs_plain, a.epochs_fpd, a.epochs_ft = 512, 1, 2, 1
        a.n_points, a.aa_points, a.square_queries, a.steps = 32, 8, 50, 5
        a.threshold = max(a.threshold, 0.2)
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
        if key != EQUAL and a.reuse and _finished_with(run_dir, cfgs[key], src_sha):
            models[key] = load_model(run_dir, tag="last", device=a.device)[0]
            log.info("reusing the finished run %s", run_dir)
            continue
        t0 = time.perf_counter()
        if key == EQUAL:
            cfgs[key].train.epochs = equal_compute_epochs(cfgs, _history(out / "fpd"))
            log.info("%s: %d fine-tuning epochs (equal passes)", key, cfgs[key].train.epochs)
        if a.reuse and _finished_with(run_dir, cfgs[key], src_sha):
            models[key] = load_model(run_dir, tag="last", device=a.device)[0]
            log.info("reusing the finished run %s", run_dir)
            continue
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
        rep_dir = out / key.replace("+", "-") / "reports"

        def compute(key: str = key, rep_dir: Path = rep_dir) -> EvalReport:
            t0 = time.perf_counter()
            opts = AdaptiveOptions(
                steps=a.steps,
                autoattack="both",
                autoattack_points=a.aa_points,
                square_queries=a.square_queries,
                surrogate=models["plain"] if _uses_surrogate(key) else None,
            )
            rep = adaptive_evaluate(
                models[key],
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
            return rep

        reports[key], reused = cached_report(
            rep_dir / "adaptive.json", eval_fingerprint(a, out, key), compute, reuse=a.reuse
        )
        if reused:
            log.info("reusing the evaluation in %s", rep_dir)
    wall = time.perf_counter() - t_start
    summary = {"times": times, "last_call_seconds": wall, "args": vars(a)}
    write_text_atomic(summary_path, json.dumps(summary, indent=1, default=str))
    text = markdown(a, reports, times, cfgs)
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(a.results), text)
    write_text_atomic(
        Path(a.results).with_suffix(".json"), json.dumps(outcomes_json(a, reports, times, cfgs))
    )
    sys.stdout.write(text)
    return 0


def rows_to_train(requested: list[str]) -> list[str]:
    """The requested rows, the rows they start from and ``plain`` (the transfer surrogate), in
    training order."""
    needed = set(requested) | {"plain"}
    while any(ROWS[r] and ROWS[r] not in needed for r in needed):
        needed |= {src for r in needed if (src := ROWS[r])}
    return [r for r in ROWS if r in needed]


def _uses_surrogate(row: str) -> bool:
    """The FPD rows get a transfer column, attacked from the plain model."""
    return not row.startswith("plain")


def eval_fingerprint(a: argparse.Namespace, out: Path, key: str) -> dict[str, Any]:
    """What an evaluation of row ``key`` depends on: budgets, seed and the checkpoints' hashes
    (the key of its :func:`~fortify.replicate.common.cached_report`)."""
    from fortify.replicate.common import file_sha256

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
    from fortify.train.resume import training_changes

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


def _history(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a finished run (``metrics.jsonl``)."""
    from fortify.runs import RunDir

    return RunDir(run_dir).read_metrics()

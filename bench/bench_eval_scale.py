"""Scaling of ``fortify eval``: 1 process vs 2 ranks under torchrun, and ``--aa-scope robust``.

Trains a small adversarially trained Fashion-MNIST model once (``fit``, AT PGD-5, small-cnn),
then, interleaved over ``--repeats``:

1. ``fortify eval RUN --suite paper`` on ``--points`` test points as (a) one process with one
   thread, (b) one process with two threads, (c) two single-thread ranks under
   ``torchrun --nproc_per_node=2`` (gloo); wall time of the whole command (start-up included).
   Every variant's per-point outcomes are checked equal to (a)'s.
2. ``evaluate(suite="full")`` on ``--aa-points`` points with ``autoattack_scope`` ``all`` vs
   ``robust``: the AutoAttack column's seconds, and the worst case checked identical.

Prints medians and the per-repeat ratios. Usage:
    python bench/bench_eval_scale.py [--points 512] [--aa-points 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fortify.config import ExperimentConfig, load_config
from fortify.evaluate import EvalReport, evaluate
from fortify.train import fit

EPS = 0.1


def _train(run_dir: Path) -> None:
    cfg = load_config(ExperimentConfig, None, [
        "data.name=fashion-mnist", "data.train_subset=4096", "device=cpu",
        "model.name=small-cnn", "model.kwargs={width: 16}", "train.objective=at",
        "train.epochs=2", "train.batch_size=128", "train.lr=0.05", "train.attack.steps=5",
        f"train.attack.eps={EPS}", f"train.attack.step_size={EPS / 4}", "train.val_points=0",
    ])  # fmt: skip
    fit(cfg, run_dir, progress=False)


def _eval_cmd(run_dir: Path, out: Path, points: int, threads: int, ranks: int) -> float:
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone"]
    cmd = [*launch, "-m", "fortify.cli.main", "eval", str(run_dir), "--tag", "last"]
    cmd += ["--suite", "paper", "--eps", str(EPS), "--n-points", str(points), "--batch-size"]
    cmd += ["64", "--no-checks", "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(proc.stderr[-3000:])
    return dt


def _outcomes(path: Path) -> list[tuple[str, str, list[bool]]]:
    rep = EvalReport.load(path / "eval-paper.json")
    return [(o.name, o.mode, o.correct.tolist()) for o in rep.outcomes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=512)
    ap.add_argument("--aa-points", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        _train(run_dir)
        variants = {
            "1 proc x 1 thread": (1, 1),
            "1 proc x 2 threads": (2, 1),
            "2 ranks x 1": (1, 2),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(args.repeats):
            for name, (threads, ranks) in variants.items():
                out = Path(tmp) / f"{r}-{threads}-{ranks}"
                times[name].append(_eval_cmd(run_dir, out, args.points, threads, ranks))
                if ranks > 1 or threads > 1:
                    ref = Path(tmp) / f"{r}-1-1"
                    assert _outcomes(out) == _outcomes(ref), f"{name}: outcomes differ"
        base = times["1 proc x 1 thread"]
        print(f"fortify eval --suite paper, {args.points} points, batch 64, no checks "
              f"(wall s incl. start-up; median of {args.repeats}); outcomes identical")  # fmt: skip
        for name, ts in times.items():
            speed = [b / t for b, t in zip(base, ts, strict=True)]
            each = ", ".join(f"{v:.2f}" for v in speed)
            print(f"  {name:20s} {statistics.median(ts):7.1f} s   speed-up vs 1x1 "
                  f"{statistics.median(speed):.2f} ({each})")  # fmt: skip

        from fortify.data import load_dataset
        from fortify.runs import load_model

        model, _ = load_model(run_dir, tag="last")
        x, y = load_dataset("fashion-mnist", val_size=1000).test.head(args.aa_points).floats()
        secs: dict[str, list[float]] = {"all": [], "robust": []}
        for _ in range(args.repeats):
            reps = {}
            for scope in ("all", "robust"):
                opts = {"autoattack_scope": scope}
                reps[scope] = evaluate(model, x, y, suite="full", eps=EPS, checks=False,
                                       batch_size=64, suite_options=opts)  # fmt: skip
                aa = reps[scope].outcome("AutoAttack", "final")
                secs[scope].append(aa.seconds)
            worst = reps["all"].correct("Ensemble") & reps["all"].correct("AutoAttack")
            assert torch.equal(worst, reps["robust"].correct("Ensemble")), "worst case differs"
        t = reps["all"].table()["final"]
        ratio = [r / a for r, a in zip(secs["robust"], secs["all"], strict=True)]
        print(
            f"AutoAttack in suite full, {args.aa_points} points: clean {t['Natural']:.1f}%, "
            f"paper worst case {t['Ensemble']:.1f}%, AutoAttack {t['AutoAttack']:.1f}%"
        )
        print(f"  scope all {statistics.median(secs['all']):.1f} s, robust "
              f"{statistics.median(secs['robust']):.1f} s: robust/all "
              f"{statistics.median(ratio):.2f} ({', '.join(f'{v:.2f}' for v in ratio)}); "
              "worst case identical")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()

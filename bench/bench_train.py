"""Overhead of the training loop: one AT epoch through ``fortify.train.fit`` versus the bare
minimum work it implies, measured in the same process.

Bare minimum per batch = (k + 1) forward+backward passes of the plain model (k attack steps plus
the update pass) and one optimiser step, timed on the same batches with the same model, in the
same precision. Ratio = fit's training time for the epoch (``time/train``: loader, attack,
objective, metrics; validation and checkpoints excluded) ÷ the bare time. Target ≤ 1.10.
Both wall-clock and process CPU time are reported (min over interleaved repeats); on a shared
machine the CPU-time ratio is the steadier one.

Usage: OMP_NUM_THREADS=1 python bench/bench_train.py [--batches 20] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fortify.config import ExperimentConfig, load_config
from fortify.data import TensorLoader, load_dataset
from fortify.models import create
from fortify.train import fit


def bare_epoch(splits, cfg: ExperimentConfig, steps: int) -> tuple[float, float]:
    """(steps + 1) forward+backward + one SGD step per batch on the plain model."""
    tc = cfg.train
    torch.manual_seed(0)
    model = create(cfg.model.name, splits.num_classes, splits.in_channels, **cfg.model.kwargs)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum,
                          weight_decay=tc.weight_decay)  # fmt: skip
    loader = TensorLoader(splits.train, tc.batch_size, shuffle=True, seed=0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
    batches = [
        (x.contiguous(memory_format=torch.channels_last) if tc.channels_last else x, y)
        for x, y in loader
    ]
    t0, c0 = time.perf_counter(), time.process_time()
    for x, y in batches:
        for _ in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
        opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def fit_epoch(splits, cfg: ExperimentConfig) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(cfg, Path(tmp) / "run", splits=splits, progress=False)
    return result.history[0]["time/train"], result.history[0]["time/train_cpu"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    batch = 128
    splits = load_dataset("fashion-mnist", val_size=1000, train_subset=args.batches * batch)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"fashion-mnist 28x28, small-cnn width {args.width}, batch {batch}, "
          f"{args.batches} batches, PGD-{args.steps}")  # fmt: skip
    for precision, cl in (("fp32", False), ("bf16", True)):
        cfg = load_config(ExperimentConfig, None, [
            "data.name=fashion-mnist", "device=cpu", "model.name=small-cnn",
            f"model.kwargs={{width: {args.width}}}", "train.objective=at", "train.epochs=1",
            f"train.batch_size={batch}", "train.lr=0.05", f"train.attack.steps={args.steps}",
            "train.attack.eps=0.1", "train.attack.step_size=0.025", "train.val_points=0",
            f"train.precision={precision}", f"train.channels_last={str(cl).lower()}",
        ])  # fmt: skip
        bare, loop = [], []
        for _ in range(args.repeats):  # interleaved so machine load affects both alike
            bare.append(bare_epoch(splits, cfg, args.steps))
            loop.append(fit_epoch(splits, cfg))
        (bw, bc), (fw, fc) = (min(t[0] for t in bare), min(t[1] for t in bare)), (
            min(t[0] for t in loop), min(t[1] for t in loop))  # fmt: skip
        label = precision + ("+channels_last" if cl else "")
        print(f"{label}: wall bare {bw:.3f}s / fit {fw:.3f}s = {fw / bw:.3f}; "
              f"cpu bare {bc:.3f}s / fit {fc:.3f}s = {fc / bc:.3f} (target <= 1.10); "
              f"{args.batches * batch / fw:.0f} img/s")  # fmt: skip


if __name__ == "__main__":
    main()

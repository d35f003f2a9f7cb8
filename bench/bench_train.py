"""Overhead of the training loop: one AT epoch through ``fortify.train.fit`` versus the bare
minimum work it implies, measured in the same process on the same batches.

Tight floor per batch = k attack steps, each one forward and an *input-gradient-only* backward
(``torch.autograd.grad`` w.r.t. the input: no parameter gradients) plus the sign step and the
projection, in the attack's BatchNorm mode (eval); then one full forward/backward in train mode
and one optimiser step. Same model, precision and memory format as the loop. Ratio = fit's
training time for the epoch (``time/train``: loader, attack, objective, metrics; validation and
checkpoints excluded) ÷ the tight floor. Target ≤ 1.10 for fp32 and bf16 + channels-last.

The old, loose floor ((k + 1) full forward/backward passes, parameter gradients in every attack
step) is printed too for comparison; it flatters the loop.

Wall-clock and process CPU time are both reported (median over interleaved repeats); on a
shared machine the CPU-time ratio is the steadier one.

It also prints fp32 ÷ (bf16 + channels-last) time per AT step through ``fit`` (the speed-up of
the CPU presets' precision), each repeat running both precisions back to back.

Usage: OMP_NUM_THREADS=1 python bench/bench_train.py [--batches 20] [--steps 10] [--repeats 5]
       [--model small-resnet --width 4]  (the fsr-table1 / bf16-parity recipe's model)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fortify.config import ExperimentConfig, load_config
from fortify.data import TensorLoader, load_dataset
from fortify.models import create
from fortify.train import fit


def _setup(splits, cfg: ExperimentConfig):
    tc = cfg.train
    torch.manual_seed(0)
    model = create(cfg.model.name, splits.num_classes, splits.in_channels, **cfg.model.kwargs)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum,
                          weight_decay=tc.weight_decay)  # fmt: skip
    loader = TensorLoader(splits.train, tc.batch_size, shuffle=True, seed=0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
    batches = [
        (x.contiguous(memory_format=torch.channels_last) if tc.channels_last else x, y)
        for x, y in loader
    ]
    return model, opt, batches, dtype


def tight_epoch(splits, cfg: ExperimentConfig, steps: int) -> tuple[float, float]:
    """k input-gradient-only attack steps + one full forward/backward + one SGD step per batch."""
    model, opt, batches, dtype = _setup(splits, cfg)
    a = cfg.train.attack
    gen = torch.Generator().manual_seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    for x, y in batches:
        model.eval()
        delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * a.eps
        x_adv = (x + delta).clamp_(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(x_adv).float(), y)
            (g,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv + a.step_size * g.sign()
                x_adv = torch.min(torch.max(x_adv, x - a.eps), x + a.eps).clamp_(0, 1)
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x_adv.detach()).float(), y)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def loose_epoch(splits, cfg: ExperimentConfig, steps: int) -> tuple[float, float]:
    """The old floor: (k + 1) full forward+backward passes + one SGD step per batch."""
    model, opt, batches, dtype = _setup(splits, cfg)
    model.train()
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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--model", default="small-cnn", help="small-cnn | small-resnet | ...")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    batch = 128
    splits = load_dataset("fashion-mnist", val_size=1000, train_subset=args.batches * batch)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"fashion-mnist 28x28, {args.model} width {args.width}, batch {batch}, "
          f"{args.batches} batches, PGD-{args.steps}, "
          f"{args.repeats} interleaved repeats")  # fmt: skip
    settings = {"fp32": ("fp32", False), "bf16+channels_last": ("bf16", True)}
    cfgs = {
        label: load_config(
            ExperimentConfig,
            None,
            [
                "data.name=fashion-mnist",
                "device=cpu",
                f"model.name={args.model}",
                f"model.kwargs={{width: {args.width}}}",
                "train.objective=at",
                "train.epochs=1",
                f"train.batch_size={batch}",
                "train.lr=0.05",
                f"train.attack.steps={args.steps}",
                "train.attack.eps=0.1",
                "train.attack.step_size=0.025",
                "train.val_points=0",
                f"train.precision={precision}",
                f"train.channels_last={str(cl).lower()}",
            ],
        )  # fmt: skip
        for label, (precision, cl) in settings.items()
    }
    tight: dict[str, list[tuple[float, float]]] = {k: [] for k in cfgs}
    loose: dict[str, list[tuple[float, float]]] = {k: [] for k in cfgs}
    loop: dict[str, list[tuple[float, float]]] = {k: [] for k in cfgs}
    for _ in range(args.repeats):  # interleaved (and both precisions per repeat): load hits all
        for label, cfg in cfgs.items():
            tight[label].append(tight_epoch(splits, cfg, args.steps))
            loop[label].append(fit_epoch(splits, cfg))
            loose[label].append(loose_epoch(splits, cfg, args.steps))
    for label in cfgs:
        for i, what in ((0, "wall"), (1, "cpu")):
            t = statistics.median(r[i] for r in tight[label])
            f = statistics.median(r[i] for r in loop[label])
            lo = statistics.median(r[i] for r in loose[label])
            per_rep = [fr[i] / tr[i] for fr, tr in zip(loop[label], tight[label], strict=True)]
            print(f"{label} {what}: tight floor {t:.3f}s, fit {f:.3f}s -> fit/tight "
                  f"{f / t:.3f} (per repeat {', '.join(f'{r:.3f}' for r in per_rep)}; target "
                  f"<= 1.10); loose floor {lo:.3f}s -> fit/loose {f / lo:.3f}")  # fmt: skip
        rate = args.batches * batch / statistics.median(r[0] for r in loop[label])
        print(f"{label}: {rate:.0f} img/s")
    # the speed of bf16 + channels-last relative to fp32: one AT epoch through fit, same repeat
    for i, what in ((0, "wall"), (1, "cpu")):
        per_rep = [
            a[i] / b[i] for a, b in zip(loop["fp32"], loop["bf16+channels_last"], strict=True)
        ]
        print(f"fp32 / bf16+channels_last time per AT step ({what}): "
              f"{statistics.median(per_rep):.2f} (per repeat "
              f"{', '.join(f'{r:.2f}' for r in per_rep)})")  # fmt: skip


if __name__ == "__main__":
    main()

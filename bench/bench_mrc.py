"""Benchmark: MRC cost relative to the forward+backward floor.

ratio = time(MRC of every module) / (passes × modules × floor), where floor is the measured
time of one forward+backward pass over the fixed set (batch by batch, cross-entropy,
``loss.backward()`` into every parameter, eval mode). MRC's ascent needs only the gradient of one
weight (earlier layers' weight gradients are skipped) but adds one forward pass per pass to
measure the loss after the projection. Target: ratio ≤ 1.15.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_mrc.py [--width 16] [--points 512] [--passes 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fortify.models import create
from fortify.rift.mrc import compute_mrc, weight_modules


def floor_time(model, x, y, batch_size: int, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(x), batch_size):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[i : i + batch_size]), y[i : i + batch_size]).backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--points", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--passes", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create("small-resnet", num_classes=10, in_channels=1, width=args.width).eval()
    x = torch.rand(args.points, 1, args.size, args.size)
    y = torch.randint(0, 10, (args.points,))
    mods = weight_modules(model)
    floor_time(model, x, y, args.batch_size, repeats=1)  # warm-up
    floor = floor_time(model, x, y, args.batch_size)
    t0 = time.perf_counter()
    report = compute_mrc(model, x, y, passes=args.passes, batch_size=args.batch_size)
    total = time.perf_counter() - t0
    ratio = total / (args.passes * len(mods) * floor)
    print(
        f"small-resnet width {args.width}, {args.points} points {args.size}×{args.size}, batch "
        f"{args.batch_size}, {len(mods)} modules, {args.passes} passes, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"floor (fwd+bwd over the set): {floor:.3f} s; MRC total {total:.1f} s")
    print(f"ratio = {ratio:.3f} (target <= 1.15); least critical: {report.sorted()[0].name}")


if __name__ == "__main__":
    main()

"""Benchmark: time of one AT+FSR training step ÷ one AT training step (ResNet-18, 32×32).

Both steps are ``fortify.train`` objective steps (PGD-10 inner attack in eval mode, then the
train-mode update with FSR's auxiliary losses), on random CIFAR-shaped data, CPU, fp32.
Target: ratio ≤ 1.15. By default the backbone is narrowed (``--width 16``) to fit a shared
CPU; the FSR hidden width is scaled with it (``--hidden`` default = 64·width/64) so the block
keeps the release's size relative to the backbone. ``--width 64 --hidden 64`` is the paper's
configuration.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_fsr.py --width 16 --batch 64 --steps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def make_step(model, tc, device):
    from fortify.train import get_objective
    from fortify.train.objectives import StepContext

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    ctx = StepContext(
        cfg=tc,
        optimizer=opt,
        device=device,
        params=params,
        module=model,
        generator=torch.Generator(device=device).manual_seed(0),
    )
    objective = get_objective(tc.objective, tc)

    def step(x, y):
        ctx.train_mode(model)
        objective.train_step(model, x, y, ctx)

    return step


def time_steps(step, x, y, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step(x, y)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 width (paper: 64)")
    ap.add_argument("--hidden", type=int, default=None, help="FSR hidden width (default: width)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--steps", type=int, default=5, help="timed steps per model (interleaved rounds)"
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--objective", default="at")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from fortify.config.schema import TrainConfig
    from fortify.defenses.fsr import attach_fsr
    from fortify.models import create

    hidden = args.hidden or max(1, 64 * args.width // 64)
    device = torch.device("cpu")
    tc = TrainConfig(objective=args.objective)
    tc.attack.steps = args.attack_steps
    torch.manual_seed(0)
    base = create("resnet18", num_classes=10, width=args.width)
    torch.manual_seed(0)
    fsr = attach_fsr(
        create("resnet18", num_classes=10, width=args.width),
        "layer4",
        10,
        (3, 32, 32),
        hidden=hidden,
    )
    x = torch.rand(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    step_base, step_fsr = make_step(base, tc, device), make_step(fsr, tc, device)
    time_steps(step_base, x, y, args.warmup, 0)
    time_steps(step_fsr, x, y, args.warmup, 0)
    t_base, t_fsr = [], []
    for _ in range(args.steps):  # interleave to share machine-load drift between both
        t_base += time_steps(step_base, x, y, 0, 1)
        t_fsr += time_steps(step_fsr, x, y, 0, 1)
    # the machine is shared: the minimum is the least-disturbed measurement of each step
    mb, mf = min(t_base), min(t_fsr)
    result = {
        "backbone": f"resnet18 width {args.width} (paper: 64)",
        "fsr_hidden": hidden,
        "batch": args.batch,
        "objective": args.objective,
        "attack_steps": args.attack_steps,
        "threads": torch.get_num_threads(),
        "step_s_at_min": round(mb, 4),
        "step_s_at_fsr_min": round(mf, 4),
        "ratio": round(mf / mb, 4),
        "ratio_of_medians": round(statistics.median(t_fsr) / statistics.median(t_base), 4),
        "target": 1.15,
        "all_at": [round(t, 4) for t in t_base],
        "all_at_fsr": [round(t, 4) for t in t_fsr],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

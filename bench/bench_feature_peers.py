"""Benchmark: one AT step with each feature-level defence ÷ one plain AT step, next to FLOP ratios.

For FD, CAS, CIFS (and FSR for reference), placed as in ``configs/fsr/cifar10/resnet18-at-*.yaml``,
the script times ``fortify.train`` AT steps (PGD-10 inner attack in eval mode, then the
train-mode update with the defence's auxiliary losses) on random CIFAR-shaped data, CPU, fp32,
interleaving the models so machine-load drift hits all of them. Times are the process's CPU
time per step (``time.process_time``; with one thread this is what the step costs, and it is far
less disturbed than wall time on a shared, oversubscribed machine), minimum over the rounds;
wall-time minima are printed too.

It prints, per defence, the time ratio to plain AT and two FLOP ratios (2 FLOPs per
multiply-add, ``torch.utils.flop_counter``): ``step_flop_ratio``, the FLOPs one whole AT step
executes (the inner attack's ten input-gradient passes and the update, backward included;
``fortify.analysis.cost.count_call_flops``), and ``forward_flop_ratio``, one eval-mode forward
(``fortify analyze``'s Table 7 count). The target is on the step ratio — the step is what is
timed: time ratio ÷ step-FLOP ratio ≤ 1.15 (the defence costs no more than its arithmetic).
The two differ for blocks whose backward costs more than a convolution's relative to their
forward: an input-gradient pass through a convolution costs one forward-equivalent, through
FD's fused attention two and a half (five products — the scores recomputed, dP, dV, dQ, dK —
against the forward's two).
For FD it also prints ``minimal_step_flop_ratio``: the step's FLOPs without the zero-padded
products and the recomputed scores that the fused CPU attention kernel executes on top of the
method's own arithmetic (``fd_minimal_flops``), and the time ratio over it.
The backbone is narrowed by default (``--width 16``); FSR's hidden width scales with it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_feature_peers.py --width 16 --batch 32 --steps 5
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_fsr import make_step

PEERS = ("fsr", "fd", "cas", "cifs")


def fd_minimal_flops(ops: dict[str, int]) -> float:
    """An FD step's FLOPs without what the fused CPU attention kernel adds to the method's own
    arithmetic (θ, φ of width d = C/2 zero-padded to v's width C; the scores recomputed in the
    backward): its forward counts 2 products of width C where QKᵀ needs d (×3/4), its backward 5
    where dP, dV (width C) and dQ, dK (width d) need 3 (×3/5). Valid for FD's default
    ``embed_ratio`` 0.5."""
    fwd = sum(v for k, v in ops.items() if k.endswith("flash_attention_for_cpu"))
    bwd = sum(v for k, v in ops.items() if k.endswith("flash_attention_for_cpu_backward"))
    return sum(ops.values()) - fwd * (1 - 3 / 4) - bwd * (1 - 3 / 5)


def build(kind: str, width: int):
    from fortify.config.schema import DefenseConfig, ModelConfig
    from fortify.factory import build_model

    defences = {
        "at": [],
        "fsr": [DefenseConfig("fsr", ["layer4"], {"hidden": max(1, width)})],
        "fd": [DefenseConfig("fd", [])],
        "cas": [DefenseConfig("cas", ["layer4.0", "layer4.1"])],
        "cifs": [DefenseConfig("cifs", ["layer4.0", "layer4.1"])],
    }[kind]
    torch.manual_seed(0)
    mcfg = ModelConfig(name="resnet18", kwargs={"width": width})
    return build_model(mcfg, defences, 10, (3, 32, 32))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 width (paper: 64)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (interleaved)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset")
    args = ap.parse_args()
    from fortify.analysis.cost import call_flops_by_op, cost_report
    from fortify.config.schema import TrainConfig

    peers = [p for p in args.peers.split(",") if p]
    tc = TrainConfig(objective="at")
    tc.attack.steps = args.attack_steps
    device = torch.device("cpu")
    models = {k: build(k, args.width) for k in ["at", *peers]}
    flops = {k: cost_report(m, (3, 32, 32)).flops_total for k, m in models.items()}
    steps = {k: make_step(m, tc, device) for k, m in models.items()}
    x = torch.rand(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    by_op = {k: call_flops_by_op(lambda s=step: s(x, y)) for k, step in steps.items()}
    step_flops = {k: sum(ops.values()) for k, ops in by_op.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step(x, y)
    cpu: dict[str, list[float]] = {k: [] for k in models}
    wall: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.steps):
        for k, step in steps.items():
            c0, w0 = time.process_time(), time.perf_counter()
            step(x, y)
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    base = min(cpu["at"])  # the minimum is the least-disturbed step
    rows = {}
    for k in peers:
        t_ratio = min(cpu[k]) / base
        s_ratio = step_flops[k] / step_flops["at"]
        rows[k] = {
            "cpu_s_min": round(min(cpu[k]), 4),
            "wall_s_min": round(min(wall[k]), 4),
            "time_ratio": round(t_ratio, 4),
            "wall_ratio": round(min(wall[k]) / min(wall["at"]), 4),
            "step_flop_ratio": round(s_ratio, 4),
            "forward_flop_ratio": round(flops[k] / flops["at"], 4),
            "time_over_step_flop_ratio": round(t_ratio / s_ratio, 4),
            "within_target": t_ratio / s_ratio <= 1.15,
        }
        if k == "fd":
            minimal = fd_minimal_flops(by_op["fd"]) / step_flops["at"]
            rows[k]["minimal_step_flop_ratio"] = round(minimal, 4)
            rows[k]["time_over_minimal_step_flop_ratio"] = round(t_ratio / minimal, 4)
    result = {
        "backbone": f"resnet18 width {args.width} (paper: 64)",
        "batch": args.batch,
        "attack_steps": args.attack_steps,
        "threads": torch.get_num_threads(),
        "at_cpu_s_min": round(base, 4),
        "at_wall_s_min": round(min(wall["at"]), 4),
        "at_step_gflops": round(step_flops["at"] / 1e9, 3),
        "target": "time_ratio / step_flop_ratio <= 1.15",
        "peers": rows,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

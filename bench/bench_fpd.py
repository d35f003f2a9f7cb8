"""FPD overhead benchmark (a script, not a test).

Measures one training-style forward + backward (CE on the output, parameter gradients) of an
FPD-wrapped backbone divided by the same for the plain backbone on the same batch. FPD runs the
backbone twice (front pass for the pyramid, back pass on the restored image) plus the decoder
and the denoising operations, so the expected ratio is ≈ 2× (a bit more for the decoder).
Also reports the cost of one full ``fpd`` objective phase-2 step (two updates) per image.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_fpd.py [--model small-resnet --width 16
       --decoder-width 8 16 32 --batch 64 --size 28 --channels 1 --repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import fortify.models  # noqa: F401
from fortify.config.schema import TrainConfig
from fortify.defenses.fpd import build_fpd
from fortify.models import create
from fortify.train.objectives import StepContext, get_objective


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small-resnet")
    p.add_argument("--width", type=int, default=16)
    p.add_argument(
        "--decoder-width",
        type=int,
        nargs="+",
        default=[32],
        help="one or more decoder widths (one row each, same plain baseline)",
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--stem", default="cifar")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    shape = (a.channels, a.size, a.size)
    x = torch.rand(a.batch, *shape)
    y = torch.randint(0, 10, (a.batch,))

    def backbone() -> torch.nn.Module:
        return create(a.model, num_classes=10, in_channels=a.channels, width=a.width, stem=a.stem)

    def step(model):
        def run() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        return run

    plain = backbone().train()
    t_plain = _best_of(step(plain), a.repeats)
    f_plain = _flops(plain, x)
    n_plain = sum(p.numel() for p in plain.parameters())
    print(
        f"{a.model} width {a.width} ({a.stem} stem), batch {a.batch}×{shape}, "
        f"threads {torch.get_num_threads()}; plain: {n_plain:,} parameters, "
        f"forward+backward {1000 * t_plain:.1f} ms"
    )
    print(
        "decoder width | FPD params | fwd+bwd ms | time ratio | FLOP ratio | time ÷ FLOP "
        "| fpd objective step ÷ plain step"
    )
    for width in a.decoder_width:
        fpd = build_fpd(
            backbone(),
            model_name=a.model,
            at=[],
            options={"width": width},
            num_classes=10,
            image_shape=shape,
        ).train()
        t_fpd = _best_of(step(fpd), a.repeats)
        flop_ratio = _flops(fpd, x) / f_plain
        cfg = TrainConfig(objective="fpd", optimizer="adam", lr=1e-4, options={"threshold": 1e9})
        obj = get_objective("fpd", cfg)
        params = list(fpd.parameters())
        ctx = StepContext(
            cfg=cfg,
            optimizer=torch.optim.Adam(params, lr=1e-4),
            device=torch.device("cpu"),
            params=params,
            module=fpd,
        )
        t_obj = _best_of(
            lambda fpd=fpd, ctx=ctx, obj=obj: obj.train_step(fpd, x, y, ctx), a.repeats
        )
        n_fpd = sum(p.numel() for p in fpd.parameters())
        ratio = t_fpd / t_plain
        print(
            f"{width:>13} | {n_fpd:>10,} | {1000 * t_fpd:>10.1f} | {ratio:>9.2f}x | "
            f"{flop_ratio:>9.2f}x | {ratio / flop_ratio:>11.2f} | {t_obj / t_plain:.2f}x"
        )
    print(
        "time ratio: FPD forward+backward ÷ plain (≈ 2× expected for the two passes plus the "
        "decoder); FLOP ratio: the same for forward FLOPs (FlopCounterMode), i.e. what the "
        "architecture costs; time ÷ FLOP ≈ 1 means no overhead beyond the extra arithmetic"
    )


def _flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


if __name__ == "__main__":
    main()

"""FPD overhead benchmark (a script, not a test).

Measures one training-style forward + backward (CE on the output, parameter gradients) of an
FPD-wrapped backbone divided by the same for the plain backbone on the same batch. FPD runs the
backbone twice (front pass for the pyramid, back pass on the restored image) plus the decoder
and the denoising operations, so the expected ratio is ≈ 2× (a bit more for the decoder).
Also reports the cost of one full ``fpd`` objective phase-2 step (two updates) per image.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_fpd.py [--model small-resnet --width 16
       --decoder-width 32 --batch 64 --size 28 --channels 1 --repeats 5]
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
    p.add_argument("--decoder-width", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--stem", default="cifar")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    shape = (a.channels, a.size, a.size)
    plain = create(
        a.model, num_classes=10, in_channels=a.channels, width=a.width, stem=a.stem
    ).train()
    fpd = build_fpd(
        create(a.model, num_classes=10, in_channels=a.channels, width=a.width, stem=a.stem),
        model_name=a.model,
        at=[],
        options={"width": a.decoder_width},
        num_classes=10,
        image_shape=shape,
    ).train()
    x = torch.rand(a.batch, *shape)
    y = torch.randint(0, 10, (a.batch,))

    def step(model):
        def run() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        return run

    t_plain = _best_of(step(plain), a.repeats)
    t_fpd = _best_of(step(fpd), a.repeats)
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
    t_obj = _best_of(lambda: obj.train_step(fpd, x, y, ctx), a.repeats)
    n_plain = sum(p.numel() for p in plain.parameters())
    n_fpd = sum(p.numel() for p in fpd.parameters())
    print(
        f"{a.model} width {a.width} ({a.stem} stem), FPD decoder width {a.decoder_width}, "
        f"batch {a.batch}×{shape}, threads {torch.get_num_threads()}"
    )
    print(f"parameters: plain {n_plain:,}  FPD {n_fpd:,} (+{n_fpd - n_plain:,} decoder)")
    print(
        f"forward+backward  plain {1000 * t_plain:8.1f} ms   FPD {1000 * t_fpd:8.1f} ms   "
        f"ratio {t_fpd / t_plain:.2f}x  (expected ≈ 2x)"
    )
    print(
        f"fpd objective phase-2 step (2 updates + fresh restore) {1000 * t_obj:8.1f} ms "
        f"= {t_obj / t_plain:.2f}x a plain step"
    )


if __name__ == "__main__":
    main()

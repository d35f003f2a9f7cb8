"""How much of a training step does the data pipeline cost?

Times a fixed number of training batches of a small CNN on Fashion-MNIST (falls back to the
bundled digits when Fashion-MNIST is not installed) and, with identical loader settings, the
time spent only iterating the :class:`fortify.data.TensorLoader`. Prints the pipeline's share of
the training time (target: <= 3 %) for clean SGD training and, when ``fortify.attacks.pgd`` is
available, PGD-10 adversarial training.

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/bench_data_pipeline.py [--batches 40]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fortify.data import TensorLoader, load_dataset
from fortify.errors import DataError
from fortify.models import create


def limited(loader: TensorLoader, n: int):
    for i, batch in enumerate(loader):
        if i == n:
            return
        yield batch


def time_loader_only(loader: TensorLoader, n: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds to produce ``n`` batches (nothing else)."""
    best = float("inf")
    for r in range(repeats):
        loader.set_epoch(r)
        t = time.perf_counter()
        for _batch in limited(loader, n):
            pass
        best = min(best, time.perf_counter() - t)
    return best


def time_training(loader: TensorLoader, model, n: int, pgd_steps: int = 0, eps: float = 0.1):
    """Seconds for ``n`` SGD steps including the loader (one warm-up batch excluded)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    attack = None
    if pgd_steps:
        from fortify.attacks import pgd as attack
    loader.set_epoch(5)
    it = iter(limited(loader, n + 1))

    def step(x, y):
        if attack is not None:
            model.eval()
            x = attack(model, x, y, eps=eps, steps=pgd_steps, step_size=eps / 4)
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(*next(it))  # warm-up
    t = time.perf_counter()
    for x, y in it:
        step(x, y)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=40, help="clean-training batches to time")
    ap.add_argument("--pgd-batches", type=int, default=6, help="PGD-10 AT batches (0: skip)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    try:
        splits = load_dataset("fashion-mnist", val_size=5000)
    except DataError:
        splits = load_dataset("digits", val_size=300)
    c = splits.in_channels
    shape = tuple(splits.train.images.shape)
    print(f"dataset {splits.name}: train {shape}, threads {args.threads}")

    t = time.perf_counter()
    TensorLoader(splits.train, args.batch_size, shuffle=True, device="cpu")
    print(f"loader construction (one-time device cache): {1e3 * (time.perf_counter() - t):.1f} ms")

    for augment in ("none", "crop-flip"):
        loader = TensorLoader(
            splits.train, args.batch_size, shuffle=True, augment=augment, device="cpu", seed=0
        )
        n = min(args.batches, len(loader) - 1)
        t_data = time_loader_only(loader, n)
        model = create("small-cnn", splits.num_classes, c)
        t_train = time_training(loader, model, n)
        print(
            f"clean SGD, augment={augment:9s}: {n} batches  train {t_train:7.3f} s  "
            f"loader only {t_data:6.4f} s  ({1e3 * t_data / n:.3f} ms/batch)  "
            f"data share {100 * t_data / t_train:5.2f} %"
        )
        if args.pgd_batches and augment == "none":
            try:
                import fortify.attacks as attacks

                has_pgd = hasattr(attacks, "pgd")
            except ImportError:
                has_pgd = False
            if has_pgd:
                m = args.pgd_batches
                t_adv = time_training(loader, model, m, pgd_steps=10, eps=splits.default_eps)
                t_data_m = time_loader_only(loader, m)
                print(
                    f"PGD-10 AT,  augment={augment:9s}: {m} batches  train {t_adv:7.3f} s  "
                    f"loader only {t_data_m:6.4f} s  data share {100 * t_data_m / t_adv:5.2f} %"
                )
            else:
                print("PGD-10 AT skipped: fortify.attacks.pgd not available")


if __name__ == "__main__":
    main()

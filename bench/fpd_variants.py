"""Which FPD variants train at CPU scale? (a script, not a test)

Trains the ``fortify replicate fpd-table`` FPD configuration briefly (default: 4,000
Fashion-MNIST images, 2 epochs) once per variant of the two options that decide whether FPD
trains at all here — ``bn_stats`` (the back pass's BatchNorm statistics shared with the front
pass as in the release, or kept per pass) and ``denoise_scale`` (the paper's ``/ (H·W)`` or
fortify's ``/ (C·H·W)``) — and reports, on 500 validation images: accuracy in eval mode (what
every evaluation uses), accuracy in train mode (batch statistics), the restoration MSE and the
RMS of the first pyramid level at initialisation (the cubic denoising term's blow-up).

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/fpd_variants.py [--train-subset 4000
       --epochs 2 --variants shared/n per-pass/n per-pass/nc shared/nc]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from fortify.data import load_dataset
from fortify.defenses.fpd import FPD, find_fpd
from fortify.factory import build_model
from fortify.replicate import fpd_table
from fortify.train import fit


def _first_level_rms(model: FPD, x: torch.Tensor) -> float:
    with torch.no_grad(), model._denoise_hooks(), model._collect_hooks():
        model.net(x)
        return float(model._pyramid[0].pow(2).mean().sqrt())


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool) -> tuple:
    fpd = find_fpd(model)
    model.train(train)
    with torch.no_grad():
        out = fpd.forward_full(x)
    model.eval()
    return float((out.bounded.argmax(1) == y).float().mean()), float(F.mse_loss(out.restored, x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-subset", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--variants",
        nargs="+",
        default=["shared/n", "per-pass/n", "per-pass/nc", "shared/nc"],
        help="bn_stats/denoise_scale pairs",
    )
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    rep = argparse.ArgumentParser()
    fpd_table.add_arguments(rep)
    ra = rep.parse_args(["--train-subset", str(a.train_subset), "--epochs-fpd", str(a.epochs)])
    splits = load_dataset(
        "fashion-mnist", None, val_size=5000, split_seed=0, train_subset=a.train_subset
    )
    x, y = splits.val.head(500).floats()
    print(
        f"FPD ({ra.decoder_width}-wide decoder) on small-resnet width {ra.width}, "
        f"{a.train_subset} Fashion-MNIST images, {a.epochs} epochs, threads "
        f"{torch.get_num_threads()}; accuracy on 500 validation images"
    )
    print(f"{'variant':<14} {'c2 RMS@init':>11} {'eval acc':>9} {'train-mode acc':>15} {'MSE':>7}")
    for variant in a.variants:
        bn_stats, scale = variant.split("/")
        cfg = fpd_table._configs(ra)["fpd"]
        cfg.defenses[0].options.update({"bn_stats": bn_stats, "denoise_scale": scale})
        torch.manual_seed(0)
        init = build_model(cfg.model, cfg.defenses, splits.num_classes, splits.image_shape)
        rms = _first_level_rms(find_fpd(init).train(), x[:128])
        with tempfile.TemporaryDirectory() as tmp:
            res = fit(cfg, Path(tmp) / "run", splits=splits, progress=False)
        acc_eval, mse = _accuracy(res.model, x, y, train=False)
        acc_train, _ = _accuracy(res.model, x, y, train=True)
        print(f"{variant:<14} {rms:>11.2f} {acc_eval:>9.3f} {acc_train:>15.3f} {mse:>7.4f}")


if __name__ == "__main__":
    main()

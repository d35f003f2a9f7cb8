"""Which FPD variants train at CPU scale? (a script, not a test)

Trains the ``fortify replicate fpd-table`` FPD configuration (the release structure: raw
pyramid, linear decoder, separate phase-1 optimiser, the release's T = 3) briefly (default:
4,000 Fashion-MNIST images, 2 epochs) once per variant and seed, and reports on 500 validation
images: accuracy in eval mode (what every evaluation uses), accuracy in train mode (batch
statistics), the restoration MSE, the fraction of phase-2 steps in the last epoch and the RMS
of the first pyramid level at initialisation. A variant is ``bn_stats/denoise_scale``, optionally
followed by ``/decoder`` (``linear`` or ``activated``) and ``/T=<threshold>`` in any order.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/fpd_variants.py [--train-subset 4000
       --epochs 2 --seeds 0 1 --threshold 3 --variants shared/n per-pass/n per-pass/nc shared/nc]
"""

from __future__ import annotations

import argparse
import json
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
    with torch.no_grad():
        return float(model.pyramid_features(x)[0].pow(2).mean().sqrt())


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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threshold", type=float, default=3.0, help="T (release: 3)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["shared/n", "per-pass/n", "per-pass/nc", "shared/nc"],
        help="bn_stats/denoise_scale[/decoder] combinations",
    )
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rep = argparse.ArgumentParser()
    fpd_table.add_arguments(rep)
    ra = rep.parse_args(
        [
            "--train-subset",
            str(a.train_subset),
            "--epochs-fpd",
            str(a.epochs),
            "--threshold",
            str(a.threshold),
        ]
    )
    splits = load_dataset(
        "fashion-mnist", None, val_size=5000, split_seed=0, train_subset=a.train_subset
    )
    x, y = splits.val.head(500).floats()
    print(
        f"FPD ({ra.decoder_width}-wide decoder) on small-resnet width {ra.width}, "
        f"{a.train_subset} Fashion-MNIST images, {a.epochs} epochs, T = {a.threshold:g}, "
        f"threads {torch.get_num_threads()}; accuracy on 500 validation images"
    )
    head = f"{'variant':<22} {'seed':>4} {'c2 RMS@init':>11} {'eval acc':>9} {'train-mode acc':>15}"
    print(head + f" {'MSE':>8} {'phase2':>7}")
    rows = []
    for variant in a.variants:
        parts = variant.split("/")
        opts = {"bn_stats": parts[0], "denoise_scale": parts[1]}
        threshold = a.threshold
        for extra in parts[2:]:
            if extra.startswith("T="):
                threshold = float(extra[2:])
            else:
                opts["decoder"] = extra
        for seed in a.seeds:
            cfg = fpd_table._configs(ra)["fpd"]
            cfg.seed = seed
            cfg.defenses[0].options.update(opts)
            cfg.train.options["threshold"] = threshold
            torch.manual_seed(seed)
            init = build_model(cfg.model, cfg.defenses, splits.num_classes, splits.image_shape)
            rms = _first_level_rms(find_fpd(init).train(), x[:128])
            with tempfile.TemporaryDirectory() as tmp:
                res = fit(cfg, Path(tmp) / "run", splits=splits, progress=False)
            acc_eval, mse = _accuracy(res.model, x, y, train=False)
            acc_train, _ = _accuracy(res.model, x, y, train=True)
            phase2 = float(res.history[-1].get("train/fpd_phase2", float("nan")))
            per_epoch = [
                {k: h.get(f"train/{k}") for k in ("fpd_phase2", "fpd_l2", "acc")}
                for h in res.history
            ]
            rows.append(
                dict(
                    variant=variant,
                    seed=seed,
                    rms=rms,
                    acc_eval=acc_eval,
                    acc_train=acc_train,
                    mse=mse,
                    phase2=phase2,
                    threshold=threshold,
                    history=per_epoch,
                )
            )
            print(
                f"{variant:<22} {seed:>4} {rms:>11.2f} {acc_eval:>9.3f} {acc_train:>15.3f} "
                f"{mse:>8.4f} {phase2:>7.2f}",
                flush=True,
            )
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

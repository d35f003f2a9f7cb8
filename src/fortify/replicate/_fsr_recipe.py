"""The CPU-scale FSR training recipe of ``fortify replicate fsr-table1``, which the feature
tables (:mod:`fortify.replicate._feature_table`) build on: L∞ ε, the default sizes, the
``--precision`` option, the ExperimentConfig of a row and training seed, and the learning-rate
schedule in words for the pages."""

from __future__ import annotations

import argparse
from typing import Any

from fortify.replicate.common import seeds_from_args

EPS = 0.1

# Defaults chosen from measured costs on the shared 2-core machine (see docs/fsr.md).
DEFAULTS = {
    "epochs": 5,
    "train_subset": 10000,
    "width": 4,
    "test_points": 2000,
    "aa_points": 500,
    "batch_size": 128,
    "attack_steps": 7,
    "fsr_hidden": 8,
    "val_points": 500,
}


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision``: fp32 (default) or bf16 (+ channels-last) training; evaluation is fp32."""
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="training precision: fp32 (default) or bf16 autocast + channels-last (≈ 2× faster "
        "per AT step on AVX-512-BF16 CPUs but it cost robustness, docs/results/bf16_parity.md); "
        "evaluation is always fp32",
    )


def _precision(args: argparse.Namespace) -> str:
    return str(getattr(args, "precision", "fp32"))


def precision_text(args: argparse.Namespace, note: str = "") -> str:
    """How the rows trained, for a page's settings (``note`` is added inside the bf16 remark)."""
    if _precision(args) != "bf16":
        return "fp32"
    return (
        "bf16 autocast + channels-last (`--precision bf16`: ≈ 2× faster, but it cost AT "
        f"robustness in docs/results/bf16_parity.md{note})"
    )


def row_config(row: str, args: argparse.Namespace, seed: int | None = None) -> Any:
    """The ExperimentConfig of one row and training seed (Fashion-MNIST, small-resnet, ε = 0.1);
    ``seed`` None: the first of ``--seeds``."""
    from fortify.config.loader import from_dict
    from fortify.config.schema import ExperimentConfig

    objective = row.split("-")[0]
    if seed is None:
        seed = _seeds(args)[0]
    data = {
        "seed": seed,
        "name": f"fsr-table1-{row}",
        "data": {
            "name": "fashion-mnist",
            "val_size": 1000,
            "train_subset": args.train_subset,
            "augment": "none",
        },
        "model": {"name": "small-resnet", "kwargs": {"width": args.width}},
        "defenses": (
            [{"kind": "fsr", "options": {"hidden": args.fsr_hidden}}]
            if row.endswith("-fsr")
            else []
        ),
        "train": {
            "objective": objective,
            "beta": 6.0,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "multistep",
            "milestones": _milestones(args.epochs),
            "warmup_epochs": _warmup(args.epochs),
            "precision": _precision(args),
            "channels_last": _precision(args) == "bf16",
            "attack": {
                "kind": "pgd",
                "eps": EPS,
                "step_size": 0.25 * EPS,
                "steps": args.attack_steps,
                "random_start": True,
                "bn_mode": "eval",
            },
            "val_points": getattr(args, "val_points", DEFAULTS["val_points"]),
            "select": "last",
        },
        "eval": {"suite": "paper", "eps": EPS, "n_points": args.test_points, "mode": "final"},
    }
    return from_dict(ExperimentConfig, data)


def _seeds(args: argparse.Namespace) -> list[int]:
    """``--seed N`` if given, else ``--seeds``."""
    return [args.seed] if getattr(args, "seed", None) is not None else seeds_from_args(args)


def _milestones(epochs: int) -> list[int]:
    return [max(1, int(epochs * 0.75)), max(1, int(epochs * 0.9))]


def _warmup(epochs: int) -> int:
    return 1 if epochs > 2 else 0


def lr_schedule_text(epochs: int, lr: float = 0.05, gamma: float = 0.1) -> str:
    """What the multistep schedule does per epoch, e.g. for 4 epochs: ``epoch 1: linear
    warm-up to 0.05; epochs 2–3: 0.05; epoch 4: 0.0005 (×0.01: both milestones at epoch 4)``."""
    ms, warm = _milestones(epochs), _warmup(epochs)
    parts: list[str] = []
    per_epoch = [lr * gamma ** sum(1 for m in ms if e >= m) for e in range(epochs)]
    e = 0
    while e < epochs:
        if e < warm:
            parts.append(f"epoch {e + 1}: linear warm-up to {per_epoch[e]:g}")
            e += 1
            continue
        f = e
        while f + 1 < epochs and f + 1 >= warm and per_epoch[f + 1] == per_epoch[e]:
            f += 1
        span = f"epoch {e + 1}" if f == e else f"epochs {e + 1}–{f + 1}"
        factor = per_epoch[e] / lr
        note = "" if factor == 1 else f" (×{factor:g})"
        parts.append(f"{span}: lr {per_epoch[e]:g}{note}")
        e = f + 1
    return (
        "; ".join(parts)
        + f" — milestones at the starts of epochs {', '.join(str(m + 1) for m in ms)} "
        f"(max(1, int(0.75·{epochs})) and max(1, int(0.9·{epochs})), 0-based {ms}), ×{gamma:g} each"
    )

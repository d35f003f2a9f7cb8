"""What a training run is made of, built before anything is written: data, model,
trainable parameters, optimiser, batches, learning-rate schedule and GradScaler.

:func:`build` runs first in :func:`fortify.train.fit`: a bad model name, option, batch size or
model/data mismatch fails here with a :class:`~fortify.errors.ConfigError`, before a run
directory is created.
"""

from __future__ import annotations

import difflib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fortify.config.schema import ExperimentConfig
from fortify.data.base import DataSplits
from fortify.data.loader import TensorLoader
from fortify.errors import ConfigError, FortifyError
from fortify.runs.rundir import Mode
from fortify.train.distributed import DistInfo
from fortify.train.optim import LRSchedule, build_optimizer

log = logging.getLogger(__name__)


@dataclass
class Built:
    """The parts of a training run (see :func:`build`).

    Attributes:
        splits: the data (train/val/test splits as uint8 images).
        module: the model on its device (unwrapped: no DDP).
        params: its trainable parameters (``train.trainable`` / ``train.freeze_bn``).
        optimizer: the optimiser over ``params``.
        loader: this process's shard of the training batches.
        schedule: the learning-rate schedule (per step, from the epoch and the step in it).
        scaler: the fp16 GradScaler, None for other precisions.
    """

    splits: DataSplits
    module: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    loader: TensorLoader
    schedule: LRSchedule
    scaler: torch.amp.GradScaler | None


def build(
    cfg: ExperimentConfig,
    mode: Mode,
    info: DistInfo,
    splits: DataSplits | None = None,
    model: nn.Module | None = None,
) -> Built:
    """Load the data (unless ``splits`` is given), build and probe the model (unless ``model``
    is given; a resumed run's checkpoint replaces pretrained source weights), and make the
    optimiser, this process's loader (``train.batch_size // world_size`` images per batch),
    the schedule and the scaler. Nothing is written.

    Raises:
        ConfigError: the batch is smaller than the number of processes, there are no
            training batches, ``train.select`` needs validation images and none are scored
            (:func:`check_selection`), or the model does not map the data's images to (1, K)
            logits.
    """
    from fortify.data import load_from_config

    tc = cfg.train
    device = info.device
    if splits is None:
        splits = load_from_config(cfg.data)
    check_selection(tc.select, tc.val_points, len(splits.val))
    if tc.batch_size % info.world_size:
        log.warning(
            "train.batch_size %d is not divisible by %d processes; each uses %d",
            tc.batch_size, info.world_size, tc.batch_size // info.world_size,
        )  # fmt: skip
    per_rank = tc.batch_size // info.world_size
    if per_rank < 1:
        raise ConfigError(
            f"train.batch_size {tc.batch_size} is smaller than the number of processes "
            f"({info.world_size}); it is the global batch size"
        )
    if model is None:
        from fortify.factory import build_model

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        model = build_model(
            cfg.model, cfg.defenses, splits.num_classes, splits.image_shape,
            load_weights=mode != "resume",
        )  # fmt: skip
    probe_model(model, splits.image_shape, splits.num_classes)

    module = model.to(device)
    if tc.channels_last:
        module = module.to(memory_format=torch.channels_last)
    params = apply_trainable(module, tc.trainable, tc.freeze_bn)
    optimizer = build_optimizer(params, tc)
    augment = cfg.data.augment if cfg.data.augment != "auto" else splits.default_augment
    loader = TensorLoader(
        splits.train, per_rank, shuffle=True, drop_last=tc.drop_last, augment=augment,
        crop_padding=cfg.data.crop_padding, device=device, seed=cfg.seed,
        rank=info.rank, world_size=info.world_size,
    )  # fmt: skip
    if len(loader) == 0:
        raise ConfigError(
            f"no training batches: {len(splits.train)} images, batch {per_rank} per process, "
            f"drop_last={tc.drop_last}"
        )
    schedule = LRSchedule(optimizer, tc, len(loader))
    scaler = torch.amp.GradScaler(device.type) if tc.precision == "fp16" else None
    return Built(splits, module, params, optimizer, loader, schedule, scaler)


def check_selection(select: str, val_points: int, val_images: int) -> None:
    """Refuse (:class:`ConfigError`) a ``best`` checkpoint selected on validation accuracy
    (``train.select`` robust / clean) when no validation image is scored: training would
    write no ``best`` checkpoint, and ``fortify eval RUN`` would fail afterwards."""
    if select == "last" or min(val_points, val_images) > 0:
        return
    raise ConfigError(
        f"train.select={select!r} picks the 'best' checkpoint by validation accuracy, but no "
        f"validation image would be scored (train.val_points={val_points}, validation split: "
        f"{val_images} images, set by data.val_size); set train.select=last (best = the last "
        "epoch), or give validation points (train.val_points >= 1 and data.val_size >= 1)"
    )


def apply_trainable(
    model: nn.Module, prefixes: Sequence[str], freeze_bn: bool
) -> list[nn.Parameter]:
    """Set ``requires_grad`` from ``train.trainable`` / ``train.freeze_bn``; return trainables.

    A parameter is trainable when ``prefixes`` is empty or its name equals a prefix or starts
    with ``prefix + "."`` (so ``layer2.1.conv2`` selects ``layer2.1.conv2.weight``). With
    ``freeze_bn`` BatchNorm affine parameters are frozen too.
    """
    names = [n for n, _ in model.named_parameters()]
    for p in prefixes:
        stem = p.rstrip(".")
        if not any(n == stem or n.startswith(stem + ".") for n in names):
            close = difflib.get_close_matches(p, names, n=5, cutoff=0.4)
            raise ConfigError(
                f"train.trainable: prefix {p!r} matches no parameter of the model"
                + (f"; close matches: {', '.join(close)}" if close else "")
            )
    bn_params: set[int] = set()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                bn_params.update(id(q) for q in m.parameters(recurse=False))
    out = []
    for name, param in model.named_parameters():
        stems = [p.rstrip(".") for p in prefixes]
        on = not prefixes or any(name == s or name.startswith(s + ".") for s in stems)
        on = on and id(param) not in bn_params
        param.requires_grad_(on)
        if on:
            out.append(param)
    return out


def probe_model(model: nn.Module, image_shape: Sequence[int], num_classes: int) -> None:
    """One forward pass of a blank image in eval mode (no gradient, no RNG, mode restored):
    a model that cannot process the data's images or returns no (1, K) logits fails here with
    a :class:`ConfigError`, before a run directory is created."""
    was_training = model.training
    shape = tuple(int(v) for v in image_shape)
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros((1, *shape)))
    except FortifyError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"the model cannot process the data's images of shape (C, H, W) = {shape}: "
            f"{first[:300]}; check model.name / model.kwargs (e.g. width >= 1) against the "
            "dataset's image size"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"the model must return logits of shape (N, {num_classes}) for the data's "
            f"{num_classes} classes, got {got} for one image"
        )


__all__ = ["Built", "apply_trainable", "build", "check_selection", "probe_model"]

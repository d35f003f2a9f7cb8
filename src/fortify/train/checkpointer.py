"""The rank-0 writer of a training run's checkpoints: ``last`` (model + training state, written
first so a crash never leaves a checkpoint without its state), ``best``, with the run's
metadata (config, compute record, data, world size) in every sidecar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fortify.config.loader import to_dict
from fortify.config.schema import ExperimentConfig
from fortify.data.base import DataSplits
from fortify.errors import RunDirError
from fortify.runs.rundir import RunDir
from fortify.train.resume import EPOCH_BASE
from fortify.train.state import prune_states, save_state
from fortify.utils.runtime import compute_record


class Checkpointer:
    """Rank-0 writer of ``last``/``best`` checkpoints, training state and metrics."""

    def __init__(
        self,
        run: RunDir,
        cfg: ExperimentConfig,
        splits: DataSplits,
        world_size: int,
        device: str | torch.device = "cpu",
    ):
        self.run = run
        self.cfg = cfg
        self.base_meta = {
            "compute": compute_record(device, cfg.train.precision),
            "config": to_dict(cfg),
            "num_classes": splits.num_classes,
            "image_shape": list(splits.image_shape),
            "seed": cfg.seed,
            "dataset": splits.name,
            "objective": cfg.train.objective,
            "world_size": world_size,
        }
        self.last = Path(run.checkpoint_path("last"))
        self.best = Path(run.checkpoint_path("best"))

    def meta(self, epoch: int, metrics: dict[str, Any], tag: str) -> dict[str, Any]:
        return {
            **self.base_meta,
            "epoch": epoch,
            "epoch_base": EPOCH_BASE,
            "metrics": metrics,
            "tag": tag,
        }

    def save(
        self,
        module: nn.Module,
        epoch: int,
        metrics: dict[str, Any],
        state: dict[str, Any],
        best: bool,
    ) -> None:
        from fortify.runs import save_checkpoint

        written = None
        try:
            written = save_state(self.last, epoch, state)
            save_checkpoint(self.last, module, self.meta(epoch, metrics, "last"))
            written = None  # now part of the 'last' checkpoint
            prune_states(self.last, epoch)
            if best:
                save_checkpoint(self.best, module, self.meta(epoch, metrics, "best"))
        except (RunDirError, OSError, RuntimeError) as exc:
            if written is not None:  # a state file of an epoch 'last' never reached
                written.unlink(missing_ok=True)
            raise RunDirError(
                f"could not write a checkpoint in {str(self.last.parent)!r} ({exc}); the previous "
                "'last' checkpoint is intact — free disk space / fix permissions and resume"
            ) from exc

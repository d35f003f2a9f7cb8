"""The rank-0 writer of a training run's checkpoints: the training state, then ``best`` (when
the epoch improved), then ``last`` (model + training state), with the run's metadata (config,
compute record, data, world size) in every sidecar.

The order makes every crash recoverable: the state is written first, so ``last`` never lacks
its state; ``best`` is written before ``last``, so a crash between them leaves ``last`` at the
previous epoch and a resume retrains the epoch and writes the same ``best`` again (written
after ``last``, a crash in between would leave ``best`` stale or missing for good, since the
resumed state already counts the epoch as saved)."""

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
            if best:  # before 'last': see the module doc
                save_checkpoint(self.best, module, self.meta(epoch, metrics, "best"))
            save_checkpoint(self.last, module, self.meta(epoch, metrics, "last"))
            written = None  # now part of the 'last' checkpoint
            prune_states(self.last, epoch)
        except (RunDirError, OSError, RuntimeError) as exc:
            if written is not None:  # a state file of an epoch 'last' never reached
                written.unlink(missing_ok=True)
            raise RunDirError(
                f"could not write a checkpoint in {str(self.last.parent)!r} ({exc}); the previous "
                "'last' checkpoint is intact — free disk space / fix permissions and resume"
            ) from exc

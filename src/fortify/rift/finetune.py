"""Fine-tune one module's weight on clean data, step 2 of RiFT, through :func:`fortify.train.fit`.

Only ``<module>.weight`` is trainable (``train.trainable``); the objective is clean
cross-entropy (``standard``) with SGD, weight decay on that weight only, and the best epoch is
chosen by clean accuracy on the VALIDATION split (``train.select = clean``).

BatchNorm (``bn=``):

* ``"adapt"`` (default, the authors' release): BatchNorm layers are in train mode, so every
  running mean/variance drifts towards clean-data statistics (they are interpolated in step 3
  as well); BatchNorm affine parameters stay fixed.
* ``"frozen"`` (option): BatchNorm layers stay in eval mode, so the fine-tuned model differs
  from θ_AT in exactly one tensor and keeps the robust BatchNorm statistics.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fortify.config.loader import from_dict, to_dict
from fortify.config.schema import ExperimentConfig
from fortify.data.base import DataSplits
from fortify.errors import ConfigError, check_point_count
from fortify.rift.mrc import get_weight
from fortify.runs.rundir import Mode

log = logging.getLogger(__name__)

BN_MODES = ("frozen", "adapt")


@dataclass
class FinetuneOptions:
    """Fine-tuning hyper-parameters (defaults: the paper's, see docs/rift.md)."""

    epochs: int = 10
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    milestone: int | None = None  # 0-based epoch at which lr *= gamma; None: epochs // 2
    gamma: float = 0.1
    bn: str = "adapt"  # adapt (release) | frozen
    val_points: int | None = None  # validation images for selection; None: the whole split

    def validate(self) -> None:
        if self.bn not in BN_MODES:
            raise ConfigError(
                f"--bn (finetune.bn) must be one of {list(BN_MODES)}, got {self.bn!r}"
            )
        if self.epochs < 1:
            raise ConfigError(f"--epochs (finetune.epochs) must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"--ft-lr (finetune.lr) must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(
                f"--ft-batch-size (finetune.batch_size) must be >= 1, got {self.batch_size}"
            )
        if self.milestone is not None and not 0 <= self.milestone:
            raise ConfigError(f"finetune.milestone must be >= 0, got {self.milestone}")
        for name in ("momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"finetune.{name} must be >= 0, got {getattr(self, name)}")
        if self.gamma <= 0:
            raise ConfigError(f"finetune.gamma must be > 0, got {self.gamma}")
        check_point_count(self.val_points, "finetune.val_points")


def finetune_config(
    at_config: ExperimentConfig | dict[str, Any],
    module: str,
    opts: FinetuneOptions,
    *,
    val_size: int | None = None,
) -> ExperimentConfig:
    """The fine-tuning experiment: the AT run's data/model/defences with a new ``train`` section."""
    opts.validate()
    base = to_dict(at_config) if not isinstance(at_config, dict) else copy.deepcopy(at_config)
    base["name"] = f"{base.get('name', 'run')}-rift-ft"
    milestone = opts.epochs // 2 if opts.milestone is None else opts.milestone
    train = dict(base.get("train", {}))
    train.update(
        objective="standard",
        epochs=opts.epochs,
        batch_size=opts.batch_size,
        optimizer="sgd",
        lr=opts.lr,
        momentum=opts.momentum,
        nesterov=False,
        weight_decay=opts.weight_decay,
        schedule="multistep",
        milestones=[milestone] if milestone < opts.epochs else [],
        gamma=opts.gamma,
        warmup_epochs=0,
        select="clean",
        val_attack_steps=0,
        val_every=1,
        trainable=[module + ".weight"],
        freeze_bn=opts.bn == "frozen",
        options={},
    )
    if opts.val_points is not None:
        train["val_points"] = opts.val_points
    elif val_size is not None:
        train["val_points"] = val_size
    base["train"] = train
    return from_dict(ExperimentConfig, base)


def changed_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """State-dict keys whose tensors differ (bitwise) between two states."""
    return [k for k in before if not torch.equal(before[k].cpu(), after[k].cpu())]


def finetune(
    at_model: nn.Module,
    at_config: ExperimentConfig | dict[str, Any],
    module: str,
    out_dir: str | Path,
    opts: FinetuneOptions | None = None,
    *,
    splits: DataSplits | None = None,
    mode: Mode = "new",
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune ``module``'s weight of a copy of ``at_model`` into the run folder ``out_dir``.

    Returns:
        (model with the best-validation-epoch weights in eval mode, summary dict with the
        options, best epoch, validation history and the list of changed state-dict keys).
    Raises:
        ConfigError: the module does not exist or has no weight; bad options.
    """
    from fortify.runs import load_checkpoint
    from fortify.train import fit

    opts = opts or FinetuneOptions()
    get_weight(at_model, module)  # clear error before anything is written
    cfg = finetune_config(
        at_config, module, opts, val_size=len(splits.val) if splits is not None else None
    )
    model = copy.deepcopy(at_model)
    before = {k: v.detach().clone() for k, v in at_model.state_dict().items()}
    log.info(
        "fine-tuning %s.weight (%d values) for %d epochs, lr %g, BN %s",
        module,
        get_weight(model, module).numel(),
        opts.epochs,
        opts.lr,
        opts.bn,
    )
    result = fit(cfg, out_dir, mode=mode, splits=splits, model=model, progress=progress)
    best = Path(out_dir) / "checkpoints" / "best.safetensors"
    if best.is_file():
        load_checkpoint(best, model)
    model.eval()
    changed = changed_tensors(before, model.state_dict())
    allowed = {module + ".weight"}
    bn_keys = {
        f"{n}.{b}" if n else b
        for n, m in model.named_modules()
        # BatchNorm layers and FPD's back-pass copies of their running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "BackPassStats"
        for b, _ in m.named_buffers(recurse=False)
    }
    unexpected = [
        k for k in changed if k not in allowed and not (opts.bn == "adapt" and k in bn_keys)
    ]
    if unexpected:
        raise ConfigError(
            f"fine-tuning changed tensors other than {module}.weight: {unexpected[:8]}; "
            "check train.trainable / freeze_bn handling"
        )
    summary = {
        "module": module,
        "options": asdict(opts),
        "best_epoch": result.best_epoch,
        "best_val_clean": result.best_metric,
        "history": [
            {k: v for k, v in r.items() if isinstance(v, (int, float, str)) or v is None}
            for r in result.history
        ],
        "changed_tensors": changed,
    }
    return model, summary


def save_summary(summary: dict[str, Any], path: str | Path) -> None:
    """Write the fine-tuning summary JSON atomically."""
    from fortify.utils.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(summary, indent=2, default=str))

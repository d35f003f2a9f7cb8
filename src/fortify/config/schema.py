"""The experiment configuration schema. Every field has a default; YAML presets in ``configs/``
override a subset. ε and step sizes are in [0, 1] pixel units.

Sections are owned by the subsystem that reads them: ``data`` (:mod:`fortify.data`), ``model``
(:mod:`fortify.models`), ``defenses`` (:mod:`fortify.defenses`), ``train`` (:mod:`fortify.train`),
``eval`` (:mod:`fortify.evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fortify.errors import ConfigError, check_point_count


@dataclass
class DataConfig:
    """Which dataset, where it lives and how the validation split is carved from training data."""

    name: str = "fashion-mnist"
    root: str | None = None  # None: the dataset's usual places (see fortify.data)
    val_size: int = 5000  # images held out of the training split for model selection
    split_seed: int = 0  # seed of the train/val split (fixed: never changes with `seed`)
    train_subset: int | None = None  # use only the first N training images (after the split)
    test_subset: int | None = None  # use only the first N test images
    augment: Literal["auto", "none", "crop-flip", "crop", "flip"] = "auto"  # auto: per dataset
    crop_padding: int = 4
    download: bool = False  # allow downloading where the network permits
    options: dict[str, Any] = field(default_factory=dict)  # reader options, e.g. {image_size: 64}

    def validate(self) -> None:
        if not self.name.strip():
            raise ConfigError("data.name must name a dataset (see `fortify.data.available()`)")
        if self.val_size < 0:
            raise ConfigError(f"data.val_size must be >= 0, got {self.val_size}")
        _check_seed(self.split_seed, "data.split_seed")
        for what, n in (("train_subset", self.train_subset), ("test_subset", self.test_subset)):
            if n is not None and n < 1:
                raise ConfigError(f"data.{what} must be >= 1 or null (every image), got {n}")
        if self.crop_padding < 0:
            raise ConfigError(f"data.crop_padding must be >= 0 pixels, got {self.crop_padding}")


@dataclass
class ModelConfig:
    """Backbone from the :func:`fortify.models.create` registry."""

    name: str = "small-cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {width: 16} for narrow ResNets
    mean: list[float] | None = None  # optional normalisation inside the model
    std: list[float] | None = None

    def validate(self) -> None:
        if not self.name.strip():
            raise ConfigError("model.name must name a backbone (see `fortify.models.available()`)")


@dataclass
class DefenseConfig:
    """One defence attached at one or more positions (empty ``at``: the backbone's default)."""

    kind: Literal["fsr", "fpd", "fd", "cas", "cifs"] = "fsr"
    at: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class InnerAttackConfig:
    """The attack used inside adversarial training (L∞)."""

    kind: Literal["pgd", "fgsm-rs"] = "pgd"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    bn_mode: Literal["eval", "train"] = "eval"  # model mode while crafting examples

    def validate(self) -> None:
        if not 0 < self.eps <= 1:
            raise ConfigError(f"train.attack.eps must be in (0, 1] (pixel units), got {self.eps}")
        if not 0 < self.step_size <= 1:
            raise ConfigError(f"train.attack.step_size must be in (0, 1], got {self.step_size}")
        if self.steps < 1:
            raise ConfigError(f"train.attack.steps must be >= 1, got {self.steps}")
        if self.step_size > 4 * self.eps:
            raise ConfigError(
                f"train.attack.step_size {self.step_size} is more than 4x eps {self.eps}; "
                "steps that overshoot the ε-ball make no sense (use step_size <= 4*eps, "
                "typically eps/4 for PGD and 1.25*eps for fgsm-rs)"
            )


@dataclass
class TrainConfig:
    """Objective, optimiser, schedule and run-time options of the shared training loop."""

    objective: str = "at"  # standard | at | trades | mart | fpd (see fortify.train.objectives)
    beta: float = 6.0  # TRADES / MART trade-off
    epochs: int = 100
    batch_size: int = 128
    optimizer: Literal["sgd", "adam", "adamax"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["multistep", "cosine", "constant", "plateau"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [75, 90])  # 0-based epoch indices
    gamma: float = 0.1  # lr factor per milestone (multistep) / per plateau (plateau)
    warmup_epochs: int = 0  # linear warm-up from lr/steps to lr over these epochs (per step)
    plateau_patience: int = 10  # plateau: epochs without improvement before lr *= gamma
    min_lr: float = 0.0  # floor for cosine and plateau
    grad_clip: float | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    attack: InnerAttackConfig = field(default_factory=InnerAttackConfig)
    val_points: int = 1000  # validation images used per epoch for clean + quick-suite accuracy
    val_attack_steps: int = 20  # per-epoch validation PGD steps (step 0.1 eps, as suite quick)
    val_every: int = 1  # validate every N epochs (and always after the last)
    select: Literal["robust", "clean", "last"] = "robust"  # best checkpoint by validation ...
    sync_bn: bool = False
    tensorboard: bool = False
    trainable: list[str] = field(default_factory=list)  # parameter-name prefixes to train; [] = all
    freeze_bn: bool = False  # keep BatchNorm statistics and affine parameters fixed (RiFT option)
    drop_last: bool = False  # drop each rank's last incomplete batch
    options: dict[str, Any] = field(default_factory=dict)  # objective-specific extras

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.beta < 0:
            raise ConfigError(f"train.beta must be >= 0, got {self.beta}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"train.gamma must be in (0, 1], got {self.gamma}")
        if any(m < 0 for m in self.milestones) or self.milestones != sorted(self.milestones):
            raise ConfigError(
                f"train.milestones must be non-negative epoch indices in increasing order, "
                f"got {self.milestones}"
            )
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(
                f"train.warmup_epochs must be in [0, epochs={self.epochs}), "
                f"got {self.warmup_epochs}"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.val_points < 0:
            raise ConfigError(f"train.val_points must be >= 0, got {self.val_points}")
        if self.val_attack_steps < 0:
            raise ConfigError(f"train.val_attack_steps must be >= 0, got {self.val_attack_steps}")
        if self.val_every < 1:
            raise ConfigError(f"train.val_every must be >= 1, got {self.val_every}")
        if self.plateau_patience < 0:
            raise ConfigError(f"train.plateau_patience must be >= 0, got {self.plateau_patience}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError("train.nesterov needs optimizer 'sgd' with momentum > 0")
        if any(not isinstance(p, str) or not p for p in self.trainable):
            raise ConfigError(
                f"train.trainable must list non-empty parameter-name prefixes, got {self.trainable}"
            )


@dataclass
class EvalConfig:
    """Robustness evaluation (see :mod:`fortify.evaluate`)."""

    suite: str = "paper"  # paper | autoattack | quick | ood | full (see fortify.evaluate.suites)
    eps: float | None = None  # None: the dataset's standard budget
    norm: Literal["linf", "l2"] = "linf"
    n_points: int = 1000
    batch_size: int = 256
    seed: int = 0
    mode: Literal["final", "best", "both"] = "final"
    checks: bool = True
    # AutoAttack on the first N of the n_points only (suites autoattack, full, adaptive); the
    # others keep their clean outcome in the AutoAttack column. None: every point.
    autoattack_points: int | None = None

    def validate(self) -> None:
        from fortify.errors import FortifyError
        from fortify.evaluate.registry import get_suite

        try:
            get_suite(self.suite)  # the registered suites (importing fortify.evaluate fills them)
        except FortifyError as exc:
            raise ConfigError(f"eval.suite: {exc}") from None
        if self.eps is not None and not 0 < self.eps <= 1:
            raise ConfigError(f"eval.eps must be in (0, 1] (pixel units), got {self.eps}")
        check_eval_numbers(
            self.n_points, self.batch_size, self.seed, self.autoattack_points, lambda f: f"eval.{f}"
        )


@dataclass
class ExperimentConfig:
    """A whole experiment: data, model, defences, training and evaluation."""

    name: str = "experiment"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    defenses: list[DefenseConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        from fortify.utils.runtime import check_device_name

        name = self.name
        if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise ConfigError(
                f"name {name!r} must be a non-empty run name without path separators "
                "(it names the default run directory runs/<name>)"
            )
        _check_seed(self.seed, "seed")
        check_device_name(self.device, "device")


def check_eval_numbers(
    n_points: int,
    batch_size: int,
    seed: int,
    autoattack_points: int | None,
    name: Callable[[str], str],
) -> None:
    """The evaluation's counts, for the config (``eval.<field>``) and the CLI (``--flag``):
    ``name(field)`` says how the message names a field."""
    if n_points < 1:
        raise ConfigError(f"{name('n_points')} must be >= 1, got {n_points}")
    if batch_size < 1:
        raise ConfigError(f"{name('batch_size')} must be >= 1, got {batch_size}")
    _check_seed(seed, name("seed"))
    check_point_count(autoattack_points, name("autoattack_points"))


def _check_seed(seed: int, what: str) -> None:
    from fortify.utils.runtime import check_seed

    check_seed(seed, what)

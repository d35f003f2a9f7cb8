"""The options of the RiFT workflow (:class:`RiftConfig`, YAML ``configs/rift/default.yaml``):
one dataclass per step — MRC and its fixed adversarial set, fine-tuning, interpolation and the
choice of α, the final evaluation on TEST — and :func:`load_rift_config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fortify.config.loader import load_config
from fortify.errors import ConfigError
from fortify.rift.finetune import FinetuneOptions
from fortify.rift.mrc import MRCOptions


@dataclass
class MRCStepOptions(MRCOptions):
    """Step 1 options: how MRC is measured (:class:`~fortify.rift.mrc.MRCOptions`: eps relative
    to ‖W‖, passes, lr, batch_size, variant max (release) | first-projection (paper)) and the
    fixed adversarial set it is measured on."""

    n_points: int = 10_000  # validation images in the fixed adversarial set (capped by the split)
    attack_eps: float | None = None  # None: the run's training ε (or the dataset default)
    attack_steps: int = 10


@dataclass
class InterpolateOptions:
    """Step 3 options."""

    step: float = 0.1  # α grid step
    tolerance: float = 0.1  # allowed robust-accuracy loss in points vs θ_AT
    n_points: int = 2000  # validation images for the α grid
    attack_steps: int = 10
    batch_size: int = 512
    rule: str = "paired"  # paired (CIs over the validation points) | fixed (the paper's gap)
    level: float = 0.95  # confidence level of the paired rule's CIs
    resamples: int = 2000  # bootstrap resamples of the paired rule

    def validate(self) -> None:
        from fortify.rift.interpolate import ALPHA_RULES

        if self.rule not in ALPHA_RULES:
            raise ConfigError(
                f"interpolate.rule must be one of {list(ALPHA_RULES)}, got {self.rule!r}"
            )
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"interpolate.level must be in (0, 1), got {self.level!r}")
        if self.tolerance < 0:
            raise ConfigError(f"interpolate.tolerance must be >= 0 points, got {self.tolerance!r}")


@dataclass
class EvalOptions:
    """Step 4 options (TEST split)."""

    suites: list[str] = field(default_factory=lambda: ["pgd10", "paper", "autoattack", "ood"])
    n_points: int = 1000
    autoattack_points: int | None = None  # None: n_points
    ood_points: int | None = None  # None: n_points
    batch_size: int = 256
    checks: bool = True


@dataclass
class RiftConfig:
    """All RiFT options (YAML: ``configs/rift/default.yaml``)."""

    mrc: MRCStepOptions = field(default_factory=MRCStepOptions)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    module: str = "auto"  # module to fine-tune, or auto (lowest MRC among middle stages)
    interpolate: InterpolateOptions = field(default_factory=InterpolateOptions)
    evaluate: EvalOptions = field(default_factory=EvalOptions)
    tag: str = "best"  # checkpoint of the AT run
    seed: int = 0
    device: str = "auto"


def load_rift_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> RiftConfig:
    """Load a :class:`RiftConfig` from YAML plus ``section.field=value`` overrides."""
    return load_config(RiftConfig, path, overrides)

"""The options of the RiFT workflow (:class:`RiftConfig`, YAML ``configs/rift/default.yaml``):
one dataclass per step — MRC and its fixed adversarial set, fine-tuning, interpolation and the
choice of α, the final evaluation on TEST — and :func:`load_rift_config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fortify.config.loader import load_config
from fortify.errors import ConfigError, FortifyError, check_point_count
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

    def validate(self) -> MRCStepOptions:
        """``self`` if every field is allowed, else a ConfigError naming it and what is allowed."""
        super().validate()
        _count(self.n_points, "--points (mrc.n_points)")
        _count(self.attack_steps, "mrc.attack_steps")
        e = self.attack_eps
        if e is not None and (
            isinstance(e, bool) or not isinstance(e, (int, float)) or not 0.0 < e <= 1.0
        ):
            raise ConfigError(
                f"--attack-eps (mrc.attack_eps) must be an L∞ radius in (0, 1] pixel units, or "
                f"unset for the run's training ε; got {e!r}"
            )
        return self


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
        from fortify.rift.interpolate import ALPHA_RULES, alpha_grid
        from fortify.stats import BootstrapOptions

        if self.rule not in ALPHA_RULES:
            raise ConfigError(
                f"--alpha-rule (interpolate.rule) must be one of {list(ALPHA_RULES)}, "
                f"got {self.rule!r}"
            )
        try:
            alpha_grid(self.step)
        except ConfigError as exc:
            raise ConfigError(f"--alpha-step (interpolate.step): {exc}") from None
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"interpolate.level must be in (0, 1), got {self.level!r}")
        if self.tolerance < 0:
            raise ConfigError(
                f"--tolerance (interpolate.tolerance) must be >= 0 points, got {self.tolerance!r}"
            )
        _count(self.n_points, "--val-points (interpolate.n_points)")
        _count(self.attack_steps, "interpolate.attack_steps")
        _count(self.batch_size, "interpolate.batch_size")
        try:
            BootstrapOptions(resamples=self.resamples).validate()
        except ConfigError as exc:
            raise ConfigError(f"interpolate.resamples: {exc}") from None


@dataclass
class EvalOptions:
    """Step 4 options (TEST split)."""

    suites: list[str] = field(default_factory=lambda: ["pgd10", "paper", "autoattack", "ood"])
    n_points: int = 1000
    autoattack_points: int | None = None  # None: n_points
    ood_points: int | None = None  # None: n_points
    batch_size: int = 256
    checks: bool = True

    def validate(self) -> None:
        from fortify.evaluate.registry import SUITES, get_suite

        if not self.suites:
            raise ConfigError(
                "--suites (evaluate.suites) must name at least one evaluation suite; known: "
                f"{', '.join(SUITES.available())}"
            )
        for name in self.suites:
            try:
                get_suite(name)
            except FortifyError as exc:  # the did-you-mean error listing the known suites
                raise ConfigError(f"--suites (evaluate.suites): {exc}") from None
        twice = sorted({s for s in self.suites if self.suites.count(s) > 1})
        if twice:
            raise ConfigError(f"--suites (evaluate.suites) names {twice} more than once")
        _count(self.n_points, "--test-points (evaluate.n_points)")
        check_point_count(self.autoattack_points, "evaluate.autoattack_points")
        check_point_count(self.ood_points, "evaluate.ood_points")
        _count(self.batch_size, "evaluate.batch_size")


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

    def validate(self) -> RiftConfig:
        """Check every step's options at once, so that bad input fails before any step runs
        (or moves a folder aside); ``self``, else a ConfigError naming the option."""
        self.mrc.validate()
        self.finetune.validate()
        self.interpolate.validate()
        self.evaluate.validate()
        for key, value in (("--module (module)", self.module), ("--tag (tag)", self.tag)):
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{key} must be a non-empty name, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        return self


def load_rift_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> RiftConfig:
    """Load a :class:`RiftConfig` from YAML plus ``section.field=value`` overrides, validated
    (:meth:`RiftConfig.validate`)."""
    return load_config(RiftConfig, path, overrides).validate()


def _count(value: object, what: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")

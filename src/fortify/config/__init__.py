"""Typed experiment configuration: dataclass schema, YAML files, ``a.b=value`` overrides."""

from fortify.config.loader import (
    apply_overrides,
    describe_fields,
    from_dict,
    load_config,
    to_dict,
)
from fortify.config.schema import (
    DataConfig,
    DefenseConfig,
    EvalConfig,
    ExperimentConfig,
    InnerAttackConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = [
    "DataConfig",
    "DefenseConfig",
    "EvalConfig",
    "ExperimentConfig",
    "InnerAttackConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "describe_fields",
    "from_dict",
    "load_config",
    "to_dict",
]

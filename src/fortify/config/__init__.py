"""Typed experiment configuration: dataclass schema, YAML files, ``a.b=value`` overrides."""

from fortify.config.loader import (
    ConfigDumper,
    ConfigLoader,
    apply_overrides,
    describe_fields,
    from_dict,
    load_config,
    parse_yaml,
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
    "ConfigDumper",
    "ConfigLoader",
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
    "parse_yaml",
    "to_dict",
]

"""The run configuration: typed sections (`sections`) and their loading from YAML profiles and overrides
(`loading`). The bottom layer: it may use only the answer contract; every other layer may use it."""

from kwanzaa_adapter.config.loading import config_from_yaml_text, load_training_config, parse_override
from kwanzaa_adapter.config.sections import (
    AdapterConfig,
    ArchitectureConfig,
    ArtifactConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvaluationConfig,
    EvidenceConfig,
    GateConfig,
    InferenceConfig,
    KwanzaaConfig,
    ModelConfig,
    MonitoringConfig,
    PreferenceConfig,
    QuantizationConfig,
    RunConfig,
    TrainingConfig,
)

__all__ = [
    "AdapterConfig", "ArchitectureConfig", "ArtifactConfig", "CheckpointConfig", "ConfigError", "DataConfig",
    "EvaluationConfig", "EvidenceConfig", "GateConfig", "InferenceConfig", "KwanzaaConfig", "ModelConfig", "MonitoringConfig", "PreferenceConfig",
    "QuantizationConfig", "RunConfig", "TrainingConfig", "config_from_yaml_text", "load_training_config",
    "parse_override",
]

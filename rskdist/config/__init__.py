"""Experiment configuration: typed dataclasses loaded from YAML with dotted overrides."""

from rskdist.config.load import evaluated_metrics, ignored_settings, load_config, markdown_reference, save_config, to_dict, validate
from rskdist.config.schema import (
    Config, DataConfig, DeepSpeedConfig, EvalConfig, LossConfig, ModelConfig, OptimConfig, RunConfig,
)

__all__ = [
    "Config", "RunConfig", "ModelConfig", "DataConfig", "LossConfig", "OptimConfig", "DeepSpeedConfig",
    "EvalConfig", "evaluated_metrics", "ignored_settings", "load_config", "validate", "save_config", "to_dict", "markdown_reference",
]

from megatron_tlt.config.loader import ConfigError, load_config, to_yaml
from megatron_tlt.config.schema import Config, ModelConfig, ParallelConfig, RopeScalingConfig

__all__ = ["Config", "ConfigError", "ModelConfig", "ParallelConfig", "RopeScalingConfig", "load_config", "to_yaml"]

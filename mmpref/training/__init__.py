"""One training loop for every modality, on Accelerate."""

from mmpref.training.config import ConfigError, TrainConfig, load_config
from mmpref.training.loop import NonFiniteLossError, train

__all__ = ["ConfigError", "NonFiniteLossError", "TrainConfig", "load_config", "train"]

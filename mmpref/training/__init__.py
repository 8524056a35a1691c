"""One training loop for every modality, on Accelerate."""

from mmpref.training.config import ConfigError, TrainConfig, load_config
from mmpref.training.loop import NonFiniteLossError, TrainingInterrupted, train

__all__ = ["ConfigError", "NonFiniteLossError", "TrainConfig", "TrainingInterrupted", "load_config", "train"]

"""One training loop for every modality, on Accelerate."""

from mmpref.errors import DiskFullError, LowDiskSpaceError
from mmpref.training.config import ConfigError, TrainConfig, load_config
from mmpref.training.loop import Callback, NonFiniteLossError, TrainingInterrupted, train

__all__ = ["Callback", "ConfigError", "DiskFullError", "LowDiskSpaceError", "NonFiniteLossError", "TrainConfig",
           "TrainingInterrupted", "load_config", "train"]  # fmt: skip

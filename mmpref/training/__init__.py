"""One training loop for every modality, on Accelerate."""

from mmpref.errors import DiskFullError, LowDiskSpaceError
from mmpref.training.config import ConfigError, TrainConfig, load_config
from mmpref.training.events import Callback, NonFiniteLossError, TrainingInterrupted
from mmpref.training.loop import train

__all__ = ["Callback", "ConfigError", "DiskFullError", "LowDiskSpaceError", "NonFiniteLossError", "TrainConfig",
           "TrainingInterrupted", "load_config", "train"]  # fmt: skip

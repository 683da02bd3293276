"""Training runs for train_imagenet.py: settings, strategy, optimizer, loop and logs."""

from clars_tf.training.config import ConfigError, TrainConfig
from clars_tf.training.loop import Trainer, train

__all__ = ["ConfigError", "TrainConfig", "Trainer", "train"]

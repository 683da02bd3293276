"""CLARS and LARS large-batch optimizers for Keras 3 on TensorFlow."""

from clars_tf import per_example
from clars_tf.mixed_precision import LossScaleOptimizer
from clars_tf.optimizers import CLARS, LARS

__all__ = ["CLARS", "LARS", "LossScaleOptimizer", "per_example"]

"""Exact per-example gradient norms inside the training step, for CLARS.

`enable_per_example_norms(model)` makes `model.fit` compute, for every
trainable variable, the norm of each example's gradient and hand their mean to
`clars_tf.CLARS` through `set_complete_norms`. `PerExampleNorms` does the same
in a custom training loop. See `docs/per_example.md` for the definition used
with BatchNormalization, the layers that have a fast path and the memory of
the reference path.
"""

from clars_tf.per_example.engine import PerExampleNorms, StepRecording
from clars_tf.per_example.train_step import (
    complete_norm_optimizer,
    disable_per_example_norms,
    enable_per_example_norms,
)

__all__ = [
    "PerExampleNorms",
    "StepRecording",
    "complete_norm_optimizer",
    "disable_per_example_norms",
    "enable_per_example_norms",
]

"""A loss-scale optimizer whose overflow check agrees across replicas."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="clars_tf")
class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """`keras.optimizers.LossScaleOptimizer` with a cross-replica overflow check.

    Under `MirroredStrategy`, Keras 3.15's loss-scale optimizer checks the
    local gradients of each replica but then uses only the first replica's
    result. A step whose gradients overflow on another replica alone is
    applied: the NaN or Inf reaches every replica through the gradient sum,
    and the scale is not lowered. This subclass sums the non-finite flags of
    all replicas before the decision, so such a step is skipped on every
    replica and the scale is halved. Arguments and behaviour are otherwise
    those of the Keras class.

    Pass it explicitly, as `model.compile(optimizer=LossScaleOptimizer(CLARS()))`:
    `compile` wraps any other optimizer in the Keras class under the
    `mixed_float16` policy.
    """

    def check_finite(self, grads):
        """Return True when the gradients of every replica are finite."""
        finite = super().check_finite(grads)
        replica_context = tf.distribute.get_replica_context()
        if replica_context is None or replica_context.num_replicas_in_sync < 2:
            return finite
        non_finite_replicas = replica_context.all_reduce(
            tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.float32)
        )
        return tf.equal(non_finite_replicas, 0.0)

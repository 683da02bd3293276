"""Norm and trust-ratio helpers shared by the CLARS and LARS optimizers.

Every function here computes in float32 whatever the input dtype, so float16
and bfloat16 weights and gradients cannot overflow when squared.
"""

import tensorflow as tf


def l2_norm(tensor: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    """Return the float32 Euclidean norm of a dense tensor or `IndexedSlices`.

    `IndexedSlices` from an `Embedding` may repeat an index, so they are
    summed into their dense form first; the norm of the raw `values` would
    be wrong whenever an index repeats.
    """
    if isinstance(tensor, tf.IndexedSlices):
        tensor = tf.convert_to_tensor(tensor)
    tensor = tf.cast(tensor, tf.float32)
    # One L2Loss kernel, sum(x ** 2) / 2, writes no squared copy of the
    # tensor as square + reduce_sum do.
    return tf.sqrt(2.0 * tf.nn.l2_loss(tensor))


def trust_ratio(
    weight_norm: tf.Tensor,
    gradient_norm: tf.Tensor,
    trust_coefficient: float,
    epsilon: float,
    max_trust_ratio: float | None = None,
) -> tf.Tensor:
    """Return the layer-wise trust ratio for one tensor.

    `trust_coefficient * weight_norm / (gradient_norm + epsilon)`, clipped at
    `max_trust_ratio` when given. Where either norm is zero the ratio is 1:
    a zero-initialized layer then still learns, and a layer with a zero
    gradient takes a zero step, instead of producing 0/0.
    """
    weight_norm = tf.cast(weight_norm, tf.float32)
    gradient_norm = tf.cast(gradient_norm, tf.float32)
    both_positive = tf.logical_and(weight_norm > 0.0, gradient_norm > 0.0)

    # The denominator is replaced where the ratio is not used, so that
    # epsilon=0 with a zero gradient norm cannot produce Inf or NaN.
    safe_denominator = tf.where(both_positive, gradient_norm + epsilon, 1.0)
    ratio = trust_coefficient * weight_norm / safe_denominator
    if max_trust_ratio is not None:
        ratio = tf.minimum(ratio, max_trust_ratio)
    return tf.where(both_positive, ratio, 1.0)

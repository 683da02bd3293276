"""Fast-path rules for the scale and offset of normalization layers.

A normalization layer computes `y = gamma * x_hat + beta`, where `x_hat` is the
input normalized with statistics that do not depend on `gamma` or `beta`. With
the layer's input held fixed, example i's gradient of `gamma` is the sum of
`dy_i * x_hat_i` over the axes that `gamma` does not span, and that of `beta`
the sum of `dy_i`. Both are small (one value per channel), so the rules
materialize them.

BatchNormalization in training mode normalizes with the statistics of the
batch. The rule takes those statistics from the layer's own `_moments` call,
so masks and `synchronized=True` give the statistics the layer used.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from clars_tf.per_example.layer_rules import (
    LayerRule,
    PerExampleTerms,
    as_float32,
    is_plain_keras_layer,
    regularizer_cross,
    variables_of,
)
from clars_tf.per_example.recording import LayerCall, current_recording, replace_attribute


def _broadcast_shape(rank: int, axes: list[int], sizes: list[int]) -> list[int]:
    """Return a shape of `rank` ones with `sizes` at `axes`."""
    shape = [1] * rank
    for axis, size in zip(axes, sizes):
        shape[axis] = size
    return shape


class _AffineNormalizationRule(LayerRule):
    """Shared fast and reference computations for `gamma * x_hat + beta` layers."""

    def normalized(self, call: LayerCall) -> tf.Tensor:
        """Return `x_hat` in float32, the input as the layer normalized it."""
        raise NotImplementedError

    def parameter_axes(self, call: LayerCall) -> list[int]:
        """Return the non-negative input axes that `gamma` and `beta` span, in order."""
        raise NotImplementedError

    def fast_terms(self, call, output_grad, regularizer_grads):
        x_hat = tf.stop_gradient(self.normalized(call))
        grad = as_float32(output_grad)
        parameter_axes = self.parameter_axes(call)
        summed_axes = [a for a in range(1, grad.shape.rank) if a not in parameter_axes]

        terms = {}
        for name, variable in variables_of(call.layer, "gamma", "beta"):
            if name == "gamma":
                per_example = tf.reduce_sum(grad * x_hat, axis=summed_axes)
            else:
                per_example = tf.reduce_sum(grad, axis=summed_axes)
            terms[id(variable)] = self._terms(per_example, variable, regularizer_grads)
        return terms

    def _terms(self, per_example, variable, regularizer_grads):
        non_batch_axes = list(range(1, per_example.shape.rank))

        def cross(r):
            return tf.reduce_sum(per_example * as_float32(r)[None], axis=non_batch_axes)

        squared = tf.reduce_sum(tf.square(per_example), axis=non_batch_axes)
        return PerExampleTerms(squared, regularizer_cross(regularizer_grads, variable, cross))

    def recompute(self, call, indices):
        x_hat = tf.gather(tf.stop_gradient(self.normalized(call)), indices)
        rank = x_hat.shape.rank
        axes = self.parameter_axes(call)
        outputs = x_hat
        for name, variable in variables_of(call.layer, "gamma", "beta"):
            shape = _broadcast_shape(rank, axes, list(variable.shape))
            value = tf.reshape(as_float32(variable), shape)
            outputs = outputs * value if name == "gamma" else outputs + value
        return outputs


def _capture_moments(layer: keras.layers.Layer) -> list:
    """Wrap `layer._moments` so that recorded calls keep the batch statistics."""
    # NOTE: `_moments` is a private method of Keras 3 BatchNormalization
    # (3.15 here). Without it the rule would recompute the statistics, which
    # misses masks and `synchronized=True`.
    moments = layer._moments

    @tf.autograph.experimental.do_not_convert
    def capturing_moments(inputs, mask):
        mean, variance = moments(inputs, mask)
        recording = current_recording()
        call = recording.innermost_call(layer) if recording is not None else None
        if call is not None:
            call.moments = (mean, variance)
        return mean, variance

    return [replace_attribute(layer, "_moments", capturing_moments)]


class BatchNormalizationRule(_AffineNormalizationRule):
    """`keras.layers.BatchNormalization` without batch renormalization.

    In training mode `x_hat` uses the batch statistics captured from the call,
    otherwise the moving statistics. `renorm=True` composes gamma with
    per-batch corrections and is left to the reference path.
    """

    def matches(self, layer):
        return is_plain_keras_layer(layer, keras.layers.BatchNormalization) and not layer.renorm

    def capture_hooks(self, layer):
        return _capture_moments(layer)

    def parameter_axes(self, call):
        rank = call.inputs.shape.rank
        return [call.layer.axis % rank]

    def normalized(self, call):
        layer = call.layer
        inputs = as_float32(call.inputs)
        if call.moments is not None:
            mean, variance = call.moments
        else:
            mean, variance = layer.moving_mean, layer.moving_variance
        rank = inputs.shape.rank
        shape = _broadcast_shape(rank, self.parameter_axes(call), [-1])
        mean = tf.reshape(as_float32(mean), shape)
        variance = tf.reshape(as_float32(variance), shape)
        return (inputs - mean) * tf.math.rsqrt(variance + layer.epsilon)


class LayerNormalizationRule(_AffineNormalizationRule):
    """`keras.layers.LayerNormalization` over any axes, with or without `rms_scaling`."""

    def matches(self, layer):
        return is_plain_keras_layer(layer, keras.layers.LayerNormalization)

    def parameter_axes(self, call):
        rank = call.inputs.shape.rank
        axes = call.layer.axis if isinstance(call.layer.axis, (list, tuple)) else [call.layer.axis]
        return sorted(a % rank for a in axes)

    def normalized(self, call):
        layer = call.layer
        inputs = as_float32(call.inputs)
        axes = self.parameter_axes(call)
        if layer.rms_scaling:
            variance = keras.ops.var(inputs, axis=axes, keepdims=True)
            return inputs * tf.math.rsqrt(variance + layer.epsilon)
        return keras.ops.layer_normalization(inputs, axis=axes, epsilon=layer.epsilon)


class GroupNormalizationRule(_AffineNormalizationRule):
    """`keras.layers.GroupNormalization`: statistics per example and channel group."""

    def matches(self, layer):
        return is_plain_keras_layer(layer, keras.layers.GroupNormalization)

    def parameter_axes(self, call):
        return [call.layer.axis % call.inputs.shape.rank]

    def normalized(self, call):
        layer = call.layer
        inputs = as_float32(call.inputs)
        axis = self.parameter_axes(call)[0]
        dynamic_shape = tf.shape(inputs)

        # Split the channel axis into (groups, channels per group), as the layer does.
        group_shape = [
            dynamic_shape[i] if size is None else size for i, size in enumerate(inputs.shape)
        ]
        group_shape[0] = -1
        group_shape[axis] = inputs.shape[axis] // layer.groups
        group_shape.insert(axis, layer.groups)
        grouped = tf.reshape(inputs, group_shape)

        reduction_axes = [a for a in range(1, len(group_shape)) if a != axis]
        mean, variance = keras.ops.moments(grouped, axes=reduction_axes, keepdims=True)
        x_hat = (grouped - mean) * tf.math.rsqrt(variance + layer.epsilon)
        return tf.reshape(x_hat, dynamic_shape)

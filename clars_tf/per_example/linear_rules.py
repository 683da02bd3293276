"""Fast-path rules for layers that are linear in their kernel: Dense and 2-D convolutions.

For these layers the per-example kernel gradient is a sum over output positions
of outer products of the layer input (the input patch, for a convolution) and
the gradient of the pre-activation output. The rules keep the pre-activation
output by wrapping the layer's activation while a recording is open, because
the kernel gradient needs the gradient of that tensor, not of the activation's
output.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from clars_tf.per_example import products
from clars_tf.per_example.layer_rules import (
    LayerRule,
    PerExampleTerms,
    as_float32,
    is_plain_keras_layer,
    regularizer_cross,
    variables_of,
)
from clars_tf.per_example.recording import LayerCall, current_recording, replace_attribute


def capture_preactivation(layer: keras.layers.Layer) -> list:
    """Wrap `layer.activation` so that recorded calls keep its input, and return the undo."""
    activation = layer.activation
    if activation is None:
        return []

    @tf.autograph.experimental.do_not_convert
    def capturing_activation(x):
        recording = current_recording()
        call = recording.innermost_call(layer) if recording is not None else None
        if call is not None:
            call.preactivation = x
        return activation(x)

    return [replace_attribute(layer, "activation", capturing_activation)]


def _sum_over_batch_rows(values: tf.Tensor) -> tf.Tensor:
    """Sum every axis but the first: (B, ...) to (B,)."""
    return tf.reduce_sum(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def _bias_terms(position_sums: tf.Tensor, bias, regularizer_grads) -> PerExampleTerms:
    """Return the terms of a bias whose per-example gradient is `position_sums` (B, N)."""
    cross = regularizer_cross(
        regularizer_grads, bias, lambda r: tf.linalg.matvec(position_sums, as_float32(r))
    )
    return PerExampleTerms(tf.reduce_sum(tf.square(position_sums), axis=1), cross)


class _LinearRule(LayerRule):
    """Shared parts of the rules for Dense and convolution layers."""

    keras_class: type

    def matches(self, layer):
        return is_plain_keras_layer(layer, self.keras_class)

    def capture_hooks(self, layer):
        return capture_preactivation(layer)

    def gradient_target(self, call: LayerCall) -> tf.Tensor:
        if call.preactivation is not None:
            return call.preactivation
        return call.outputs


class DenseRule(_LinearRule):
    """`keras.layers.Dense` on inputs of any rank (the last axis is the feature axis).

    For a rank-2 input the kernel's per-example gradient is the outer product
    `x_i (x) dz_i`, whose norm is `||x_i|| * ||dz_i||`. For higher ranks the
    positions are the middle axes and the cheaper of the ghost norm and the
    materialized gradient is used.
    """

    keras_class = keras.layers.Dense

    def fast_terms(self, call, output_grad, regularizer_grads):
        layer = call.layer
        inputs = as_float32(call.inputs)
        grad = as_float32(output_grad)
        terms = {}

        for name, variable in variables_of(layer, "kernel", "bias"):
            if name == "kernel":
                terms[id(variable)] = self._kernel_terms(inputs, grad, variable, regularizer_grads)
            else:
                position_sums = tf.reduce_sum(products.flatten_positions(grad), axis=1)
                terms[id(variable)] = _bias_terms(position_sums, variable, regularizer_grads)
        return terms

    def _kernel_terms(self, inputs, grad, kernel, regularizer_grads):
        def cross(r):
            projected = tf.tensordot(inputs, as_float32(r), axes=1)
            return _sum_over_batch_rows(projected * grad)

        if inputs.shape.rank == 2:
            squared = tf.reduce_sum(tf.square(inputs), axis=1) * tf.reduce_sum(
                tf.square(grad), axis=1
            )
            return PerExampleTerms(squared, regularizer_cross(regularizer_grads, kernel, cross))

        flat_inputs = products.flatten_positions(inputs)
        flat_grad = products.flatten_positions(grad)
        positions = products.static_positions(inputs)
        in_size, out_size = kernel.shape
        if products.prefer_ghost_norm(positions, in_size, out_size):
            squared = products.ghost_squared_norms(
                products.gram(flat_inputs), products.gram(flat_grad)
            )
        else:
            squared = products.squared_norms_of_products(flat_inputs, flat_grad)
        return PerExampleTerms(squared, regularizer_cross(regularizer_grads, kernel, cross))

    def recompute(self, call, indices):
        layer = call.layer
        inputs = tf.gather(tf.stop_gradient(as_float32(call.inputs)), indices)
        outputs = tf.tensordot(inputs, as_float32(layer.kernel), axes=1)
        if layer.bias is not None:
            outputs = outputs + as_float32(layer.bias)
        return outputs


def _to_channels_last(tensor: tf.Tensor, data_format: str) -> tf.Tensor:
    if data_format == "channels_first":
        return tf.transpose(tensor, [0, 2, 3, 1])
    return tensor


def kernel_offset_inputs(
    inputs: tf.Tensor,
    output_size: tuple[int, int],
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    dilation_rate: tuple[int, int],
    padding: str,
) -> list[tf.Tensor]:
    """Return, per kernel offset (row-major), the input pixels that offset multiplies.

    `inputs` is (B, H, W, C) with static H and W. Each result is
    (B, H_out, W_out, C): element (b, y, x, c) is the padded input pixel that
    the kernel tap at that offset reads for output pixel (y, x). "same" padding
    splits the padding as TensorFlow does, with the odd pixel after the image.
    """
    pads = []
    for size, out, kernel, stride, dilation in zip(
        inputs.shape[1:3], output_size, kernel_size, strides, dilation_rate
    ):
        total = 0
        if padding == "same":
            total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
        pads.append([total // 2, total - total // 2])
    if any(p != [0, 0] for p in pads):
        inputs = tf.pad(inputs, [[0, 0], pads[0], pads[1], [0, 0]])

    (out_h, out_w), (stride_h, stride_w) = output_size, strides
    offsets = []
    for row in range(kernel_size[0]):
        for col in range(kernel_size[1]):
            top = row * dilation_rate[0]
            left = col * dilation_rate[1]
            offsets.append(
                inputs[
                    :,
                    top : top + (out_h - 1) * stride_h + 1 : stride_h,
                    left : left + (out_w - 1) * stride_w + 1 : stride_w,
                    :,
                ]
            )
    return offsets


class _Conv2DBaseRule(_LinearRule):
    """Shared parts of the Conv2D and DepthwiseConv2D rules."""

    def fast_path_obstacle(self, call):
        layer = call.layer
        spatial_axes = (2, 3) if layer.data_format == "channels_first" else (1, 2)
        target = self.gradient_target(call)
        for tensor in (call.inputs, target):
            if any(tensor.shape[axis] is None for axis in spatial_axes):
                return "its input or output height and width are not static"
        return None

    def fast_terms(self, call, output_grad, regularizer_grads):
        layer = call.layer
        terms = {}
        for name, variable in variables_of(layer, "kernel", "bias"):
            if name == "kernel":
                terms[id(variable)] = self._kernel_terms(
                    call, output_grad, variable, regularizer_grads
                )
            else:
                spatial = [2, 3] if layer.data_format == "channels_first" else [1, 2]
                position_sums = tf.reduce_sum(as_float32(output_grad), axis=spatial)
                terms[id(variable)] = _bias_terms(position_sums, variable, regularizer_grads)
        return terms

    def _offsets_and_grad(self, call, output_grad):
        layer = call.layer
        inputs = _to_channels_last(as_float32(call.inputs), layer.data_format)
        grad = _to_channels_last(as_float32(output_grad), layer.data_format)
        offsets = kernel_offset_inputs(
            inputs,
            tuple(grad.shape[1:3]),
            tuple(layer.kernel_size),
            tuple(layer.strides),
            tuple(layer.dilation_rate),
            layer.padding,
        )
        return offsets, grad

    def _kernel_cross(self, call, output_grad, convolve):
        """Return `r -> <d_i, r>` for the kernel: sum of the output gradient times conv(x, r)."""
        inputs = as_float32(call.inputs)
        grad = as_float32(output_grad)
        return lambda r: _sum_over_batch_rows(convolve(inputs, as_float32(r)) * grad)

    def _bias_and_add(self, layer, outputs, bias):
        if layer.data_format == "channels_first":
            return outputs + tf.reshape(bias, [1, -1, 1, 1])
        return outputs + bias


class Conv2DRule(_Conv2DBaseRule):
    """`keras.layers.Conv2D` with `groups=1`, any strides, dilation and padding.

    The per-example kernel gradient is `sum_p patch_ip (x) dz_ip`. The rule
    chooses per layer, from the static sizes, between the ghost norm
    (P^2 * (K + N) multiply-adds per example for P output pixels,
    K = kernel_h * kernel_w * C_in and N = C_out) and the materialized
    gradient (P * K * N), which it accumulates offset by offset without
    forming the patch matrix.
    """

    keras_class = keras.layers.Conv2D

    def matches(self, layer):
        return super().matches(layer) and layer.groups == 1

    def _kernel_terms(self, call, output_grad, kernel, regularizer_grads):
        offsets, grad = self._offsets_and_grad(call, output_grad)
        batch = tf.shape(grad)[0]
        positions = grad.shape[1] * grad.shape[2]
        in_channels, out_channels = kernel.shape[2], kernel.shape[3]
        flat_grad = tf.reshape(grad, [batch, positions, out_channels])

        def flat(offset):
            return tf.reshape(offset, [batch, positions, in_channels])

        patch_size = len(offsets) * in_channels
        if products.prefer_ghost_norm(positions, patch_size, out_channels):
            input_gram = tf.add_n([products.gram(flat(offset)) for offset in offsets])
            squared = products.ghost_squared_norms(input_gram, products.gram(flat_grad))
        else:
            squared = tf.add_n(
                [products.squared_norms_of_products(flat(offset), flat_grad) for offset in offsets]
            )

        cross = regularizer_cross(
            regularizer_grads,
            kernel,
            self._kernel_cross(call, output_grad, call.layer.convolution_op),
        )
        return PerExampleTerms(squared, cross)

    def recompute(self, call, indices):
        layer = call.layer
        inputs = tf.gather(tf.stop_gradient(as_float32(call.inputs)), indices)
        outputs = layer.convolution_op(inputs, as_float32(layer.kernel))
        if layer.use_bias:
            outputs = self._bias_and_add(layer, outputs, as_float32(layer.bias))
        return outputs


class DepthwiseConv2DRule(_Conv2DBaseRule):
    """`keras.layers.DepthwiseConv2D` with any depth multiplier, strides, dilation, padding.

    Each input channel c has its own (kernel_h, kernel_w, M) filter, so the
    per-example kernel gradient is materialized offset by offset at
    P * C * M multiply-adds per offset. The ghost norm would need a P x P Gram
    matrix per channel, which is cheaper only when P is below
    kernel_h * kernel_w * M / (kernel_h * kernel_w + M), so the rule always
    materializes.
    """

    keras_class = keras.layers.DepthwiseConv2D

    def _kernel_terms(self, call, output_grad, kernel, regularizer_grads):
        layer = call.layer
        offsets, grad = self._offsets_and_grad(call, output_grad)
        batch = tf.shape(grad)[0]
        positions = grad.shape[1] * grad.shape[2]
        channels, multiplier = kernel.shape[2], kernel.shape[3]
        grad = tf.reshape(grad, [batch, positions, channels, multiplier])

        squared = tf.add_n(
            [
                tf.reduce_sum(
                    tf.square(
                        tf.einsum(
                            "bpc,bpcm->bcm",
                            tf.reshape(offset, [batch, positions, channels]),
                            grad,
                        )
                    ),
                    axis=[1, 2],
                )
                for offset in offsets
            ]
        )

        def convolve(inputs, r):
            return keras.ops.depthwise_conv(
                inputs,
                r,
                strides=layer.strides,
                padding=layer.padding,
                dilation_rate=layer.dilation_rate,
                data_format=layer.data_format,
            )

        cross = regularizer_cross(
            regularizer_grads, kernel, self._kernel_cross(call, output_grad, convolve)
        )
        return PerExampleTerms(squared, cross)

    def recompute(self, call, indices):
        layer = call.layer
        inputs = tf.gather(tf.stop_gradient(as_float32(call.inputs)), indices)
        outputs = keras.ops.depthwise_conv(
            inputs,
            as_float32(layer.kernel),
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        if layer.use_bias:
            outputs = self._bias_and_add(layer, outputs, as_float32(layer.bias))
        return outputs

"""The reference path: per-example gradients as Jacobian rows, in chunks of examples.

For a layer called with fixed inputs, example i's gradient of a variable w is
the gradient of the scalar `s_i = <dz_i, z_i(w)>`. Here z is the tensor that
the loss gradient dz was taken with respect to: the layer's pre-activation
output for Dense and convolutions, and its output otherwise. `GradientTape.jacobian` of
the vector s over the examples of a chunk, vectorized with pfor, gives the
per-example gradients of that chunk as rows. Only one chunk's rows exist at a
time, because the chunks run in a `tf.while_loop` with one iteration in flight.

For a layer with a fast-path rule, z is recomputed from the call's recorded
inputs for the chunk's examples only. For any other layer, s is taken from
the outputs recorded in the forward pass, so the Jacobian runs back through
the layer's recorded operations for the whole batch and nothing is called a
second time.

Peak extra memory, in float32 values, is about
`chunk_size * (|w| + m * size(z_i))` for the group's variables w and one
example's output rows z_i, where m is the number of examples one Jacobian row
runs the backward pass over: `chunk_size` for recomputed layers and the whole
batch for recorded ones. The work is m weight gradients per row, so chunk
size does not reduce the total for recorded layers.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf


def surrogate_rows(outputs: list[tf.Tensor], output_grads: list[tf.Tensor]) -> tf.Tensor:
    """Return `s_i = sum <dz_i, z_i>` over the given (rows of) outputs, shape (chunk,).

    The output gradients are constants. Every output is cast to float32 first,
    so the Jacobian is taken in float32 under mixed precision.
    """
    total = None
    for output, grad in zip(outputs, output_grads):
        product = tf.cast(output, tf.float32) * tf.stop_gradient(tf.cast(grad, tf.float32))
        rows = tf.reduce_sum(tf.reshape(product, [tf.shape(product)[0], -1]), axis=1)
        total = rows if total is None else total + rows
    return total


def chunked_squared_norms(
    variables: list,
    jacobian_rows: Callable[[tf.Tensor], list[tf.Tensor | None]],
    batch_size: tf.Tensor,
    chunk_size: int,
    factor: tf.Tensor,
    regularizer_grads: dict[int, tf.Tensor],
    after: list[tf.Tensor],
) -> list[tf.Tensor]:
    """Return `||factor * J_i + r||^2` per example for each variable, each of shape (batch,).

    `jacobian_rows(indices)` returns, per variable, the Jacobian rows of the
    examples `indices` (None where the variable does not affect them). `r` is
    the variable's regularizer gradient, added to every row when present. The
    loop starts after the tensors in `after` exist: the output gradients, and
    the results of the previous call so that consecutive calls do not hold
    their chunks in memory at the same time.
    """
    chunk_count = (batch_size + chunk_size - 1) // chunk_size

    def body(chunk, sums):
        start = chunk * chunk_size
        indices = tf.range(start, tf.minimum(start + chunk_size, batch_size))
        rows = jacobian_rows(indices)
        updated = []
        for variable, row, total in zip(variables, rows, sums):
            squared = _squared_row_norms(variable, row, indices, factor, regularizer_grads)
            updated.append(tf.tensor_scatter_nd_update(total, indices[:, None], squared))
        return chunk + 1, updated

    initial = [tf.zeros([batch_size], tf.float32) for _ in variables]
    with tf.control_dependencies(after):
        _, sums = tf.while_loop(
            lambda chunk, _: chunk < chunk_count,
            body,
            (tf.constant(0), initial),
            parallel_iterations=1,
        )
    return list(sums)


def _squared_row_norms(variable, row, indices, factor, regularizer_grads) -> tf.Tensor:
    count = tf.shape(indices)[0]
    regularizer_grad = regularizer_grads.get(id(variable))
    if row is None:
        if regularizer_grad is None:
            return tf.zeros([count], tf.float32)
        return tf.fill([count], tf.reduce_sum(tf.square(regularizer_grad)))

    row = tf.reshape(tf.cast(row, tf.float32), [count, -1]) * factor
    if regularizer_grad is not None:
        row = row + tf.reshape(regularizer_grad, [1, -1])
    return tf.reduce_sum(tf.square(row), axis=1)

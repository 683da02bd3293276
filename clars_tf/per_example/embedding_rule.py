"""Fast-path rule for `keras.layers.Embedding`."""

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


def _token_ids(call) -> tf.Tensor:
    """Return the call's token ids as (B, T) int32, T being all non-batch axes."""
    ids = tf.cast(call.inputs, tf.int32)
    return tf.reshape(ids, [tf.shape(ids)[0], -1])


class EmbeddingRule(LayerRule):
    """`keras.layers.Embedding`, with token ids of any shape (B, ...).

    Example i's gradient of the table has row `v` equal to the sum of the
    output gradients at the positions whose token is `v`. Its squared norm is
    `sum over position pairs (t, u) with id_t == id_u of <dy_t, dy_u>`, a ghost
    norm with the token-equality matrix as the input Gram matrix: T^2 * d
    multiply-adds per example for T tokens of dimension d, independent of the
    vocabulary size.
    """

    def matches(self, layer):
        return is_plain_keras_layer(layer, keras.layers.Embedding)

    def fast_terms(self, call, output_grad, regularizer_grads):
        ids = _token_ids(call)
        batch = tf.shape(ids)[0]
        grad = tf.reshape(as_float32(output_grad), [batch, -1, call.layer.output_dim])
        terms = {}
        for _, table in variables_of(call.layer, "embeddings"):
            same_token = tf.equal(ids[:, :, None], ids[:, None, :])
            grad_gram = tf.linalg.matmul(grad, grad, transpose_b=True)
            squared = tf.reduce_sum(tf.where(same_token, grad_gram, 0.0), axis=[1, 2])

            def cross(r):
                return tf.reduce_sum(tf.gather(as_float32(r), ids) * grad, axis=[1, 2])

            terms[id(table)] = PerExampleTerms(
                squared, regularizer_cross(regularizer_grads, table, cross)
            )
        return terms

    def recompute(self, call, indices):
        ids = tf.gather(tf.cast(call.inputs, tf.int32), indices)
        return tf.gather(as_float32(call.layer.embeddings), ids)

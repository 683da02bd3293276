"""Per-example norms of BatchNormalization models in training mode.

The definition: g_i = B * (gradient of the batch loss with respect to a private
copy of each weight that only example i's forward pass reads). The expected
values come from a hand-written forward pass of the same model with one weight
copy per example, differentiated with one GradientTape.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras
from keras import layers

from test_per_example_support import CROSS_ENTROPY, assert_norms_close, engine_norms

BATCH = 6
HIDDEN = 5
NUM_CLASSES = 3


def _model():
    inputs = keras.Input((4,))
    hidden = layers.Dense(HIDDEN, name="hidden")(inputs)
    normalized = layers.BatchNormalization(epsilon=1e-3, name="bn")(hidden)
    outputs = layers.Dense(NUM_CLASSES, name="head")(layers.ReLU()(normalized))
    return keras.Model(inputs, outputs)


def _private_copy_norms(model, x, y):
    """Return per-example norms, shape (variables, batch), by the private-copy definition."""
    weights = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    copies = [tf.repeat(w[None], BATCH, axis=0) for w in weights]
    hidden_kernel, hidden_bias, gamma, beta, head_kernel, head_bias = copies

    with tf.GradientTape() as tape:
        tape.watch(copies)
        hidden = tf.einsum("bi,bij->bj", x, hidden_kernel) + hidden_bias
        mean, variance = tf.nn.moments(hidden, axes=[0])
        normalized = gamma * (hidden - mean) / tf.sqrt(variance + 1e-3) + beta
        logits = tf.einsum("bj,bjk->bk", tf.nn.relu(normalized), head_kernel) + head_bias
        loss = CROSS_ENTROPY(y, logits)
    grads = tape.gradient(loss, copies)

    per_example = [BATCH * tf.reshape(g, [BATCH, -1]) for g in grads]
    return np.array([tf.norm(g, axis=1).numpy() for g in per_example])


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_batch_norm_training_private_copies(method):
    keras.utils.set_random_seed(3)
    model = _model()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(BATCH, 4)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=BATCH).astype("int32")
    model.get_layer("bn").gamma.assign(rng.uniform(0.5, 1.5, size=HIDDEN).astype("float32"))

    expected = _private_copy_norms(model, tf.constant(x), tf.constant(y))
    actual = engine_norms(model, x, y, method, chunk_size=4)

    assert_norms_close(actual, expected, [v.path for v in model.trainable_variables])


def test_batch_norm_training_shares_mean_gradient():
    # The mean of the private-copy gradients is the batch gradient. For the
    # bias before BatchNormalization that mean is zero, but the norms are not.
    keras.utils.set_random_seed(4)
    model = _model()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(BATCH, 4)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=BATCH).astype("int32")

    with tf.GradientTape() as tape:
        loss = CROSS_ENTROPY(y, model(x, training=True))
    bias_gradient = tape.gradient(loss, model.get_layer("hidden").bias)
    norms = engine_norms(model, x, y, "fast")
    bias_index = [v.path for v in model.trainable_variables].index("hidden/bias")

    assert float(tf.norm(bias_gradient)) < 1e-6
    assert float(np.min(norms[bias_index])) > 1e-3

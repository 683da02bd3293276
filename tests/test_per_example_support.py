"""Shared pieces of the per-example tests: brute-force norms and a recording optimizer.

This module contains no tests. The other test_per_example files import it.
"""

import numpy as np
import tensorflow as tf
import keras

from clars_tf.per_example import PerExampleNorms

CROSS_ENTROPY = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def brute_force_norms(model, x, y, loss_fn=CROSS_ENTROPY, sample_weight=None, training=True):
    """Return per-example gradient norms, shape (variables, batch), from one tape per example.

    Example i's loss is `loss_fn` on a batch holding only example i (times its
    sample weight), plus the model's regularization losses.
    """
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            outputs = model(x[i : i + 1], training=training)
            loss = loss_fn(y[i : i + 1], outputs)
            if sample_weight is not None:
                loss = loss * sample_weight[i]
            if model.losses:
                loss = loss + tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        rows.append([0.0 if g is None else float(tf.norm(tf.convert_to_tensor(g))) for g in grads])
    return np.array(rows).T


def engine_norms(model, x, y, method, chunk_size=3, loss_fn=CROSS_ENTROPY, training=True):
    """Return the engine's per-example norms, shape (variables, batch), from a traced step."""
    engine = PerExampleNorms(model, method=method, chunk_size=chunk_size)

    @tf.function
    def step(x, y):
        with engine.record() as recording:
            loss = loss_fn(y, model(x, training=training))
            if model.losses:
                loss = loss + tf.add_n(model.losses)
        _, norms = recording.gradients_and_norms(loss, reduction="none")
        return norms

    return np.array([n.numpy() for n in step(tf.constant(x), tf.constant(y))])


def assert_norms_close(actual, expected, paths, rtol=1e-5):
    """Assert that each variable's per-example norms agree to `rtol` relative error."""
    assert actual.shape == expected.shape
    for path, actual_row, expected_row in zip(paths, actual, expected):
        # Examples whose gradient vanishes (a dead ReLU) compare on the scale of the others.
        atol = 1e-6 * max(float(np.max(expected_row)), 1e-30)
        np.testing.assert_allclose(actual_row, expected_row, rtol=rtol, atol=atol, err_msg=path)


class RecordingSGD(keras.optimizers.SGD):
    """SGD that stores the norms handed to `set_complete_norms`, averaged over replicas."""

    def build(self, var_list):
        super().build(var_list)
        self.received_norms = [
            self.add_variable((), dtype="float32", aggregation="mean", name=f"received_{i}")
            for i in range(len(var_list))
        ]

    def set_complete_norms(self, norms):
        if not self.built:
            raise ValueError("set_complete_norms needs a built optimizer")
        for variable, norm in zip(self.received_norms, norms):
            variable.assign(norm)

    def received(self):
        """Return the last received norms as a NumPy vector."""
        return np.array([float(v.numpy()) for v in self.received_norms])

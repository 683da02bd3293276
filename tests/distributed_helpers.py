"""Models, data and independent gradient computations for the distribution tests."""

import keras
import numpy as np
import tensorflow as tf

GLOBAL_BATCH = 32
FEATURES = 8
CLASSES = 3


def dense_model(seed=0, hidden=(16,)):
    """A small MLP without cross-example coupling, so shards are independent."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((FEATURES,))]
    for index, units in enumerate(hidden):
        layers.append(keras.layers.Dense(units, activation="tanh", name=f"hidden{index}"))
    layers.append(keras.layers.Dense(CLASSES, name="logits"))
    return keras.Sequential(layers, name="mlp")


def make_data(count, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, count).astype("int32")
    return x, y


def per_example_losses(model, x, y):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    return loss_fn(y, model(x, training=True))


def mean_gradient(model, x, y):
    """Gradient of the mean loss over (x, y): one tape, no strategy."""
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(per_example_losses(model, x, y))
    return [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)]


def mean_shard_norms(model, shards):
    """Per variable, the mean over shards of the norm of each shard's mean gradient."""
    norms = [[np.linalg.norm(g) for g in mean_gradient(model, x, y)] for x, y in shards]
    return np.mean(norms, axis=0)


def split(x, y, parts):
    size = len(x) // parts
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(parts)]

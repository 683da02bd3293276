"""Per-example norms under MirroredStrategy over two logical CPUs.

Each replica hands in the mean over its own examples, and the stand-in optimizer
averages the replicas' values as CLARS does, which must equal the mean over
the global batch computed on one device with one GradientTape per example.
"""

import numpy as np
import tensorflow as tf
import keras
from keras import layers

from clars_tf.per_example import PerExampleNorms, enable_per_example_norms
from conftest import mirrored_strategy
from test_per_example_support import CROSS_ENTROPY, RecordingSGD, brute_force_norms

GLOBAL_BATCH = 8
NUM_CLASSES = 3


def _model():
    inputs = keras.Input((6, 6, 2))
    features = layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(inputs)
    features = layers.LayerNormalization()(layers.Flatten()(features))
    return keras.Model(inputs, layers.Dense(NUM_CLASSES)(features))


def _data():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(GLOBAL_BATCH, 6, 6, 2)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=GLOBAL_BATCH).astype("int32")
    return x, y


def test_mirrored_fit_global_mean_norms():
    strategy = mirrored_strategy(2)
    assert strategy.num_replicas_in_sync == 2
    keras.utils.set_random_seed(11)
    with strategy.scope():
        model = _model()
        model.compile(optimizer=RecordingSGD(0.1), loss=CROSS_ENTROPY)
    x, y = _data()
    expected = brute_force_norms(model, x, y).mean(axis=1)

    enable_per_example_norms(model)
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)

    np.testing.assert_allclose(model.optimizer.received(), expected, rtol=1e-5)


def test_mirrored_custom_loop_norms():
    strategy = mirrored_strategy(2)
    keras.utils.set_random_seed(12)
    with strategy.scope():
        model = _model()
        optimizer = RecordingSGD(0.1)
        optimizer.build(model.trainable_variables)
    x, y = _data()
    expected = brute_force_norms(model, x, y).mean(axis=1)
    norms_engine = PerExampleNorms(model)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)

    @tf.function
    def train_step(x, y):
        def replica_step(x, y):
            with norms_engine.record() as recording:
                per_example_loss = keras.losses.sparse_categorical_crossentropy(
                    y, model(x, training=True), from_logits=True
                )
                loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=GLOBAL_BATCH)
            grads, norms = recording.gradients_and_norms(loss)
            optimizer.set_complete_norms(norms)
            optimizer.apply(grads, model.trainable_variables)

        strategy.run(replica_step, args=(x, y))

    for x_batch, y_batch in strategy.experimental_distribute_dataset(dataset):
        train_step(x_batch, y_batch)

    np.testing.assert_allclose(optimizer.received(), expected, rtol=1e-5)

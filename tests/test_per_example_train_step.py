"""The per-example train step in `model.fit` and in custom loops, on one device.

A stand-in optimizer (SGD with a `set_complete_norms` that stores what it
receives) checks what the step hands over. The expected norms come from one
GradientTape per example on the weights before the step.
"""

import logging

import numpy as np
import pytest
import tensorflow as tf
import keras
from keras import layers

from clars_tf import CLARS
from clars_tf.per_example import (
    PerExampleNorms,
    complete_norm_optimizer,
    disable_per_example_norms,
    enable_per_example_norms,
)
from test_per_example_support import (
    CROSS_ENTROPY,
    RecordingSGD,
    assert_norms_close,
    brute_force_norms,
    engine_norms,
)

NUM_CLASSES = 3
IMAGE_SHAPE = (6, 6, 2)


def sequential_model():
    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
            layers.Flatten(),
            layers.Dense(NUM_CLASSES),
        ]
    )


def functional_model():
    inputs = keras.Input(IMAGE_SHAPE)
    features = layers.Conv2D(4, 3, activation="relu")(inputs)
    features = layers.LayerNormalization()(layers.Flatten()(features))
    return keras.Model(inputs, layers.Dense(NUM_CLASSES)(features))


class SubclassedModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = layers.DepthwiseConv2D(3, depth_multiplier=2, activation="tanh")
        self.flatten = layers.Flatten()
        self.head = layers.Dense(NUM_CLASSES)

    def call(self, inputs, training=False):
        return self.head(self.flatten(self.conv(inputs)))


def subclassed_model():
    model = SubclassedModel()
    model(np.zeros((1, *IMAGE_SHAPE), "float32"))
    return model


MODELS = {
    "sequential": sequential_model,
    "functional": functional_model,
    "subclassed": subclassed_model,
}


def _data(batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *IMAGE_SHAPE)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=batch).astype("int32")
    return x, y


def _expected_mean_norms(model, x, y, **kwargs):
    return brute_force_norms(model, x, y, **kwargs).mean(axis=1)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fit_hands_mean_norms(kind):
    keras.utils.set_random_seed(0)
    model = MODELS[kind]()
    x, y = _data(5)
    expected = _expected_mean_norms(model, x, y)

    model.compile(optimizer=RecordingSGD(0.1), loss=CROSS_ENTROPY)
    enable_per_example_norms(model)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)

    np.testing.assert_allclose(model.optimizer.received(), expected, rtol=1e-5)


def test_fit_logs_match_plain_fit():
    keras.utils.set_random_seed(1)
    plain = functional_model()
    per_example = functional_model()
    per_example.set_weights(plain.get_weights())
    x, y = _data(10, seed=1)

    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss=CROSS_ENTROPY, metrics=["accuracy"])
    per_example.compile(optimizer=RecordingSGD(0.1), loss=CROSS_ENTROPY, metrics=["accuracy"])
    enable_per_example_norms(per_example)
    # Batches of 4 over 10 examples end with a partial batch of 2.
    plain_history = plain.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    per_example_history = per_example.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)

    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(
            per_example_history.history[name], plain_history.history[name], rtol=1e-5
        )
    for plain_weight, per_example_weight in zip(plain.get_weights(), per_example.get_weights()):
        np.testing.assert_allclose(per_example_weight, plain_weight, rtol=1e-5, atol=1e-7)


def test_train_step_in_user_function():
    # A user's tf.function converts its body with AutoGraph, unlike fit's step.
    keras.utils.set_random_seed(10)
    model = functional_model()
    x, y = _data(4, seed=10)
    expected = _expected_mean_norms(model, x, y)
    model.compile(optimizer=RecordingSGD(0.1), loss=CROSS_ENTROPY)
    enable_per_example_norms(model)

    step = tf.function(lambda x, y: model.train_step((x, y)))
    step(tf.constant(x), tf.constant(y))

    np.testing.assert_allclose(model.optimizer.received(), expected, rtol=1e-5)


def test_fit_steps_per_execution_two():
    # Two steps per call run the step inside a tf.while_loop. With learning
    # rate 0 the weights stay fixed, so the last norms belong to the last batch.
    keras.utils.set_random_seed(11)
    model = functional_model()
    x, y = _data(8, seed=11)
    expected = _expected_mean_norms(model, x[4:], y[4:])

    model.compile(optimizer=RecordingSGD(0.0), loss=CROSS_ENTROPY, steps_per_execution=2)
    enable_per_example_norms(model)
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0)

    np.testing.assert_allclose(model.optimizer.received(), expected, rtol=1e-5)


def test_fit_jit_compile_fast_path():
    keras.utils.set_random_seed(12)
    model = functional_model()
    x, y = _data(6, seed=12)
    expected = _expected_mean_norms(model, x, y)

    model.compile(optimizer=RecordingSGD(0.1), loss=CROSS_ENTROPY, jit_compile=True)
    enable_per_example_norms(model)
    model.fit(x, y, batch_size=6, shuffle=False, verbose=0)

    np.testing.assert_allclose(model.optimizer.received(), expected, rtol=1e-5)


def test_fit_sample_weights_scale_losses():
    keras.utils.set_random_seed(2)
    model = sequential_model()
    x, y = _data(4, seed=2)
    sample_weight = np.array([0.5, 2.0, 0.0, 1.0], "float32")
    expected = _expected_mean_norms(model, x, y, sample_weight=sample_weight)

    model.compile(optimizer=RecordingSGD(0.1), loss=CROSS_ENTROPY)
    enable_per_example_norms(model)
    model.fit(x, y, sample_weight=sample_weight, batch_size=4, shuffle=False, verbose=0)

    np.testing.assert_allclose(model.optimizer.received(), expected, rtol=1e-5)


def test_loss_scale_optimizer_inner_norms():
    keras.utils.set_random_seed(3)
    model = sequential_model()
    x, y = _data(4, seed=3)
    expected = _expected_mean_norms(model, x, y)
    inner = RecordingSGD(0.1)

    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(inner), loss=CROSS_ENTROPY)
    enable_per_example_norms(model)
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0)

    np.testing.assert_allclose(inner.received(), expected, rtol=1e-5)


def _mixed_precision_model(policy):
    keras.utils.set_random_seed(9)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        inputs = keras.Input(IMAGE_SHAPE)
        features = layers.Conv2D(4, 3, activation="relu")(inputs)
        features = layers.BatchNormalization()(features)
        features = layers.DepthwiseConv2D(2)(features)
        outputs = layers.Dense(NUM_CLASSES, dtype="float32")(layers.Flatten()(features))
        return keras.Model(inputs, outputs)
    finally:
        keras.config.set_dtype_policy(previous)


def test_mixed_float16_matches_float32():
    x, y = _data(4, seed=9)
    received = {}
    for policy in ("float32", "mixed_float16"):
        model = _mixed_precision_model(policy)
        model.compile(optimizer=RecordingSGD(0.1), loss=CROSS_ENTROPY)
        enable_per_example_norms(model)
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
        received[policy] = complete_norm_optimizer(model.optimizer).received()

    # Keras wraps the optimizer in a LossScaleOptimizer for mixed_float16. The
    # float16 forward pass limits the agreement.
    np.testing.assert_allclose(received["mixed_float16"], received["float32"], rtol=2e-3)


def _regularized_model():
    inputs = keras.Input(IMAGE_SHAPE)
    features = layers.Conv2D(
        3, 3, activation="relu", kernel_regularizer="l2", bias_regularizer="l1"
    )(inputs)
    features = layers.DepthwiseConv2D(2, depthwise_regularizer=keras.regularizers.L2(0.1))(
        features
    )
    features = layers.LayerNormalization(gamma_regularizer=keras.regularizers.L2(0.3))(
        layers.Flatten()(features)
    )
    outputs = layers.Dense(NUM_CLASSES, kernel_regularizer=keras.regularizers.L1L2(0.01, 0.02))(
        features
    )
    return keras.Model(inputs, outputs)


def _regularized_embedding_model():
    inputs = keras.Input((5,), dtype="int32")
    features = layers.Embedding(6, 3, embeddings_regularizer=keras.regularizers.L2(0.2))(inputs)
    features = layers.GroupNormalization(groups=1, beta_regularizer="l2")(features)
    outputs = layers.Dense(NUM_CLASSES, bias_regularizer=keras.regularizers.L2(0.5))(
        layers.Flatten()(features)
    )
    return keras.Model(inputs, outputs)


def _tokens(batch, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, size=(batch, 5)).astype("int32")
    y = rng.integers(0, NUM_CLASSES, size=batch).astype("int32")
    return x, y


@pytest.mark.parametrize("method", ["fast", "reference"])
@pytest.mark.parametrize("kind", ["images", "tokens"])
def test_regularizers_join_every_example(kind, method):
    keras.utils.set_random_seed(4)
    if kind == "images":
        model = _regularized_model()
        x, y = _data(4, seed=4)
    else:
        model = _regularized_embedding_model()
        x, y = _tokens(4, seed=4)

    expected = brute_force_norms(model, x, y)
    actual = engine_norms(model, x, y, method)

    assert_norms_close(actual, expected, [v.path for v in model.trainable_variables])


def test_custom_loop_hands_norms():
    keras.utils.set_random_seed(5)
    model = functional_model()
    x, y = _data(6, seed=5)
    expected = _expected_mean_norms(model, x, y)
    optimizer = RecordingSGD(0.1)
    optimizer.build(model.trainable_variables)
    norms_engine = PerExampleNorms(model)

    @tf.function
    def train_step(x, y):
        with norms_engine.record() as recording:
            loss = CROSS_ENTROPY(y, model(x, training=True))
        grads, norms = recording.gradients_and_norms(loss)
        optimizer.set_complete_norms(norms)
        optimizer.apply(grads, model.trainable_variables)

    train_step(tf.constant(x), tf.constant(y))

    np.testing.assert_allclose(optimizer.received(), expected, rtol=1e-5)


class Scale(layers.Layer):
    """A layer without a fast-path rule: multiplies its input by a learned vector."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale + tf.sin(inputs * self.scale)


def _model_with_reference_layers():
    # The shared Dense is applied to its own output, and Scale has no rule.
    inputs = keras.Input((5, 3))
    shared = layers.Dense(3, activation="tanh", name="shared")
    features = Scale(name="scale")(shared(shared(inputs)))
    outputs = layers.Dense(NUM_CLASSES, name="head")(layers.Flatten()(features))
    return keras.Model(inputs, outputs)


def _sequences(batch, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 5, 3)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=batch).astype("int32")
    return x, y


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_reference_layers_match_brute_force(method):
    keras.utils.set_random_seed(6)
    model = _model_with_reference_layers()
    x, y = _sequences(4, seed=6)

    expected = brute_force_norms(model, x, y)
    actual = engine_norms(model, x, y, method)

    assert_norms_close(actual, expected, [v.path for v in model.trainable_variables])


def test_rnn_cell_in_while_loop():
    # The cell runs inside tf.while_loop, so the RNN layer's call is the unit.
    keras.utils.set_random_seed(7)
    inputs = keras.Input((4, 3))
    features = layers.SimpleRNN(3, name="rnn")(inputs)
    model = keras.Model(inputs, layers.Dense(NUM_CLASSES)(features))
    x, y = _sequences(3, seed=7)
    x = x[:, :4]

    expected = brute_force_norms(model, x, y)
    actual = engine_norms(model, x, y, "fast")

    assert_norms_close(actual, expected, [v.path for v in model.trainable_variables])


def test_reference_layers_logged_once(caplog):
    keras.utils.set_random_seed(8)
    model = _model_with_reference_layers()
    x, y = _sequences(2, seed=8)

    with caplog.at_level(logging.WARNING, logger="clars_tf.per_example.engine"):
        engine_norms(model, x, y, "fast")
    messages = [
        r.getMessage() for r in caplog.records if r.name == "clars_tf.per_example.engine"
    ]

    assert len(messages) == 1
    for name in ("shared (Dense: called 2 times", "scale (Scale"):
        assert name in messages[0]
    assert "head" not in messages[0]


def test_enable_rejects_optimizer_without_norms():
    model = sequential_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=CROSS_ENTROPY)

    with pytest.raises(TypeError, match="SGD has no such method"):
        enable_per_example_norms(model)


def test_fit_rejects_optimizer_without_norms():
    model = sequential_model()
    enable_per_example_norms(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=CROSS_ENTROPY)
    x, y = _data(2)

    with pytest.raises(TypeError, match="SGD has no such method"):
        model.fit(x, y, verbose=0)


def test_complete_norm_optimizer_unwraps_loss_scale():
    inner = RecordingSGD()

    assert complete_norm_optimizer(keras.optimizers.LossScaleOptimizer(inner)) is inner


def test_enable_rejects_custom_train_step():
    class CustomStep(keras.Sequential):
        def train_step(self, data):
            return super().train_step(data)

    model = CustomStep([keras.Input((2,)), layers.Dense(1)])

    with pytest.raises(ValueError, match="CustomStep overrides train_step"):
        enable_per_example_norms(model)


def test_enabled_model_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(13)
    model = functional_model()
    x, y = _data(4, seed=13)
    model.compile(optimizer=CLARS(learning_rate=0.1), loss=CROSS_ENTROPY)
    enable_per_example_norms(model)
    model.fit(x, y, batch_size=4, verbose=0)

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)

    assert "train_step" not in loaded.__dict__
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_disable_restores_keras_train_step():
    keras.utils.set_random_seed(8)
    model = sequential_model()
    enable_per_example_norms(model)
    disable_per_example_norms(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=CROSS_ENTROPY)
    x, y = _data(2)

    history = model.fit(x, y, verbose=0)

    assert "train_step" not in model.__dict__
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"method": "exact"}, "Invalid method 'exact'"),
        ({"chunk_size": 0}, "Invalid chunk_size=0"),
        ({"chunk_size": 2.5}, "Invalid chunk_size=2.5"),
    ],
)
def test_engine_rejects_invalid_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        PerExampleNorms(sequential_model(), **arguments)


def test_norms_inside_recording_raise():
    model = sequential_model()
    x, y = _data(2)

    with pytest.raises(RuntimeError, match="inside the `with` block"):
        with PerExampleNorms(model).record() as recording:
            loss = CROSS_ENTROPY(y, model(x))
            recording.gradients_and_norms(loss)


def test_invalid_reduction_raises():
    model = sequential_model()
    x, y = _data(2)
    with PerExampleNorms(model).record() as recording:
        loss = CROSS_ENTROPY(y, model(x))

    with pytest.raises(ValueError, match="Invalid reduction 'sum'"):
        recording.gradients_and_norms(loss, reduction="sum")

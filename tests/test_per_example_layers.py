"""Per-example norms of each layer kind against one GradientTape per example.

Both paths (fast formulas and chunked Jacobian) must match the brute-force
norms to 1e-5 relative error, for every trainable variable of models without
cross-example coupling.
"""

import numpy as np
import pytest
import keras
from keras import layers

from test_per_example_support import assert_norms_close, brute_force_norms, engine_norms

NUM_CLASSES = 3


def _classifier(inputs, features):
    """Close a model with Flatten and a Dense head over NUM_CLASSES logits."""
    outputs = layers.Dense(NUM_CLASSES)(layers.Flatten()(features))
    return keras.Model(inputs, outputs)


def dense_rank2():
    inputs = keras.Input((6,))
    return _classifier(inputs, layers.Dense(5, activation="relu")(inputs))


def dense_sequence_materialized():
    # 7 positions of 4 features: materializing (7*4*5) is cheaper than the ghost norm.
    inputs = keras.Input((7, 4))
    return _classifier(inputs, layers.Dense(5, activation="tanh")(inputs))


def dense_sequence_ghost():
    # 2 positions of 40 features: the ghost norm (2*2*70) is cheaper.
    inputs = keras.Input((2, 40))
    return _classifier(inputs, layers.Dense(30, activation="swish")(inputs))


def conv(kernel_size, strides=1, padding="same", dilation_rate=1, size=(9, 8), filters=4):
    def build():
        inputs = keras.Input((*size, 3))
        features = layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            dilation_rate=dilation_rate,
            activation="relu",
        )(inputs)
        return _classifier(inputs, features)

    return build


def conv_ghost():
    # 2x2 output pixels and 16 -> 32 channels: the ghost norm is cheaper.
    inputs = keras.Input((4, 4, 16))
    return _classifier(inputs, layers.Conv2D(32, 3, activation="elu")(inputs))


def depthwise(kernel_size, strides=1, padding="same", dilation_rate=1, multiplier=2):
    def build():
        inputs = keras.Input((8, 9, 3))
        features = layers.DepthwiseConv2D(
            kernel_size,
            strides=strides,
            padding=padding,
            dilation_rate=dilation_rate,
            depth_multiplier=multiplier,
            activation="tanh",
        )(inputs)
        return _classifier(inputs, features)

    return build


def embedding_tokens():
    inputs = keras.Input((6,), dtype="int32")
    return _classifier(inputs, layers.Embedding(5, 4)(inputs))


def embedding_single_token():
    inputs = keras.Input((1,), dtype="int32")
    return _classifier(inputs, layers.Embedding(7, 4)(inputs))


def batch_norm():
    # Tests call it with training=False: an outer `training=True` would override a
    # `training=False` given here when the model was built.
    inputs = keras.Input((5, 5, 3))
    features = layers.Conv2D(4, 3)(inputs)
    normalization = layers.BatchNormalization()
    model = _classifier(inputs, layers.ReLU()(normalization(features)))
    rng = np.random.default_rng(1)
    normalization.moving_mean.assign(rng.normal(size=4).astype("float32"))
    normalization.moving_variance.assign(rng.uniform(0.5, 2.0, size=4).astype("float32"))
    normalization.gamma.assign(rng.normal(size=4).astype("float32"))
    return model


def layer_norm_last_axis():
    inputs = keras.Input((4, 6))
    features = layers.Dense(6)(inputs)
    return _classifier(inputs, layers.LayerNormalization()(features))


def layer_norm_several_axes():
    inputs = keras.Input((3, 4, 2))
    features = layers.Conv2D(3, 1)(inputs)
    return _classifier(inputs, layers.LayerNormalization(axis=[1, 3])(features))


def group_norm():
    inputs = keras.Input((4, 4, 3))
    features = layers.Conv2D(6, 3, padding="same")(inputs)
    return _classifier(inputs, layers.GroupNormalization(groups=3)(features))


CASES = {
    "dense_rank2": dense_rank2,
    "dense_sequence_materialized": dense_sequence_materialized,
    "dense_sequence_ghost": dense_sequence_ghost,
    "conv_3x3_same": conv(3),
    "conv_3x3_stride2_same_even": conv(3, strides=2, size=(8, 8)),
    "conv_3x2_stride21_valid": conv((3, 2), strides=(2, 1), padding="valid"),
    "conv_dilation2_same": conv(3, dilation_rate=2),
    "conv_dilation21_valid": conv((2, 3), dilation_rate=(2, 1), padding="valid"),
    "conv_1x1_stride2": conv(1, strides=2),
    "conv_5x5_stride3_same": conv(5, strides=3, size=(10, 11)),
    "conv_ghost": conv_ghost,
    "depthwise_3x3_same": depthwise(3),
    "depthwise_stride2_valid": depthwise(3, strides=2, padding="valid", multiplier=1),
    "depthwise_dilation2_same": depthwise((3, 2), dilation_rate=2, multiplier=3),
    "embedding_tokens": embedding_tokens,
    "embedding_single_token": embedding_single_token,
    "layer_norm_last_axis": layer_norm_last_axis,
    "layer_norm_several_axes": layer_norm_several_axes,
    "group_norm": group_norm,
}


def _inputs(model, batch, seed=0):
    rng = np.random.default_rng(seed)
    shape = model.inputs[0].shape[1:]
    if model.inputs[0].dtype == "int32":
        # Few distinct tokens so that examples repeat tokens.
        x = rng.integers(0, 4, size=(batch, *shape)).astype("int32")
    else:
        x = rng.normal(size=(batch, *shape)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=batch).astype("int32")
    return x, y


@pytest.mark.parametrize("method", ["fast", "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_norms_match_brute_force(case, method):
    keras.utils.set_random_seed(0)
    model = CASES[case]()
    x, y = _inputs(model, batch=5)

    expected = brute_force_norms(model, x, y)
    actual = engine_norms(model, x, y, method, chunk_size=2)

    assert_norms_close(actual, expected, [v.path for v in model.trainable_variables])


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_batch_norm_inference_matches_brute_force(method):
    keras.utils.set_random_seed(0)
    model = batch_norm()
    x, y = _inputs(model, batch=5)

    expected = brute_force_norms(model, x, y, training=False)
    actual = engine_norms(model, x, y, method, chunk_size=2, training=False)

    assert_norms_close(actual, expected, [v.path for v in model.trainable_variables])


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_batch_of_one_matches_brute_force(method):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    features = layers.Conv2D(3, 3, strides=2, padding="same", activation="relu")(inputs)
    features = layers.DepthwiseConv2D(2, activation="relu")(features)
    model = _classifier(inputs, layers.LayerNormalization()(features))
    x, y = _inputs(model, batch=1)

    expected = brute_force_norms(model, x, y)
    actual = engine_norms(model, x, y, method)

    assert_norms_close(actual, expected, [v.path for v in model.trainable_variables])

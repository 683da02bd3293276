"""Tests for clars_tf.models: builds, parameter counts, dtypes and a short training run."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from clars_tf.models import (
    MODEL_NAMES,
    OUTPUT_LAYER_NAME,
    ZeroPaddingShortcut,
    build_model,
    minimum_image_size,
)


def count_trainable_parameters(model):
    return sum(int(np.prod(variable.shape)) for variable in model.trainable_variables)


def cifar_resnet_parameters_by_hand(blocks_per_stage, num_classes):
    """Count the trainable parameters of a CIFAR ResNet from its architecture.

    Convolutions are 3x3 without bias. Batch normalization trains a scale and a
    shift per channel. Option A shortcuts have no parameters.
    """

    def conv3x3(in_channels, out_channels):
        return 3 * 3 * in_channels * out_channels

    def batch_norm(channels):
        return 2 * channels

    total = conv3x3(3, 16) + batch_norm(16)
    in_channels = 16
    for filters in (16, 32, 64):
        for _ in range(blocks_per_stage):
            total += conv3x3(in_channels, filters) + batch_norm(filters)
            total += conv3x3(filters, filters) + batch_norm(filters)
            in_channels = filters
    total += 64 * num_classes + num_classes
    return total


def random_images(batch_size, image_size, seed=0):
    generator = np.random.default_rng(seed)
    return generator.random((batch_size, image_size, image_size, 3), dtype=np.float32)


# --- Names and arguments -----------------------------------------------------------


def test_model_names_complete():
    expected = {"resnet50", "densenet121", "mobilenet_v1", "mobilenet_v2", "resnet20", "resnet56"}
    assert set(MODEL_NAMES) == expected


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="resnet18") as error:
        build_model("resnet18", num_classes=10, image_size=32)

    for name in MODEL_NAMES:
        assert name in str(error.value)


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "mobilenet_v1", "mobilenet_v2"])
def test_application_below_minimum_size(name):
    with pytest.raises(ValueError, match="at least 32x32"):
        build_model(name, num_classes=10, image_size=31)


def test_minimum_image_size_by_family():
    assert minimum_image_size("resnet50") == 32
    assert minimum_image_size("mobilenet_v2") == 32
    assert minimum_image_size("resnet20") == 1


@pytest.mark.parametrize(
    "arguments, argument_name",
    [
        (dict(name="resnet20", num_classes=0, image_size=32), "num_classes"),
        (dict(name="resnet20", num_classes=10, image_size=0), "image_size"),
        (dict(name="resnet20", num_classes=10, image_size=32.0), "image_size"),
        (
            dict(name="resnet20", num_classes=10, image_size=32, dtype_policy="float8"),
            "dtype_policy",
        ),
    ],
)
def test_invalid_argument_raises(arguments, argument_name):
    with pytest.raises(ValueError, match=argument_name):
        build_model(**arguments)


# --- CIFAR ResNets -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, blocks, paper_millions", [("resnet20", 3, 0.27), ("resnet56", 9, 0.85)]
)
def test_cifar_resnet_parameter_count(name, blocks, paper_millions):
    model = build_model(name, num_classes=10, image_size=32)

    count = count_trainable_parameters(model)

    assert count == cifar_resnet_parameters_by_hand(blocks, num_classes=10)
    assert round(count / 1e6, 2) == paper_millions


def test_cifar_resnet_variable_paths():
    model = build_model("resnet20", num_classes=10, image_size=32)
    paths = {variable.path for variable in model.trainable_variables}

    assert "stem_conv/kernel" in paths
    assert "stage1_block1_conv1/kernel" in paths
    assert "stage1_block1_bn1/gamma" in paths
    assert "stage3_block3_bn2/beta" in paths
    assert "logits/kernel" in paths
    assert "logits/bias" in paths


def test_cifar_resnet_layer_count():
    model = build_model("resnet56", num_classes=10, image_size=32)
    convolutions = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]

    # 6n + 2 weighted layers: 6n + 1 convolutions and the classifier.
    assert len(convolutions) == 6 * 9 + 1
    assert len(dense) == 1


def test_cifar_resnet_feature_map_sizes():
    model = build_model("resnet20", num_classes=10, image_size=32)

    assert model.get_layer("stage1_block3_relu2").output.shape == (None, 32, 32, 16)
    assert model.get_layer("stage2_block1_relu2").output.shape == (None, 16, 16, 32)
    assert model.get_layer("stage3_block3_relu2").output.shape == (None, 8, 8, 64)


def test_zero_padding_shortcut_values():
    inputs = random_images(2, 5)
    expected = np.zeros((2, 3, 3, 8), dtype=np.float32)
    expected[..., :3] = inputs[:, ::2, ::2, :]

    outputs = ZeroPaddingShortcut(filters=8, strides=2)(inputs)

    np.testing.assert_array_equal(keras.ops.convert_to_numpy(outputs), expected)


def test_seed_reproduces_weights():
    first = build_model("resnet20", num_classes=10, image_size=32, seed=7)
    second = build_model("resnet20", num_classes=10, image_size=32, seed=7)
    other = build_model("resnet20", num_classes=10, image_size=32, seed=8)

    for left, right in zip(first.weights, second.weights):
        np.testing.assert_array_equal(left.numpy(), right.numpy())
    assert not np.array_equal(first.weights[0].numpy(), other.weights[0].numpy())


def test_cifar_resnet_config_round_trip():
    model = build_model("resnet20", num_classes=10, image_size=32, seed=0)
    images = random_images(2, 32)

    restored = keras.Model.from_config(model.get_config())
    restored.set_weights(model.get_weights())

    np.testing.assert_allclose(restored(images), model(images), rtol=1e-5, atol=1e-6)


def test_resnet20_learns_tiny_task():
    # Class 1 images are brighter in the red channel than in the blue one.
    generator = np.random.default_rng(0)
    labels = generator.integers(0, 2, size=32)
    images = generator.random((32, 16, 16, 3), dtype=np.float32) * 0.5
    images[labels == 1, :, :, 0] += 0.5
    images[labels == 0, :, :, 2] += 0.5

    model = build_model("resnet20", num_classes=2, image_size=16, seed=0)
    optimizer = keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    losses = [float(train_step()) for _ in range(10)]

    assert losses[-1] < 0.25 * losses[0]
    predictions = np.argmax(model(images, training=True), axis=-1)
    assert np.mean(predictions == labels) == 1.0


# --- Dtype policies ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, policy",
    [
        ("resnet20", "mixed_bfloat16"),
        ("resnet56", "mixed_bfloat16"),
        ("mobilenet_v1", "mixed_bfloat16"),
        ("mobilenet_v2", "mixed_bfloat16"),
        ("resnet20", "mixed_float16"),
    ],
)
def test_mixed_policy_float32_logits(name, policy):
    global_policy = keras.config.dtype_policy().name

    model = build_model(name, num_classes=7, image_size=32, dtype_policy=policy)
    logits = model(random_images(2, 32))

    assert logits.shape == (2, 7)
    assert logits.dtype == tf.float32
    assert model.get_layer(OUTPUT_LAYER_NAME).compute_dtype == "float32"
    assert model.layers[1].compute_dtype == policy.removeprefix("mixed_")
    assert model.layers[1].variable_dtype == "float32"
    assert model.dtype_policy.name == policy
    assert keras.config.dtype_policy().name == global_policy


def test_default_policy_float32_logits():
    model = build_model("resnet20", num_classes=10, image_size=32)

    logits = model(random_images(1, 32))

    assert logits.dtype == tf.float32
    assert model.layers[1].compute_dtype == "float32"


# --- Keras applications at ImageNet size ---------------------------------------------
# ResNet-50 and DenseNet-121 take seconds to build, so each is built once, here.

APPLICATION_TRAINABLE_VARIABLES = {
    "resnet50": 214,
    "densenet121": 364,
    "mobilenet_v1": 83,
    "mobilenet_v2": 158,
}


@pytest.mark.parametrize("name", sorted(APPLICATION_TRAINABLE_VARIABLES))
def test_application_at_imagenet_size(name):
    model = build_model(name, num_classes=1000, image_size=224, dtype_policy="mixed_bfloat16")
    logits = model(random_images(1, 224))

    assert len(model.trainable_variables) == APPLICATION_TRAINABLE_VARIABLES[name]
    assert logits.shape == (1, 1000)
    assert logits.dtype == tf.float32
    assert np.all(np.isfinite(logits.numpy()))

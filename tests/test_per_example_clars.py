"""CLARS with per-example complete norms, trained on real CIFAR-10 photographs."""

import numpy as np
import pytest
import keras
from keras import layers
from PIL import Image

from clars_tf import CLARS
from clars_tf.per_example import enable_per_example_norms
from test_per_example_support import CROSS_ENTROPY, brute_force_norms

NUM_CLASSES = 10


def _load_cifar(cifar10_dir, per_class):
    """Return the first `per_class` training images of each class, scaled to [0, 1]."""
    classes = sorted(p.name for p in (cifar10_dir / "train").iterdir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((cifar10_dir / "train" / name).iterdir())[:per_class]:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB"), "float32") / 255.0)
            labels.append(label)
    order = np.random.default_rng(0).permutation(len(images))
    return np.stack(images)[order], np.array(labels, "int32")[order]


def _small_cnn(batch_norm):
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for filters in (8, 16):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=not batch_norm)(x)
        if batch_norm:
            x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(NUM_CLASSES)(x))


def test_clars_complete_norms_per_example(cifar10_dir):
    keras.utils.set_random_seed(21)
    x, y = _load_cifar(cifar10_dir, per_class=1)
    model = _small_cnn(batch_norm=False)
    expected = brute_force_norms(model, x, y).mean(axis=1)

    model.compile(optimizer=CLARS(learning_rate=0.1), loss=CROSS_ENTROPY)
    enable_per_example_norms(model)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    statistics = model.optimizer.layer_statistics()

    for variable, norm in zip(model.trainable_variables, expected):
        complete_norm = float(statistics[variable.path]["complete_norm"])
        assert complete_norm == pytest.approx(norm, rel=1e-5), variable.path


def test_clars_per_example_lowers_loss(cifar10_dir):
    keras.utils.set_random_seed(22)
    x, y = _load_cifar(cifar10_dir, per_class=32)
    model = _small_cnn(batch_norm=True)
    model.compile(optimizer=CLARS(learning_rate=5.0), loss=CROSS_ENTROPY)
    enable_per_example_norms(model)

    history = model.fit(x, y, batch_size=64, epochs=8, verbose=0)
    losses = history.history["loss"]

    # Training losses: the BatchNormalization moving statistics are far from
    # converged after 40 steps, so inference-mode losses would not show it.
    assert losses[-1] < 0.9 * losses[0]

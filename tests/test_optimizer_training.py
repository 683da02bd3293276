"""CLARS and LARS inside Keras: exclusions, fit, XLA, saving and checkpoints."""

import json
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import clars_tf


def conv_bn_model(image_size=16, classes=10, seed=0):
    """Conv2D + BatchNormalization + Dense, with readable variable paths."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))
    # No conv bias: batch normalization cancels its gradient.
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="conv1_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="conv2_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inputs, outputs)


def generated_task(count=256, image_size=16, classes=4, seed=0):
    """Images whose class sets the mean color of one channel: learnable fast."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    images = rng.normal(0.0, 1.0, (count, image_size, image_size, 3)).astype("float32")
    images[:, :, :, 0] += (labels[:, None, None] - classes / 2).astype("float32")
    return images, labels


def compile_model(model, optimizer, **kwargs):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs,
    )
    return model


def test_weight_decay_exclusion_by_path():
    model = conv_bn_model()
    optimizer = clars_tf.CLARS(
        learning_rate=0.1,
        momentum=0.0,
        weight_decay=0.1,
        exclude_from_weight_decay=["_bn/", "bias"],
    )
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    zeros = [tf.zeros_like(v) for v in model.trainable_variables]
    optimizer.apply(zeros, model.trainable_variables)

    # With a zero gradient only weight decay moves a variable.
    for variable in model.trainable_variables:
        changed = not np.array_equal(variable.numpy(), before[variable.path])
        excluded = "_bn/" in variable.path or "bias" in variable.path
        assert changed != excluded, variable.path


def test_default_adaptation_skips_rank_one():
    model = conv_bn_model()
    x, y = generated_task(32)
    optimizer = clars_tf.CLARS(learning_rate=0.1, gradient_accumulation_steps=2)
    compile_model(model, optimizer).fit(x, y, batch_size=16, epochs=1, verbose=0)
    statistics = optimizer.layer_statistics()
    for variable in model.trainable_variables:
        ratio = float(statistics[variable.path]["trust_ratio"])
        if len(variable.shape) <= 1:
            assert ratio == 1.0, variable.path
        else:
            assert 0.0 < ratio <= 0.1, variable.path


def test_empty_adaptation_list_adapts_everything():
    model = conv_bn_model()
    x, y = generated_task(32)
    optimizer = clars_tf.CLARS(gradient_accumulation_steps=2, exclude_from_layer_adaptation=[])
    # Two updates: biases and offsets start at zero, where the ratio is 1.
    compile_model(model, optimizer).fit(x, y, batch_size=16, epochs=2, verbose=0)
    statistics = optimizer.layer_statistics()
    for variable in model.trainable_variables:
        assert float(statistics[variable.path]["trust_ratio"]) < 1.0, variable.path


def test_unmatched_pattern_warns_with_pattern():
    model = conv_bn_model()
    optimizer = clars_tf.CLARS(exclude_from_weight_decay=["batch_normalization"])
    with pytest.warns(UserWarning, match="'batch_normalization' matches no variable"):
        optimizer.build(model.trainable_variables)


def test_matched_patterns_do_not_warn():
    model = conv_bn_model()
    optimizer = clars_tf.LARS(
        exclude_from_weight_decay=["_bn/"], exclude_from_layer_adaptation=["bias"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.build(model.trainable_variables)


@pytest.mark.parametrize("cls", [clars_tf.CLARS, clars_tf.LARS])
def test_fit_lowers_loss_on_generated_task(cls):
    model = conv_bn_model(classes=4)
    x, y = generated_task(256)
    optimizer = cls(learning_rate=2.0, weight_decay=1e-4, gradient_accumulation_steps=2)
    history = compile_model(model, optimizer).fit(x, y, batch_size=32, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]


def load_cifar_sample(root, per_class=30):
    images, labels = [], []
    classes = sorted(p.name for p in (root / "train").iterdir())
    for label, name in enumerate(classes):
        for path in sorted((root / "train" / name).glob("*.jpg"))[:per_class]:
            images.append(np.asarray(Image.open(path).convert("RGB"), np.float32) / 127.5 - 1.0)
            labels.append(label)
    return np.stack(images), np.array(labels)


def test_fit_lowers_loss_on_real_images(cifar10_dir):
    x, y = load_cifar_sample(cifar10_dir)
    assert x.shape == (300, 32, 32, 3)
    model = conv_bn_model(image_size=32, classes=10)
    optimizer = clars_tf.CLARS(learning_rate=2.0, weight_decay=1e-4, gradient_accumulation_steps=2)
    history = compile_model(model, optimizer).fit(
        x, y, batch_size=30, epochs=8, shuffle=True, verbose=0
    )
    losses = history.history["loss"]
    assert losses[-1] < 0.85 * losses[0]


class TraceCounter(keras.callbacks.Callback):
    """Count traces of the optimizer update, and those after the first step."""

    def __init__(self, optimizer):
        super().__init__()
        self.traces = 0
        self.traces_after_first_step = None
        update_step = optimizer._backend_update_step

        def counting_update_step(*args, **kwargs):
            self.traces += 1
            return update_step(*args, **kwargs)

        optimizer._backend_update_step = counting_update_step

    def on_train_batch_end(self, batch, logs=None):
        if self.traces_after_first_step is None:
            self.traces_after_first_step = -self.traces
        self.last_count = self.traces_after_first_step + self.traces


def test_jit_compile_does_not_retrace_update():
    model = conv_bn_model(classes=4)
    x, y = generated_task(64)
    optimizer = clars_tf.CLARS(learning_rate=0.5, gradient_accumulation_steps=2)
    counter = TraceCounter(optimizer)
    compile_model(model, optimizer, jit_compile=True).fit(
        x, y, batch_size=16, epochs=3, verbose=0, callbacks=[counter]
    )
    assert int(optimizer._iterations.numpy()) == 12
    # tf.function may trace twice on its first call; never again after it.
    assert counter.traces >= 1
    assert counter.last_count == 0


def test_keras_file_loads_in_fresh_process(tmp_path):
    x, y = generated_task(64, classes=4)
    model = compile_model(
        conv_bn_model(classes=4),
        clars_tf.CLARS(learning_rate=0.5, weight_decay=1e-3, exclude_from_weight_decay=["_bn/"]),
    )
    model.fit(x[:32], y[:32], batch_size=16, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "batch.npz", x=x[32:], y=y[32:])
    expected_config = model.optimizer.get_config()

    # Continue here; the fresh process must take the same step, which it can
    # only do with the saved momentum.
    model.fit(x[32:], y[32:], batch_size=32, epochs=1, shuffle=False, verbose=0)
    expected_weights = [v.numpy() for v in model.trainable_variables]

    script = textwrap.dedent(
        f"""
        import json
        import numpy as np
        import keras
        import clars_tf

        model = keras.models.load_model({str(tmp_path / "model.keras")!r})
        batch = np.load({str(tmp_path / "batch.npz")!r})
        model.fit(batch["x"], batch["y"], batch_size=32, epochs=1, shuffle=False, verbose=0)
        np.savez({str(tmp_path / "after.npz")!r}, *[v.numpy() for v in model.trainable_variables])
        print(json.dumps({{"type": type(model.optimizer).__name__,
                           "config": model.optimizer.get_config()}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["type"] == "CLARS"
    assert loaded["config"] == json.loads(json.dumps(expected_config))
    after = np.load(tmp_path / "after.npz")
    for index, expected in enumerate(expected_weights):
        np.testing.assert_allclose(after[f"arr_{index}"], expected, rtol=1e-5, atol=1e-6)


def train_steps(model, optimizer, batches):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)

    for x, y in batches:
        step(x, y)


@pytest.mark.parametrize("cls", [clars_tf.CLARS, clars_tf.LARS])
def test_checkpoint_restore_continues_exactly(cls, tmp_path):
    x, y = generated_task(96, classes=4)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 96, 16)]

    def fresh():
        model = conv_bn_model(classes=4)
        optimizer = cls(learning_rate=0.5, weight_decay=1e-3, gradient_accumulation_steps=2)
        optimizer.build(model.trainable_variables)
        return model, optimizer

    model, optimizer = fresh()
    train_steps(model, optimizer, batches)
    uninterrupted = [v.numpy() for v in model.variables]

    model, optimizer = fresh()
    # Three calls stop in the middle of an accumulation cycle.
    train_steps(model, optimizer, batches[:3])
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(tmp_path / "ckpt")

    model, optimizer = fresh()
    tf.train.Checkpoint(model=model, optimizer=optimizer).restore(path).assert_consumed()
    train_steps(model, optimizer, batches[3:])
    for expected, variable in zip(uninterrupted, model.variables):
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6, atol=1e-7)

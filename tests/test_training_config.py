"""Checks of training settings that run before any work, and the factories."""

import keras
import numpy as np
import pytest

import clars_tf
from clars_tf.training import ConfigError, TrainConfig
from clars_tf.training import factory


def valid_config(tmp_path, **changes):
    values = dict(model_dir=str(tmp_path), dataset="synthetic", model="resnet20", image_size=32)
    values.update(changes)
    return TrainConfig(**values)


INVALID = [
    (dict(model="resnet18"), "--model='resnet18' is not valid"),
    (dict(optimizer="adam"), "--optimizer='adam' is not valid"),
    (dict(global_batch_size=0), "--global_batch_size must be > 0"),
    (dict(global_batch_size=-8), "--global_batch_size must be > 0"),
    (dict(image_size=0), "--image_size must be > 0"),
    (dict(epochs=0), "--epochs must be > 0"),
    (dict(train_steps=-1), "--train_steps must be >= 0"),
    (dict(base_learning_rate=0.0), "--base_learning_rate must be > 0"),
    (dict(weight_decay=-1e-4), "--weight_decay must be >= 0"),
    (dict(label_smoothing=1.0), "--label_smoothing must be in"),
    (dict(model_dir=None), "--model_dir is missing"),
    (dict(tpu="grpc://127.0.0.1:8470"), "--tpu='grpc://127.0.0.1:8470' is only used with --strategy=tpu"),
    (dict(strategy="tpu"), "--strategy=tpu needs --tpu"),
    (dict(cpu_replicas=2), "--cpu_replicas=2 splits this machine's CPU"),
    (dict(dataset="folder"), "reads files from --data_dir, which is missing"),
    (dict(dataset="folder", data_dir="/no/such/folder"), "--data_dir=/no/such/folder does not exist"),
    (dict(dataset="tfrecord", data_dir="/no/such/shards"), "--data_dir=/no/such/shards does not exist"),
    (dict(label_offset=0), "--label_offset only applies to --dataset=tfrecord"),
    (dict(max_trust_ratio="big"), "--max_trust_ratio must be a number or 'none'"),
    (dict(max_trust_ratio="0"), "--max_trust_ratio must be > 0"),
    (dict(complete_norm_source="replica", optimizer="lars"), "--optimizer=lars has none"),
    (dict(complete_norm_source="accumulation"), "needs --gradient_accumulation_steps >= 2"),
    (dict(complete_norm_source="batch", gradient_accumulation_steps=2), "would add micro-batch"),
    (dict(warmup_epochs=90, epochs=90), "--warmup_epochs=90 must be shorter"),
    (dict(cpu_replicas=2, strategy="multi_worker_mirrored"), "--cpu_replicas=2 splits this machine's CPU"),
]


@pytest.mark.parametrize("changes, message", INVALID)
def test_invalid_setting_raises(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        valid_config(tmp_path, **changes).validate()


def test_valid_setting_passes(tmp_path):
    valid_config(tmp_path).validate()


def test_max_trust_ratio_none_disables_clip(tmp_path):
    config = valid_config(tmp_path, max_trust_ratio="none")
    optimizer = factory.build_optimizer(config, 0.1)
    assert optimizer.max_trust_ratio is None


def test_peak_learning_rate_linear_scaling(tmp_path):
    config = valid_config(
        tmp_path, base_learning_rate=0.128, global_batch_size=1024, gradient_accumulation_steps=4
    )
    # 0.128 per 256 examples, for 4096 examples per update.
    assert factory.peak_learning_rate(config) == pytest.approx(0.128 * 4096 / 256)


def test_sgd_is_momentum_sgd_with_coupled_decay(tmp_path):
    """--optimizer=sgd: v = m v + (g + wd w); w -= lr v, as PyTorch's SGD."""
    config = valid_config(tmp_path, optimizer="sgd", momentum=0.9, weight_decay=0.01)
    optimizer = factory.build_optimizer(config, 0.5)
    weights = np.array([[1.0, -2.0], [0.5, 3.0]])
    gradients = [np.array([[0.1, 0.2], [-0.3, 0.4]]), np.array([[0.2, -0.1], [0.0, 0.5]])]
    variable = keras.Variable(initializer=weights, dtype="float32", name="kernel")
    expected = weights.copy()
    velocity = np.zeros_like(weights)
    for gradient in gradients:
        optimizer.apply([gradient.astype("float32")], [variable])
        velocity = 0.9 * velocity + gradient + 0.01 * expected
        expected = expected - 0.5 * velocity
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "source, expected_replica_norms", [("auto", True), ("replica", True), ("batch", False)]
)
def test_complete_norm_source_sets_replica_norms(tmp_path, source, expected_replica_norms):
    optimizer = factory.build_optimizer(valid_config(tmp_path, complete_norm_source=source), 0.1)
    assert optimizer.replica_norms is expected_replica_norms


def test_float16_wraps_in_loss_scale_optimizer(tmp_path):
    optimizer = factory.build_optimizer(valid_config(tmp_path, dtype="float16"), 0.1)
    assert isinstance(optimizer, clars_tf.LossScaleOptimizer)
    assert isinstance(optimizer.inner_optimizer, clars_tf.CLARS)


def test_poly_schedule_uses_warmup_epochs(tmp_path):
    config = valid_config(tmp_path, warmup_epochs=2, base_learning_rate=0.256, global_batch_size=256)
    schedule = factory.build_schedule(config, steps_per_epoch=10, total_steps=100)
    # Linear warmup over 20 steps to the peak 0.256.
    assert float(schedule(10)) == pytest.approx(0.128)
    assert float(schedule(0)) == 0.0

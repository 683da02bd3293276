"""Tests for `build_dataset` options: strategies, determinism, dtype, synthetic data, caching."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from clars_tf.data import build_dataset, get_dataset_info
from conftest import mirrored_strategy
from test_data_support import make_image_folder

IMAGE_SIZE = 24


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Folder of 4 classes with 6 images of 40x48 pixels each."""
    return make_image_folder(tmp_path_factory.mktemp("folder"), {f"c{i}": 6 for i in range(4)})


def _build(image_folder, **options):
    settings = dict(
        data_dir=image_folder,
        global_batch_size=8,
        training=True,
        image_size=IMAGE_SIZE,
        seed=0,
    )
    settings.update(options)
    return build_dataset("folder", "train", **settings)


def _take(dataset, count):
    return [(images.numpy(), labels.numpy()) for images, labels in dataset.take(count)]


@pytest.fixture
def bfloat16_policy():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy(previous)


def test_training_batch_shapes_and_dtypes(image_folder):
    images, labels = _take(_build(image_folder), 1)[0]

    assert images.shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert images.dtype == np.float32
    assert labels.dtype == np.int32
    assert set(labels) <= {0, 1, 2, 3}


def test_training_repeats_and_drops_remainder(image_folder):
    batches = _take(_build(image_folder, global_batch_size=5), 10)

    assert len(batches) == 10
    assert all(images.shape[0] == 5 for images, _ in batches)


def test_eval_keeps_partial_batch(image_folder):
    dataset = _build(image_folder, global_batch_size=5, training=False)

    sizes = [images.shape[0] for images, _ in dataset]

    assert sizes == [5, 5, 5, 5, 4]


def test_dtype_follows_mixed_precision_policy(image_folder, bfloat16_policy):
    images, _ = _take(_build(image_folder), 1)[0]

    assert images.dtype == tf.bfloat16.as_numpy_dtype


def test_explicit_dtype_overrides_policy(image_folder, bfloat16_policy):
    images, _ = _take(_build(image_folder, dtype="float16"), 1)[0]

    assert images.dtype == np.float16


def test_deterministic_same_seed_repeats(image_folder):
    first = _take(_build(image_folder, deterministic=True, seed=3), 3)
    second = _take(_build(image_folder, deterministic=True, seed=3), 3)

    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        assert np.array_equal(labels_a, labels_b)
        assert np.array_equal(images_a, images_b)


def test_different_seeds_differ(image_folder):
    first = _take(_build(image_folder, deterministic=True, seed=3), 1)[0]
    second = _take(_build(image_folder, deterministic=True, seed=4), 1)[0]

    assert not np.array_equal(first[0], second[0])


def test_epochs_reshuffle_and_reaugment(image_folder):
    # 24 images in batches of 24: batch 0 is epoch 1, batch 1 is epoch 2.
    (images_1, labels_1), (images_2, labels_2) = _take(
        _build(image_folder, global_batch_size=24, deterministic=True), 2
    )

    assert sorted(labels_1) == sorted(labels_2)
    assert not np.array_equal(labels_1, labels_2)
    assert not np.array_equal(np.sort(images_1.ravel()), np.sort(images_2.ravel()))


def test_deterministic_training_needs_seed(image_folder):
    with pytest.raises(ValueError, match="needs a seed"):
        _build(image_folder, deterministic=True, seed=None)


def test_cache_keeps_examples(image_folder, tmp_path):
    for cache in [True, str(tmp_path / "cache")]:
        dataset = _build(image_folder, training=False, cache=cache)

        labels = np.concatenate([labels for _, labels in dataset])
        labels_again = np.concatenate([labels for _, labels in dataset])

        assert sorted(labels) == sorted([0, 1, 2, 3] * 6)
        assert sorted(labels_again) == sorted(labels)


def test_mirrored_strategy_per_replica_batch(image_folder):
    strategy = mirrored_strategy(2)

    dataset = _build(image_folder, strategy=strategy)
    images, labels = next(iter(dataset))

    local_images = strategy.experimental_local_results(images)
    local_labels = strategy.experimental_local_results(labels)
    assert len(local_images) == 2
    assert [part.shape[0] for part in local_images] == [4, 4]
    assert [part.shape[0] for part in local_labels] == [4, 4]
    assert local_images[0].shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)


@pytest.mark.parametrize("autotune", [True, False])
def test_mirrored_replicas_cover_one_epoch(tmp_path, autotune):
    # Uneven classes: replicas reading the same files would change the labels seen.
    uneven = make_image_folder(tmp_path, {"c0": 1, "c1": 2, "c2": 3, "c3": 6})
    strategy = mirrored_strategy(2)
    dataset = _build(uneven, strategy=strategy, global_batch_size=4, autotune=autotune)

    labels = []
    iterator = iter(dataset)
    for _ in range(3):
        _, batch_labels = next(iterator)
        local = [part.numpy() for part in strategy.experimental_local_results(batch_labels)]
        assert [part.shape[0] for part in local] == [2, 2]
        labels.extend(np.concatenate(local).tolist())

    assert sorted(labels) == [0, 1, 1, 2, 2, 2] + [3] * 6


def test_batch_not_divisible_by_replicas_raises(image_folder):
    strategy = mirrored_strategy(2)

    with pytest.raises(ValueError, match="not divisible by the 2 replicas"):
        _build(image_folder, strategy=strategy, global_batch_size=7)


def test_strategy_and_input_context_rejected(image_folder):
    strategy = mirrored_strategy(2)
    context = tf.distribute.InputContext(1, 0, 2)

    with pytest.raises(ValueError, match="either strategy or input_context"):
        _build(image_folder, strategy=strategy, input_context=context)


def test_input_pipelines_split_files(image_folder):
    parts = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline_id, num_replicas_in_sync=4
        )
        dataset = _build(image_folder, input_context=context, training=False, global_batch_size=8)
        parts.append([images for images, _ in dataset.as_numpy_iterator()])

    sizes = [[batch.shape[0] for batch in part] for part in parts]
    assert sizes == [[2, 2, 2, 2, 2, 2], [2, 2, 2, 2, 2, 2]]
    first = np.concatenate(parts[0]).reshape(12, -1)
    second = np.concatenate(parts[1]).reshape(12, -1)
    assert not any(np.array_equal(a, b) for a in first for b in second)


def _tiny_model(num_classes: int) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(num_classes),
        ]
    )
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


@pytest.mark.parametrize("source", ["folder", "synthetic"])
def test_keras_fit_under_mirrored_strategy(image_folder, source):
    strategy = mirrored_strategy(2)
    dataset = build_dataset(
        source, "train", data_dir=image_folder, global_batch_size=8, training=True,
        image_size=IMAGE_SIZE, strategy=strategy, seed=0, num_classes=4,
    )
    with strategy.scope():
        model = _tiny_model(4)

    history = model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0)

    assert np.isfinite(history.history["loss"][0])


def test_custom_loop_under_mirrored_strategy(image_folder):
    strategy = mirrored_strategy(2)
    dataset = _build(image_folder, strategy=strategy)

    @tf.function
    def replica_sums(images, labels):
        return strategy.run(lambda x, y: (tf.shape(x)[0], tf.reduce_sum(y)), args=(images, labels))

    counts, _ = replica_sums(*next(iter(dataset)))

    assert strategy.reduce("SUM", counts, axis=None).numpy() == 8


def test_synthetic_shapes_and_dtype():
    dataset = build_dataset(
        "synthetic", "train", global_batch_size=4, training=True, image_size=16,
        num_classes=7, dtype="bfloat16", seed=1,
    )

    images, labels = _take(dataset, 1)[0]

    assert images.shape == (4, 16, 16, 3)
    assert images.dtype == tf.bfloat16.as_numpy_dtype
    assert labels.dtype == np.int32
    assert labels.min() >= 0
    assert labels.max() < 7


def test_synthetic_eval_is_finite():
    dataset = build_dataset(
        "synthetic", "validation", global_batch_size=1000, training=False, image_size=8
    )

    assert sum(1 for _ in dataset) == 50


def test_synthetic_info():
    info = get_dataset_info("synthetic", num_classes=10, image_size=32)

    assert info.num_classes == 10
    assert info.small_images
    assert info.num_examples("train") == 1_281_167
    assert info.num_examples("val") == 50_000


def test_info_unknown_split_raises():
    info = get_dataset_info("synthetic")

    with pytest.raises(ValueError, match="has no split 'test'"):
        info.num_examples("test")


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(global_batch_size=0), "global_batch_size must be >= 1"),
        (dict(image_size=0), "image_size must be >= 1"),
        (dict(preprocessing="cifar"), "invalid preprocessing 'cifar'"),
    ],
)
def test_invalid_arguments_raise(image_folder, options, match):
    with pytest.raises(ValueError, match=match):
        _build(image_folder, **options)


def test_preprocessing_override_small(image_folder):
    # The small-image path resizes 40x48 images to image_size before padding
    # and cropping, so the output keeps the requested size.
    images, _ = _take(_build(image_folder, preprocessing="small", image_size=32), 1)[0]

    assert images.shape == (8, 32, 32, 3)

"""The input pipeline entry points: `get_dataset_info` and `build_dataset`.

A source is one of:

- `"synthetic"`: random batches of the requested shape and dtype.
- `"folder"`: an image folder in the ImageNet raw layout under `data_dir`.
- `"tfrecord"`: shards in the standard ImageNet TFRecord layout under
  `data_dir` (local or `gs://`).
- any other name, optionally prefixed with `tfds:`: a tensorflow-datasets
  image classification dataset, with `data_dir` as the tfds data directory.
"""

import dataclasses
import logging
import os

import keras
import tensorflow as tf

from clars_tf.data import folder, synthetic
from clars_tf.data import preprocessing as prep
from clars_tf.data.bad_files import BadFileLog, keep_decodable
from clars_tf.data.sources import (
    SMALL_IMAGE_MAX_SIDE,
    SOURCE_SYNTHETIC,
    DatasetInfo,
    default_label_offset,
    open_source,
)

logger = logging.getLogger(__name__)

PREPROCESSING_CHOICES = ("auto", "imagenet", "small")

DEFAULT_SHUFFLE_BUFFER = 10_000
DEFAULT_SMALL_IMAGE_SHUFFLE_BUFFER = 50_000


def get_dataset_info(
    source: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = True,
    label_offset: int | None = None,
    num_classes: int | None = None,
    image_size: int = 224,
) -> DatasetInfo:
    """Return the number of classes, the split sizes and the image kind of a source.

    No image is decoded except a few to tell small from ImageNet-style
    images. A folder source lists its files. A tfds dataset that is not
    prepared is prepared first (unless `download=False`, which raises).

    Args:
        source: `"synthetic"`, `"folder"`, `"tfrecord"` or a tfds name.
        data_dir: the folder, the shard folder or the tfds data directory.
        manual_dir: tfds manual download folder (imagenet2012 tars).
        download: whether tfds may download and prepare a missing dataset.
        label_offset: added to TFRecord labels. The default -1 maps the stored
            1..N to 0..N-1, and 0 keeps class 0 as a background class (N + 1
            classes). Only the tfrecord source accepts it.
        num_classes: number of classes of synthetic data (default 1000).
        image_size: side of synthetic images, which are small when it is at
            most 64.
    """
    if source == SOURCE_SYNTHETIC:
        return DatasetInfo(
            source=source,
            num_classes=num_classes or synthetic.SYNTHETIC_NUM_CLASSES,
            split_sizes=dict(synthetic.SYNTHETIC_SPLIT_SIZES),
            small_images=image_size <= SMALL_IMAGE_MAX_SIDE,
        )
    if label_offset is None:
        label_offset = default_label_offset(source)
    opened = open_source(
        source, data_dir=data_dir, manual_dir=manual_dir, download=download, label_offset=label_offset
    )
    return opened.info


# --------------------------------------------------------------------------
# build_dataset


@dataclasses.dataclass(frozen=True)
class _PipelineSettings:
    split: str
    global_batch_size: int
    training: bool
    image_size: int
    seed: int | None
    deterministic: bool
    cache: bool | str
    repeat: bool
    num_classes: int
    dtype: str
    small_images: bool
    shuffle_buffer_size: int
    bad_file_log: BadFileLog | None
    report_bad_files: bool
    autotune: bool


def _validate_arguments(
    *, global_batch_size, image_size, training, deterministic, seed, preprocessing, strategy
) -> None:
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if preprocessing not in PREPROCESSING_CHOICES:
        raise ValueError(
            f"invalid preprocessing {preprocessing!r}. Use one of {PREPROCESSING_CHOICES}."
        )
    if training and deterministic and seed is None:
        raise ValueError("deterministic=True for training needs a seed. Pass seed=<int>.")
    if strategy is not None and global_batch_size % strategy.num_replicas_in_sync:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by the "
            f"{strategy.num_replicas_in_sync} replicas of the strategy. Use a multiple "
            f"of {strategy.num_replicas_in_sync}"
        )


def _preprocess_fn(settings: _PipelineSettings):
    """Return the map function from (encoded, label[, seed]) to (normalized image, label).

    Normalization runs here, inside the parallel per-image map.
    """
    size = settings.image_size
    dtype = settings.dtype

    if settings.training:
        if settings.small_images:
            augment = prep.preprocess_small_train
        else:
            augment = prep.preprocess_imagenet_train

        def preprocess_train(contents, label, seed):
            return prep.normalize(augment(contents, seed, size), dtype), label

        return preprocess_train

    if settings.small_images:
        resize = prep.preprocess_small_eval
    else:
        resize = prep.preprocess_imagenet_eval

    def preprocess_eval(contents, label):
        return prep.normalize(resize(contents, size), dtype), label

    return preprocess_eval


def _check_labels_fn(settings: _PipelineSettings, source_name: str):
    """Return the batch map that raises on labels outside [0, num_classes)."""
    message = (
        f"label outside [0, {settings.num_classes}) in {source_name} split {settings.split}. "
        "Pass num_classes= the model's number of classes, or for TFRecord shards "
        "with labels 1..N use label_offset=-1"
    )

    def check_labels(images: tf.Tensor, labels: tf.Tensor):
        checks = [
            tf.debugging.assert_non_negative(labels, message=message),
            tf.debugging.assert_less(labels, settings.num_classes, message=message),
        ]
        with tf.control_dependencies(checks):
            labels = tf.identity(labels)
        return images, labels

    return check_labels


def _augmentation_seeds(seed: int | None) -> tf.data.Dataset:
    """Return an endless dataset of [2] int64 seeds for the stateless random ops."""
    return tf.data.Dataset.random(seed=seed).batch(2)


def _pipeline_seed(seed: int | None, input_context) -> int | None:
    if seed is None or input_context is None:
        return seed
    return seed + input_context.input_pipeline_id


def _make_dataset(source_object, source_name: str, settings: _PipelineSettings, input_context):
    """Build the tf.data pipeline of one input pipeline (one host)."""
    if input_context is None:
        batch_size = settings.global_batch_size
    else:
        batch_size = input_context.get_per_replica_batch_size(settings.global_batch_size)
    seed = _pipeline_seed(settings.seed, input_context)

    dataset = source_object.records(
        settings.split,
        input_context=input_context,
        shuffle_files=settings.training,
        seed=seed,
        deterministic=settings.deterministic,
        bad_file_log=settings.bad_file_log,
    )

    def keep(contents, label, name):
        log = settings.bad_file_log if settings.report_bad_files else None
        return keep_decodable(contents, name, log)

    def drop_name(contents, label, name):
        return contents, label

    dataset = dataset.filter(keep).map(drop_name)

    if settings.cache is not False:
        dataset = dataset.cache("" if settings.cache is True else settings.cache)
    if settings.training and (settings.cache is not False or source_object.needs_record_shuffle):
        dataset = dataset.shuffle(settings.shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True)
    if settings.repeat:
        dataset = dataset.repeat()

    if settings.training:
        def add_seed(record, seed_pair):
            contents, label = record
            return contents, label, seed_pair

        dataset = tf.data.Dataset.zip((dataset, _augmentation_seeds(seed)))
        dataset = dataset.map(add_seed)
    dataset = dataset.map(
        _preprocess_fn(settings),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=settings.deterministic,
    )
    # Files that pass the header checks but fail to decode (corrupt data
    # inside the file), or that vanished after listing, are dropped here.
    # NOTE: those drops are not counted in the BadFileLog and not named.
    dataset = dataset.ignore_errors()

    dataset = dataset.batch(
        batch_size,
        drop_remainder=settings.training,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=settings.deterministic,
    )
    dataset = dataset.map(_check_labels_fn(settings, source_name))
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(_dataset_options(settings))


def _dataset_options(settings: _PipelineSettings) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = settings.deterministic
    options.autotune.enabled = settings.autotune
    return options


def build_dataset(
    source: str,
    split: str,
    *,
    global_batch_size: int,
    training: bool,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    strategy: tf.distribute.Strategy | None = None,
    input_context: tf.distribute.InputContext | None = None,
    seed: int | None = None,
    deterministic: bool = False,
    cache: bool | str = False,
    repeat: bool | None = None,
    label_offset: int | None = None,
    num_classes: int | None = None,
    dtype: str | tf.DType | None = None,
    preprocessing: str = "auto",
    shuffle_buffer_size: int | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = True,
    bad_file_log: BadFileLog | None = None,
    report_bad_files: bool = True,
    autotune: bool = True,
) -> tf.data.Dataset | tf.distribute.DistributedDataset:
    """Build the batched `(images, labels)` input pipeline of one split.

    Training pipelines shuffle (files and records), augment, repeat and drop
    the last partial batch. Evaluation pipelines do not shuffle, apply the
    deterministic eval preprocessing and keep the last partial batch. Unless
    `deterministic` is True, parallel decoding may still change the order.
    Files that are not decodable images are skipped and reported to
    `bad_file_log`.

    Args:
        source: `"synthetic"`, `"folder"`, `"tfrecord"` or a tfds dataset
            name (`"imagenet2012"`, `"tfds:cifar10"`).
        split: `"train"`, `"validation"` (or `"val"`), `"test"`, or any tfds split.
        global_batch_size: batch size summed over all replicas.
        training: whether to build the training pipeline.
        data_dir: image folder, shard folder (local or `gs://`) or tfds data
            directory.
        image_size: side of the square output images, in pixels.
        strategy: with a strategy, returns
            `strategy.distribute_datasets_from_function(...)`: each input
            pipeline (host) reads its own part of the data and batches
            `global_batch_size / num_replicas_in_sync` examples per replica.
        input_context: without a strategy, builds the pipeline of this
            input pipeline only: its share of the data, batched per replica.
            For callers that distribute the dataset themselves.
        seed: seed for shuffling and augmentation, or None for a random one.
        deterministic: whether element order is reproducible (slower
            parallel map). Training then needs a seed.
        cache: True caches the encoded images in memory, a string caches
            them in that file. Augmentation still differs per epoch.
        repeat: whether to repeat forever. Defaults to `training`.
        label_offset: added to the stored TFRecord labels. The default -1
            maps 1..N to 0..N-1, 0 keeps a background class 0.
        num_classes: the model's number of classes. Must be at least the
            source's, and labels at or above it raise at run time. Defaults to
            the source's (1000 for synthetic data).
        dtype: output image dtype. Defaults to the compute dtype of
            `keras.mixed_precision.global_policy()`.
        preprocessing: `"auto"` (decided by `DatasetInfo.small_images`),
            `"imagenet"` or `"small"`.
        shuffle_buffer_size: records in the shuffle buffer of TFRecord and
            tfds sources or of a cached dataset. Defaults to 10,000 (50,000
            for small images).
        manual_dir: tfds manual download folder (imagenet2012 tars).
        download: whether tfds may download and prepare a missing dataset.
        bad_file_log: receives the skipped files. A new one is used if None.
        report_bad_files: whether files rejected inside the pipeline are
            counted and named, through a `tf.py_function` that runs only for
            rejected files. Pass False where the pipeline runs outside the
            Python process that built it (tf.data service, remote TPU
            workers); bad files are then still skipped, silently.
        autotune: whether tf.data tunes parallelism and buffer sizes in a
            background thread (`tf.data.Options().autotune.enabled`). With
            TensorFlow 2.21, deleting an iterator of a tuned pipeline can
            block for up to a minute, the tuning thread's wait period, so
            short runs may turn it off. A `MirroredStrategy` on CPUs then
            reads a repeated pipeline once per replica
            (`InputReplicationMode.PER_REPLICA`): its usual per-device
            iterators are tuned whatever the pipeline's options set.

    Raises:
        ValueError: on invalid arguments, a missing or empty data directory,
            an empty class folder, or `num_classes` below the source's.
    """
    _validate_arguments(
        global_batch_size=global_batch_size,
        image_size=image_size,
        training=training,
        deterministic=deterministic,
        seed=seed,
        preprocessing=preprocessing,
        strategy=strategy,
    )
    if strategy is not None and input_context is not None:
        raise ValueError("pass either strategy or input_context, not both")
    if dtype is None:
        dtype = keras.mixed_precision.global_policy().compute_dtype
    dtype = tf.as_dtype(dtype).name
    if repeat is None:
        repeat = training

    if source == SOURCE_SYNTHETIC:
        return _build_synthetic(
            split, global_batch_size, image_size, num_classes, dtype, seed, repeat, strategy,
            input_context, autotune,
        )

    if label_offset is None:
        label_offset = default_label_offset(source)
    source_object = open_source(
        source, data_dir=data_dir, manual_dir=manual_dir, download=download, label_offset=label_offset
    )
    info = source_object.info
    if num_classes is None:
        num_classes = info.num_classes
    elif num_classes < info.num_classes:
        raise ValueError(
            f"num_classes={num_classes} is below the {info.num_classes} classes of "
            f"{source} in {data_dir}. Pass num_classes>={info.num_classes}."
        )

    small_images = info.small_images if preprocessing == "auto" else preprocessing == "small"
    if shuffle_buffer_size is None:
        shuffle_buffer_size = DEFAULT_SMALL_IMAGE_SHUFFLE_BUFFER if small_images else DEFAULT_SHUFFLE_BUFFER
    settings = _PipelineSettings(
        split=split,
        global_batch_size=global_batch_size,
        training=training,
        image_size=image_size,
        seed=seed,
        deterministic=deterministic,
        cache=cache,
        repeat=repeat,
        num_classes=num_classes,
        dtype=dtype,
        small_images=small_images,
        shuffle_buffer_size=shuffle_buffer_size,
        bad_file_log=bad_file_log if bad_file_log is not None else BadFileLog(),
        report_bad_files=report_bad_files,
        autotune=autotune,
    )

    def dataset_fn(context: tf.distribute.InputContext | None = input_context):
        return _make_dataset(source_object, source, settings, context)

    if strategy is None:
        return dataset_fn()
    return _distribute(strategy, dataset_fn, autotune=autotune, repeat=repeat)


def _build_synthetic(
    split, global_batch_size, image_size, num_classes, dtype, seed, repeat, strategy, input_context,
    autotune,
):
    num_examples = None if repeat else synthetic.SYNTHETIC_SPLIT_SIZES.get(
        folder.SPLIT_ALIASES.get(split, split), synthetic.SYNTHETIC_SPLIT_SIZES["validation"]
    )

    def dataset_fn(context: tf.distribute.InputContext | None = input_context):
        batch_size = global_batch_size
        if context is not None:
            batch_size = context.get_per_replica_batch_size(global_batch_size)
        options = tf.data.Options()
        options.autotune.enabled = autotune
        return synthetic.synthetic_batches(
            batch_size=batch_size,
            image_size=image_size,
            num_classes=num_classes or synthetic.SYNTHETIC_NUM_CLASSES,
            dtype=dtype,
            seed=_pipeline_seed(seed, context),
            num_examples=num_examples,
        ).with_options(options)

    if strategy is None:
        return dataset_fn()
    return _distribute(strategy, dataset_fn, autotune=autotune, repeat=repeat)


def _distribute(strategy, dataset_fn, *, autotune: bool, repeat: bool):
    """Distribute the pipelines that `dataset_fn` builds over the replicas of `strategy`."""
    options = None
    if not autotune and repeat and _is_cpu_mirrored(strategy):
        # The per-device iterators that MirroredStrategy puts behind one input
        # pipeline keep default tf.data options, so they tune even when the
        # pipeline does not. One pipeline per replica, left on the host, has
        # no such iterators. A finite pipeline keeps the default mode, because
        # its shards could run out on one replica before the other.
        options = tf.distribute.InputOptions(
            experimental_replication_mode=tf.distribute.InputReplicationMode.PER_REPLICA,
            experimental_fetch_to_device=False,
        )
    return strategy.distribute_datasets_from_function(dataset_fn, options)


def _is_cpu_mirrored(strategy) -> bool:
    if type(strategy) is not tf.distribute.MirroredStrategy:
        return False
    return all("CPU" in device.upper() for device in strategy.extended.worker_devices)

"""TFRecord shards in the standard ImageNet layout.

Shards are named `<split>-NNNNN-of-MMMMM` (`train-00000-of-01024`,
`validation-00000-of-00128`) and hold `tf.train.Example` records with the
features `image/encoded` (the encoded image) and `image/class/label` (an
int64, 1..N, with 0 reserved for a background class). `image/filename` is
used in skip messages when present. Paths may be local or any
`tf.io.gfile` scheme such as `gs://`.

`clars_tf.data.make_tfrecords` writes such shards and a `dataset_info.json`
metadata file beside them with the class names and the number of examples
per split, which `read_metadata` returns.
"""

import json
import logging
import re
import struct
from concurrent.futures import ThreadPoolExecutor

import tensorflow as tf

logger = logging.getLogger(__name__)

METADATA_FILE_NAME = "dataset_info.json"

# The stored labels of the standard layout start at 1.
FIRST_STORED_LABEL = 1

# Split sizes of ILSVRC-2012, used for shards in the standard ImageNet layout
# (1024 train and 128 validation shards) that come without a metadata file.
IMAGENET_NUM_CLASSES = 1000
IMAGENET_SPLIT_SIZES = {"train": 1_281_167, "validation": 50_000}
IMAGENET_SHARD_COUNTS = {"train": 1024, "validation": 128}

SPLIT_ALIASES = {"val": "validation"}

_SHARD_NAME = re.compile(r"-(\d{5})-of-(\d{5})$")

# Framing of one TFRecord: uint64 length, uint32 masked CRC of the length,
# the data, uint32 masked CRC of the data.
_LENGTH_BYTES = 8
_CRC_BYTES = 4

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=""),
}


def canonical_split(split: str) -> str:
    """Map `val` to `validation`, and keep other split names, which are shard prefixes."""
    return SPLIT_ALIASES.get(split, split)


def list_shards(data_dir: str | None, split: str) -> list[str]:
    """Return the sorted shard paths of `split`, warning when shards are missing.

    Raises:
        ValueError: if `data_dir` is None or contains no shard of `split`.
    """
    if data_dir is None:
        raise ValueError(
            "data_dir is required for the tfrecord source. Pass the folder that "
            "contains train-00000-of-NNNNN shards"
        )
    prefix = canonical_split(split)
    pattern = f"{str(data_dir).rstrip('/')}/{prefix}-*-of-*"
    shards = sorted(path for path in tf.io.gfile.glob(pattern) if _SHARD_NAME.search(path))
    if not shards:
        raise ValueError(
            f"no TFRecord shards match {pattern}. Check data_dir, or write shards "
            "with `python -m clars_tf.data.make_tfrecords`"
        )

    declared_counts = {int(_SHARD_NAME.search(path).group(2)) for path in shards}
    if declared_counts != {len(shards)}:
        logger.warning(
            "Found %d shards for split %r in %s, but their names declare %s shards, so "
            "some shards are missing or from another conversion.",
            len(shards),
            prefix,
            data_dir,
            sorted(declared_counts),
        )
    return shards


def read_metadata(data_dir: str) -> dict | None:
    """Return the contents of `dataset_info.json` in `data_dir`, or None if absent."""
    path = f"{str(data_dir).rstrip('/')}/{METADATA_FILE_NAME}"
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as metadata_file:
        return json.load(metadata_file)


def count_records(path: str) -> int:
    """Count the records of one TFRecord file by reading only the length fields."""
    count = 0
    with tf.io.gfile.GFile(path, "rb") as shard:
        while True:
            header = shard.read(_LENGTH_BYTES)
            if not header:
                return count
            if len(header) < _LENGTH_BYTES:
                raise ValueError(f"TFRecord file {path} is truncated after {count} records")
            (length,) = struct.unpack("<Q", header)
            shard.seek(_CRC_BYTES + length + _CRC_BYTES, whence=1)
            count += 1


def count_split_records(shards: list[str], max_workers: int = 16) -> int:
    """Count the records of all shards, reading several shards at once."""
    with ThreadPoolExecutor(max_workers=max_workers) as executor:
        return sum(executor.map(count_records, shards))


def split_size(data_dir: str, split: str, metadata: dict | None) -> int:
    """Return the number of examples in `split`.

    The size comes from the metadata file when there is one, then from the
    known ILSVRC-2012 sizes when the shard count matches the standard
    ImageNet layout, else from counting the records.
    """
    split = canonical_split(split)
    if metadata is not None and split in metadata.get("splits", {}):
        return int(metadata["splits"][split])

    shards = list_shards(data_dir, split)
    if len(shards) == IMAGENET_SHARD_COUNTS.get(split):
        # NOTE: assumes that shards in the standard ImageNet layout without a
        # metadata file contain ILSVRC-2012. Other datasets need dataset_info.json.
        logger.info(
            "%d %s shards without %s: assuming ILSVRC-2012 with %d examples.",
            len(shards),
            split,
            METADATA_FILE_NAME,
            IMAGENET_SPLIT_SIZES[split],
        )
        return IMAGENET_SPLIT_SIZES[split]

    logger.info("Counting the records of %d %s shards in %s.", len(shards), split, data_dir)
    return count_split_records(shards)


def max_stored_label(metadata: dict | None) -> int:
    """Return the largest stored label: the class count from metadata, else ImageNet's 1000."""
    if metadata is not None:
        return int(metadata["num_classes"]) + FIRST_STORED_LABEL - 1
    return IMAGENET_NUM_CLASSES + FIRST_STORED_LABEL - 1


def parse_example(serialized: tf.Tensor, shard_path: tf.Tensor, label_offset: int):
    """Parse one record into (encoded image, label + label_offset, name).

    The name is `image/filename`, or the shard path when the record has none.
    """
    features = tf.io.parse_single_example(serialized, FEATURES)
    label = tf.cast(features["image/class/label"], tf.int32) + label_offset
    filename = features["image/filename"]
    name = tf.where(tf.equal(filename, ""), shard_path, filename)
    return features["image/encoded"], label, name


def read_records(
    shards: list[str],
    *,
    label_offset: int,
    input_context: tf.distribute.InputContext | None,
    shuffle_files: bool,
    seed: int | None,
    deterministic: bool,
) -> tf.data.Dataset:
    """Read the shards as (encoded image, label, name) elements.

    With several input pipelines each one reads a disjoint subset of the
    shards, or of the records when there are fewer shards than pipelines.
    """
    files = tf.data.Dataset.from_tensor_slices(shards)
    shard_records = False
    if input_context is not None and input_context.num_input_pipelines > 1:
        if len(shards) >= input_context.num_input_pipelines:
            files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        else:
            logger.warning(
                "%d shards for %d input pipelines: every pipeline reads all shards "
                "and keeps 1/%d of the records.",
                len(shards),
                input_context.num_input_pipelines,
                input_context.num_input_pipelines,
            )
            shard_records = True
    # Sharding by record position needs the same record order in every
    # pipeline, so the file order is then fixed and the interleave deterministic.
    if shuffle_files and not shard_records:
        files = files.shuffle(len(shards), seed=seed, reshuffle_each_iteration=True)

    def read_shard(path: tf.Tensor) -> tf.data.Dataset:
        records = tf.data.TFRecordDataset(path, buffer_size=8 * 1024 * 1024)
        return records.map(lambda record: (record, path))

    records = files.interleave(
        read_shard,
        cycle_length=min(len(shards), 16),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic or shard_records,
    )
    if shard_records:
        records = records.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return records.map(
        lambda record, path: parse_example(record, path, label_offset),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )

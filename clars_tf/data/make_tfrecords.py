r"""Convert an image folder in the ImageNet raw layout to TFRecord shards.

Usage:

    python -m clars_tf.data.make_tfrecords \
        --input_dir=/data/my_images --output_dir=/data/my_images_tfrecords

`input_dir` contains `train/<class>/*` and `val/<class>/*` (or `validation/`),
and optionally `test/<class>/*`.
The output contains shards named `train-00000-of-01024` and
`validation-00000-of-00128` with the standard ImageNet features
(`image/encoded`, `image/class/label` from 1 to N, `image/class/synset`,
`image/filename`, `image/height`, `image/width`, ...), and a
`dataset_info.json` with the class names and split sizes. Read them with
`build_dataset("tfrecord", ..., data_dir=output_dir)`.

RGB and greyscale JPEGs are stored unchanged. CMYK JPEGs and other formats
(PNG, GIF, BMP, WebP) are re-encoded as RGB JPEGs (quality 95, no chroma subsampling), so that the
training pipeline can use its fused JPEG decode-and-crop for every record.
Files that do not decode are skipped, counted and the first few named.
"""

import dataclasses
import json
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tensorflow as tf
from absl import app, flags
from absl import logging as absl_logging

from clars_tf.data import folder, tfrecord
from clars_tf.data.preprocessing import decode_rgb
from clars_tf.data.bad_files import STATUS_OK, STATUS_REASONS, BadFileLog, encoded_bytes_status

logger = logging.getLogger(__name__)

DEFAULT_SHARDS = {"train": 1024, "validation": 128}
REENCODE_JPEG_QUALITY = 95
_CMYK_CHANNELS = 4


@dataclasses.dataclass(frozen=True)
class _EncodedImage:
    contents: bytes
    height: int
    width: int


def _bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64_feature(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def _load_image(path: bytes, bad_file_log: BadFileLog) -> _EncodedImage | None:
    """Read one file and return its JPEG bytes (re-encoded if needed), or None if it is not an image."""
    name = os.fsdecode(path)
    with open(path, "rb") as image_file:
        contents = image_file.read()

    status = encoded_bytes_status(contents)
    if status != STATUS_OK:
        bad_file_log.record(name, STATUS_REASONS[status])
        return None
    try:
        image = decode_rgb(tf.constant(contents))
    except tf.errors.InvalidArgumentError as error:
        bad_file_log.record(name, f"decoding failed: {error.message.splitlines()[0]}")
        return None

    is_jpeg = bool(tf.io.is_jpeg(contents))
    if not is_jpeg or int(tf.image.extract_jpeg_shape(contents)[2]) == _CMYK_CHANNELS:
        contents = tf.io.encode_jpeg(
            image, quality=REENCODE_JPEG_QUALITY, chroma_downsampling=False
        ).numpy()
    return _EncodedImage(contents=contents, height=int(image.shape[0]), width=int(image.shape[1]))


def _make_example(image: _EncodedImage, path: bytes, label: int, class_name: str) -> tf.train.Example:
    features = {
        "image/encoded": _bytes_feature(image.contents),
        "image/format": _bytes_feature(b"JPEG"),
        "image/colorspace": _bytes_feature(b"RGB"),
        "image/channels": _int64_feature(3),
        "image/height": _int64_feature(image.height),
        "image/width": _int64_feature(image.width),
        "image/class/label": _int64_feature(label),
        "image/class/synset": _bytes_feature(class_name.encode("utf-8")),
        "image/filename": _bytes_feature(os.path.basename(path)),
    }
    return tf.train.Example(features=tf.train.Features(feature=features))


def _write_shard(
    shard_path: str,
    items: list[tuple[bytes, int]],
    class_names: tuple[str, ...],
    bad_file_log: BadFileLog,
) -> int:
    """Write one shard through a temporary file and return its number of records."""
    temporary_path = shard_path + ".incomplete"
    written = 0
    with tf.io.TFRecordWriter(temporary_path) as writer:
        for path, label in items:
            image = _load_image(path, bad_file_log)
            if image is None:
                continue
            stored_label = label + tfrecord.FIRST_STORED_LABEL
            example = _make_example(image, path, stored_label, class_names[label])
            writer.write(example.SerializeToString())
            written += 1
    tf.io.gfile.rename(temporary_path, shard_path, overwrite=True)
    return written


def _shard_ranges(num_items: int, num_shards: int) -> list[tuple[int, int]]:
    """Split range(num_items) into num_shards contiguous ranges of near-equal size."""
    bounds = [num_items * shard // num_shards for shard in range(num_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _check_output_dir(output_dir: str, splits: list[str], overwrite: bool) -> None:
    tf.io.gfile.makedirs(output_dir)
    existing = [
        path for split in splits for path in tf.io.gfile.glob(f"{output_dir}/{split}-*-of-*")
    ]
    if existing and not overwrite:
        raise ValueError(
            f"output_dir {output_dir} already contains {len(existing)} shards such as "
            f"{existing[0]}. Pass overwrite=True (--overwrite) or choose an empty folder."
        )
    for path in existing:
        tf.io.gfile.remove(path)


def convert_split(
    scan: folder.FolderSplit,
    output_dir: str,
    split: str,
    *,
    num_shards: int,
    num_threads: int,
    seed: int,
    bad_file_log: BadFileLog,
) -> int:
    """Write the shards of one split and return the number of records written.

    Training files are shuffled with `seed` so that every shard mixes classes.
    """
    items = list(zip(scan.paths, scan.labels))
    if split == "train":
        random.Random(seed).shuffle(items)
    if num_shards > len(items):
        logger.warning(
            "Split %s has %d images, fewer than %d shards: writing %d shards.",
            split, len(items), num_shards, len(items),
        )
        num_shards = len(items)

    shard_paths = [
        f"{output_dir}/{split}-{shard:05d}-of-{num_shards:05d}" for shard in range(num_shards)
    ]
    shard_items = [items[start:end] for start, end in _shard_ranges(len(items), num_shards)]
    with ThreadPoolExecutor(max_workers=num_threads) as executor:
        counts = executor.map(
            lambda args: _write_shard(*args, scan.class_names, bad_file_log),
            zip(shard_paths, shard_items),
        )
        total = sum(counts)
    logger.info("Wrote %d %s records in %d shards to %s.", total, split, num_shards, output_dir)
    return total


def convert_folder(
    input_dir: str | os.PathLike,
    output_dir: str,
    *,
    train_shards: int = DEFAULT_SHARDS["train"],
    validation_shards: int = DEFAULT_SHARDS["validation"],
    num_threads: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    bad_file_log: BadFileLog | None = None,
) -> dict[str, int]:
    """Convert every split folder of `input_dir` to shards and return the records per split.

    Raises:
        ValueError: if `input_dir` has no train/ or val/ folder, a class
            folder is empty, a shard count is below 1, or `output_dir` already
            contains shards and `overwrite` is False.
    """
    shard_counts = {"train": train_shards, "validation": validation_shards, "test": validation_shards}
    for split, count in shard_counts.items():
        if count < 1:
            raise ValueError(f"the number of {split} shards must be >= 1, got {count}")
    if bad_file_log is None:
        bad_file_log = BadFileLog()
    num_threads = num_threads or os.cpu_count() or 1
    output_dir = str(output_dir).rstrip("/")

    class_names = folder.list_class_names(input_dir)
    splits = [
        split for split in folder.SPLIT_FOLDER_NAMES if folder.find_split_folder(input_dir, split)
    ]
    _check_output_dir(output_dir, splits, overwrite)

    split_sizes = {}
    for split in splits:
        scan = folder.scan_split(input_dir, split, class_names)
        folder.record_skipped(scan, bad_file_log)
        split_sizes[split] = convert_split(
            scan,
            output_dir,
            split,
            num_shards=shard_counts[split],
            num_threads=num_threads,
            seed=seed,
            bad_file_log=bad_file_log,
        )

    metadata = {
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "first_label": tfrecord.FIRST_STORED_LABEL,
        "splits": split_sizes,
        "source_folder": str(Path(input_dir).resolve()),
    }
    metadata_path = f"{output_dir}/{tfrecord.METADATA_FILE_NAME}"
    with tf.io.gfile.GFile(metadata_path, "w") as metadata_file:
        json.dump(metadata, metadata_file, indent=2)
    if bad_file_log.count:
        logger.warning("Skipped %d files: %s", bad_file_log.count, bad_file_log.counts_by_reason)
    return split_sizes


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command-line flags, which only a run as a script needs."""
    flags.DEFINE_string(
        "input_dir", None, "Image folder with train/<class>/ and val/<class>/ (or validation/)."
    )
    flags.DEFINE_string("output_dir", None, "Folder for the shards and dataset_info.json, local or gs://.")
    flags.DEFINE_integer("train_shards", DEFAULT_SHARDS["train"], "Number of train shards.")
    flags.DEFINE_integer(
        "validation_shards", DEFAULT_SHARDS["validation"], "Number of validation shards, and of test shards."
    )
    flags.DEFINE_integer(
        "num_threads", None, "Number of threads that write shards in parallel. Defaults to the CPU count."
    )
    flags.DEFINE_integer("seed", 0, "Seed of the shuffle that mixes classes across train shards.")
    flags.DEFINE_bool("overwrite", False, "Replace shards that already exist in output_dir.")
    flags.mark_flags_as_required(["input_dir", "output_dir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    bad_file_log = BadFileLog()
    split_sizes = convert_folder(
        FLAGS.input_dir,
        FLAGS.output_dir,
        train_shards=FLAGS.train_shards,
        validation_shards=FLAGS.validation_shards,
        num_threads=FLAGS.num_threads,
        seed=FLAGS.seed,
        overwrite=FLAGS.overwrite,
        bad_file_log=bad_file_log,
    )
    absl_logging.info(
        "Converted %s to %s: %s records, %d files skipped.",
        FLAGS.input_dir, FLAGS.output_dir, split_sizes, bad_file_log.count,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)

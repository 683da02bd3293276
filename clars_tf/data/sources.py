"""Data sources of the input pipeline and their `DatasetInfo`.

Each source object lists or opens its data once and then returns, per
split, a dataset of `(encoded image, label, name)` records, where `name` is
a file name or path used in bad-file messages.
"""

import dataclasses
from collections.abc import Callable, Mapping

import tensorflow as tf

from clars_tf.data import folder, tfds_source, tfrecord
from clars_tf.data import preprocessing as prep

SOURCE_SYNTHETIC = "synthetic"
SOURCE_FOLDER = "folder"
SOURCE_TFRECORD = "tfrecord"
SOURCE_DIGITS = "digits"
TFDS_PREFIX = "tfds:"

SMALL_IMAGE_MAX_SIDE = prep.SMALL_IMAGE_MAX_SIDE
_SMALL_IMAGE_PROBES = 8  # Number of images decoded to tell small images from large ones.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Number of classes and examples of a source, and its image kind.

    Attributes:
        source: the source name as passed in.
        num_classes: number of classes, so labels are 0..num_classes-1.
        split_sizes: number of examples of each split.
        small_images: True for CIFAR-style images (at most 64 pixels a side),
            which pick the small-image preprocessing.
        class_names: class names in label order, where the source has them.
    """

    source: str
    num_classes: int
    split_sizes: Mapping[str, int]
    small_images: bool
    class_names: tuple[str, ...] | None = None
    _split_size_fn: Callable[[str], int] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    def num_examples(self, split: str) -> int:
        """Return the number of examples of `split` (tfds slices such as `train[:10%]` work)."""
        canonical = folder.SPLIT_ALIASES.get(split, split)
        if canonical in self.split_sizes:
            return self.split_sizes[canonical]
        if self._split_size_fn is not None:
            return self._split_size_fn(split)
        raise ValueError(
            f"source {self.source!r} has no split {split!r}. Its splits are "
            f"{sorted(self.split_sizes)}"
        )

    @property
    def eval_split(self) -> str:
        """The split to evaluate on: `test` if the source has it and no `validation`, else `validation`."""
        if "validation" in self.split_sizes or "test" not in self.split_sizes:
            return "validation"
        return "test"


class FolderSource:
    """Image folder in the ImageNet raw layout."""

    needs_record_shuffle = False  # The whole file list is shuffled instead.

    def __init__(self, source: str, data_dir):
        self.data_dir = data_dir
        self.class_names = folder.list_class_names(data_dir)
        self.splits: dict[str, folder.FolderSplit] = {}
        for split in folder.SPLIT_FOLDER_NAMES:
            if folder.find_split_folder(data_dir, split) is not None:
                self.splits[split] = folder.scan_split(data_dir, split, self.class_names)

        first_paths = next(iter(self.splits.values())).paths
        probe_paths = first_paths[:: max(1, len(first_paths) // _SMALL_IMAGE_PROBES)]
        self.info = DatasetInfo(
            source=source,
            num_classes=len(self.class_names),
            split_sizes={name: len(scan.paths) for name, scan in self.splits.items()},
            small_images=_probe_small_images(probe_paths),
            class_names=self.class_names,
        )

    def records(self, split, *, input_context, shuffle_files, seed, deterministic, bad_file_log):
        split = folder.canonical_split(split)
        if split not in self.splits:
            folder.require_split_folder(self.data_dir, split)
        scan = self.splits[split]
        folder.record_skipped(scan, bad_file_log)

        dataset = tf.data.Dataset.from_tensor_slices((list(scan.paths), list(scan.labels)))
        if input_context is not None and input_context.num_input_pipelines > 1:
            dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        if shuffle_files:
            dataset = dataset.shuffle(len(scan.paths), seed=seed, reshuffle_each_iteration=True)
        return dataset.map(
            lambda path, label: (tf.io.read_file(path), tf.cast(label, tf.int32), path),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=deterministic,
        )


class TFRecordSource:
    """Shards in the standard ImageNet TFRecord layout."""

    needs_record_shuffle = True

    def __init__(self, source: str, data_dir, label_offset: int):
        if data_dir is None:
            tfrecord.list_shards(None, "train")  # Raises the missing data_dir error.
        self.data_dir = str(data_dir)
        self.label_offset = label_offset
        metadata = tfrecord.read_metadata(self.data_dir)

        split_sizes = {}
        for split in ("train", "validation", "test"):
            if tf.io.gfile.glob(f"{self.data_dir.rstrip('/')}/{split}-*-of-*"):
                split_sizes[split] = tfrecord.split_size(self.data_dir, split, metadata)
        if not split_sizes:
            tfrecord.list_shards(self.data_dir, "train")  # Raises the no-shards error.

        class_names = tuple(metadata["class_names"]) if metadata else None
        num_classes = tfrecord.max_stored_label(metadata) + 1 + label_offset
        if num_classes < 1:
            raise ValueError(f"label_offset={label_offset} leaves no classes. Use -1 or 0.")
        if class_names is not None and label_offset == 0:
            class_names = ("background",) * tfrecord.FIRST_STORED_LABEL + class_names

        first_split = next(iter(split_sizes))
        self.info = DatasetInfo(
            source=source,
            num_classes=num_classes,
            split_sizes=split_sizes,
            small_images=_probe_small_images_in_shard(tfrecord.list_shards(self.data_dir, first_split)[0]),
            class_names=class_names if label_offset in (-1, 0) else None,
        )

    def records(self, split, *, input_context, shuffle_files, seed, deterministic, bad_file_log):
        return tfrecord.read_records(
            tfrecord.list_shards(self.data_dir, split),
            label_offset=self.label_offset,
            input_context=input_context,
            shuffle_files=shuffle_files,
            seed=seed,
            deterministic=deterministic,
        )


class TfdsSource:
    """A tensorflow-datasets image classification dataset."""

    needs_record_shuffle = True

    def __init__(self, source: str, data_dir, manual_dir, download: bool):
        name = source.removeprefix(TFDS_PREFIX)
        self.builder = tfds_source.load_builder(
            name, data_dir=data_dir, manual_dir=manual_dir, download=download
        )
        label_names = self.builder.info.features[tfds_source.supervised_keys(self.builder)[1]].names
        self.info = DatasetInfo(
            source=source,
            num_classes=tfds_source.num_classes(self.builder),
            split_sizes=tfds_source.split_sizes(self.builder),
            small_images=tfds_source.has_small_images(self.builder),
            class_names=tuple(label_names),
            _split_size_fn=lambda split: self.builder.info.splits[split].num_examples,
        )

    def records(self, split, *, input_context, shuffle_files, seed, deterministic, bad_file_log):
        return tfds_source.read_records(
            self.builder,
            split,
            input_context=input_context,
            shuffle_files=shuffle_files,
            seed=seed,
        )


def _image_height_width(contents: bytes) -> tuple[int, int]:
    if tf.io.is_jpeg(contents):
        height, width = tf.image.extract_jpeg_shape(contents).numpy()[:2]
    else:
        height, width = prep.decode_rgb(contents).shape[:2]
    return int(height), int(width)


def _probe_small_images(paths) -> bool:
    """Return whether the decodable images among `paths` are all small."""
    sizes = []
    for path in paths[:_SMALL_IMAGE_PROBES]:
        try:
            sizes.append(_image_height_width(tf.io.read_file(path)))
        except tf.errors.OpError:
            continue  # A bad file, which the pipeline reports when it reads it.
    return bool(sizes) and max(max(size) for size in sizes) <= SMALL_IMAGE_MAX_SIDE


def _probe_small_images_in_shard(shard_path: str) -> bool:
    sizes = []
    for record in tf.data.TFRecordDataset(shard_path).take(_SMALL_IMAGE_PROBES):
        contents, _, _ = tfrecord.parse_example(record, tf.constant(shard_path), 0)
        try:
            sizes.append(_image_height_width(contents))
        except tf.errors.OpError:
            continue
    return bool(sizes) and max(max(size) for size in sizes) <= SMALL_IMAGE_MAX_SIDE


def default_label_offset(source: str) -> int:
    """Return -1 for TFRecord shards (stored labels 1..N) and 0 for the others."""
    return -1 if source == SOURCE_TFRECORD else 0


def open_source(source, *, data_dir, manual_dir, download, label_offset):
    if source == SOURCE_DIGITS:
        from clars_tf.data.digits import DigitsSource

        if label_offset != 0:
            raise ValueError(f"label_offset applies to the tfrecord source only, got {label_offset}")
        return DigitsSource(source)
    if source == SOURCE_FOLDER:
        if label_offset != 0:
            raise ValueError(f"label_offset applies to the tfrecord source only, got {label_offset}")
        return FolderSource(source, data_dir)
    if source == SOURCE_TFRECORD:
        return TFRecordSource(source, data_dir, label_offset)
    if label_offset != 0:
        raise ValueError(f"label_offset applies to the tfrecord source only, got {label_offset}")
    return TfdsSource(source, data_dir, manual_dir, download)

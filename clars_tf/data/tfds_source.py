"""Image classification datasets from tensorflow-datasets (tfds).

Any tfds dataset with `(image, label)` supervised keys works, for example
`imagenet2012`, `imagenette/160px` or `cifar10`. Images are read still
encoded (`tfds.decode.SkipDecoding`), so the same decoding and bad-file
checks run as for the other sources. Labels are tfds' own, 0..N-1.

`imagenet2012` cannot be downloaded by tfds: its `manual_dir` must hold
`ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar`, and tfds' builder
prepares the dataset from them once, in `data_dir`.
"""

import logging

import tensorflow as tf
import tensorflow_datasets as tfds

from clars_tf.data.preprocessing import SMALL_IMAGE_MAX_SIDE

logger = logging.getLogger(__name__)


def load_builder(
    name: str,
    *,
    data_dir: str | None,
    manual_dir: str | None,
    download: bool,
) -> tfds.core.DatasetBuilder:
    """Return the tfds builder of `name`, preparing the dataset first if needed.

    Raises:
        ValueError: if the dataset is not prepared in `data_dir` and
            `download` is False, or it is not an image classification dataset.
    """
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            raise ValueError(
                f"tfds dataset {name!r} is not prepared in data_dir={builder.data_dir_root}. "
                "Pass download=True to prepare it (imagenet2012 also needs "
                "manual_dir= the folder with the ILSVRC2012 tars), or pass the "
                "data_dir where it was prepared."
            )
        logger.info("Preparing tfds dataset %s in %s.", name, builder.data_dir_root)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )

    image_key, label_key = supervised_keys(builder)
    if not isinstance(builder.info.features[image_key], tfds.features.Image):
        raise ValueError(
            f"tfds dataset {name!r} has no image feature {image_key!r}. Use an image "
            "classification dataset."
        )
    return builder


def supervised_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
    """Return the (image, label) feature names of an image classification builder."""
    keys = builder.info.supervised_keys
    if not keys or len(keys) != 2:
        raise ValueError(
            f"tfds dataset {builder.name!r} has no (image, label) supervised keys. "
            "Use an image classification dataset."
        )
    return keys[0], keys[1]


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
    """Return the number of classes of the builder's label feature."""
    _, label_key = supervised_keys(builder)
    return builder.info.features[label_key].num_classes


def split_sizes(builder: tfds.core.DatasetBuilder) -> dict[str, int]:
    """Return the number of examples of each prepared split."""
    return {name: info.num_examples for name, info in builder.info.splits.items()}


def has_small_images(builder: tfds.core.DatasetBuilder) -> bool:
    """Return whether the images have a fixed size of at most 64 pixels a side."""
    image_key, _ = supervised_keys(builder)
    height, width = builder.info.features[image_key].shape[:2]
    if height is None or width is None:
        return False
    return max(height, width) <= SMALL_IMAGE_MAX_SIDE


def read_records(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    input_context: tf.distribute.InputContext | None,
    shuffle_files: bool,
    seed: int | None,
) -> tf.data.Dataset:
    """Read a split as (encoded image, label, name) elements.

    `name` is the `file_name` feature when the dataset has one (as
    imagenet2012 does), else `<dataset>:<split>`.
    """
    image_key, label_key = supervised_keys(builder)
    read_config = tfds.ReadConfig(
        input_context=input_context,
        shuffle_seed=seed,
        try_autocache=False,
    )
    dataset = builder.as_dataset(
        split=split,
        shuffle_files=shuffle_files,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=read_config,
    )

    has_file_name = "file_name" in builder.info.features
    fallback_name = f"{builder.name}:{split}"

    def to_record(example: dict) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        name = example["file_name"] if has_file_name else tf.constant(fallback_name)
        return example[image_key], tf.cast(example[label_key], tf.int32), name

    return dataset.map(to_record, num_parallel_calls=tf.data.AUTOTUNE)

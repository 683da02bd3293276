"""Tests of the input pipeline on real images: the ImageNet sample and CIFAR-10.

The ImageNet sample has one real photograph per ILSVRC-2012 class, with 23
greyscale JPEGs and four file names that contain an apostrophe. CIFAR-10 is
read as JPEG folders extracted from the shared archive.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clars_tf.data import BadFileLog, build_dataset, get_dataset_info
from clars_tf.data.make_tfrecords import convert_folder
from test_data_support import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_with_pil,
    denormalize,
    reference_eval_imagenet,
)

TFDS_LABELS_FILE = Path(tfds.__file__).parent / "datasets" / "imagenet2012" / "labels.txt"
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
NORMALIZED_MIN = (0 - IMAGENET_MEAN) / IMAGENET_STD
NORMALIZED_MAX = (255 - IMAGENET_MEAN) / IMAGENET_STD


def _sorted_files(split_dir: Path) -> list[Path]:
    """List `split_dir/<class>/<file>` in class order, then file name byte order."""
    files = []
    for class_name in sorted(os.listdir(split_dir)):
        names = sorted(os.listdir(split_dir / class_name), key=os.fsencode)
        files.extend(split_dir / class_name / name for name in names)
    return files


@pytest.fixture(scope="module")
def imagenet_files(imagenet_sample_dir):
    return _sorted_files(imagenet_sample_dir / "train")


def test_imagenet_sample_classes_match_tfds(imagenet_sample_dir):
    info = get_dataset_info("folder", data_dir=imagenet_sample_dir)

    assert list(info.class_names) == TFDS_LABELS_FILE.read_text().split()
    assert info.num_classes == 1000
    assert info.split_sizes == {"train": 1000}
    assert not info.small_images


def test_imagenet_sample_every_image_decodes(imagenet_sample_dir, imagenet_files):
    log = BadFileLog()
    label_order = TFDS_LABELS_FILE.read_text().split()
    greyscale = {
        index for index, path in enumerate(imagenet_files) if Image.open(path).mode == "L"
    }
    checked = set(np.random.default_rng(0).choice(len(imagenet_files), 12, replace=False))
    dataset = build_dataset(
        "folder", "train", data_dir=imagenet_sample_dir, global_batch_size=100,
        training=False, deterministic=True, bad_file_log=log,
    )

    index = 0
    for images, labels in dataset.as_numpy_iterator():
        assert images.shape[1:] == (224, 224, 3)
        assert images.dtype == np.float32
        assert (images.min(axis=(0, 1, 2)) >= NORMALIZED_MIN - 1e-4).all()
        assert (images.max(axis=(0, 1, 2)) <= NORMALIZED_MAX + 1e-4).all()
        for image, label in zip(images, labels):
            path = imagenet_files[index]
            assert label_order[label] == path.parent.name
            if index in greyscale:
                pixels = denormalize(image)
                assert np.abs(pixels[..., 0] - pixels[..., 1]).max() < 0.01, path
                assert np.abs(pixels[..., 0] - pixels[..., 2]).max() < 0.01, path
            if index in checked:
                expected = reference_eval_imagenet(decode_with_pil(path.read_bytes()), 224)
                assert np.abs(denormalize(image) - expected).mean() < 1.0, path
            index += 1

    assert index == 1000
    assert log.count == 0
    assert len(greyscale) == 23


def test_imagenet_sample_apostrophe_names_read(imagenet_files, tmp_path):
    apostrophes = [path for path in imagenet_files if "'" in path.name]
    for path in apostrophes:
        class_dir = tmp_path / "train" / path.parent.name
        class_dir.mkdir(parents=True)
        (class_dir / path.name).write_bytes(path.read_bytes())
    log = BadFileLog()
    dataset = build_dataset(
        "folder", "train", data_dir=tmp_path, global_batch_size=4, training=False,
        deterministic=True, bad_file_log=log,
    )

    images = next(dataset.as_numpy_iterator())[0]

    assert len(apostrophes) == 4
    assert log.count == 0
    for image, path in zip(images, sorted(apostrophes)):
        expected = reference_eval_imagenet(decode_with_pil(path.read_bytes()), 224)
        assert np.abs(denormalize(image) - expected).mean() < 1.0, path


def test_imagenet_sample_training_batches(imagenet_sample_dir):
    dataset = build_dataset(
        "folder", "train", data_dir=imagenet_sample_dir, global_batch_size=16,
        training=True, seed=0,
    )

    images, labels = next(dataset.as_numpy_iterator())

    assert images.shape == (16, 224, 224, 3)
    assert len(set(labels)) > 1


def _eval_by_label(source, data_dir):
    dataset = build_dataset(
        source, "train", data_dir=data_dir, global_batch_size=200, training=False,
        image_size=64, deterministic=True,
    )
    images, labels = [], []
    for image_batch, label_batch in dataset.as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    images = np.concatenate(images)
    labels = np.concatenate(labels)
    order = np.argsort(labels)
    return images[order], labels[order]


def test_imagenet_sample_tfrecord_round_trip(imagenet_sample_dir, tmp_path):
    log = BadFileLog()
    convert_folder(imagenet_sample_dir, str(tmp_path), train_shards=4, bad_file_log=log)

    info = get_dataset_info("tfrecord", data_dir=str(tmp_path))
    folder_images, folder_labels = _eval_by_label("folder", imagenet_sample_dir)
    record_images, record_labels = _eval_by_label("tfrecord", str(tmp_path))

    assert log.count == 0
    assert info.num_classes == 1000
    assert info.split_sizes == {"train": 1000}
    assert list(folder_labels) == list(range(1000))
    assert list(record_labels) == list(range(1000))
    # The converter keeps the bytes of RGB and greyscale JPEGs, so images match
    # exactly. CMYK or PNG files would be re-encoded and only match closely.
    differences = np.abs(record_images - folder_images).max(axis=(1, 2, 3))
    assert (differences < 0.05).all()
    assert (differences == 0).mean() > 0.99


def test_cifar10_info(cifar10_dir):
    info = get_dataset_info("folder", data_dir=cifar10_dir)

    assert list(info.class_names) == CIFAR10_CLASSES
    assert info.split_sizes == {"train": 50_000, "test": 10_000}
    assert info.small_images
    assert info.eval_split == "test"


@pytest.mark.parametrize("split,per_class", [("train", 5000), ("test", 1000)])
def test_cifar10_every_image_decodes(cifar10_dir, split, per_class):
    files = _sorted_files(cifar10_dir / split)
    rng = np.random.default_rng(1)
    checked = np.sort(rng.choice(len(files), 2000 if split == "train" else 500, replace=False))
    log = BadFileLog()
    dataset = build_dataset(
        "folder", split, data_dir=cifar10_dir, global_batch_size=1000, training=False,
        image_size=32, deterministic=True, bad_file_log=log,
    )

    index = 0
    label_counts = np.zeros(10, int)
    max_error = 0.0
    for images, labels in dataset.as_numpy_iterator():
        assert images.shape[1:] == (32, 32, 3)
        assert images.dtype == np.float32
        label_counts += np.bincount(labels, minlength=10)
        in_batch = checked[(checked >= index) & (checked < index + len(labels))]
        for file_index in in_batch:
            path = files[file_index]
            offset = file_index - index
            assert CIFAR10_CLASSES[labels[offset]] == path.parent.name
            expected = decode_with_pil(path.read_bytes())
            max_error = max(max_error, np.abs(denormalize(images[offset]) - expected).max())
        index += len(labels)

    assert index == len(files)
    assert log.count == 0
    assert list(label_counts) == [per_class] * 10
    assert max_error < 0.01


def test_cifar10_training_uses_small_path(cifar10_dir):
    dataset = build_dataset(
        "folder", "train", data_dir=cifar10_dir, global_batch_size=64, training=True,
        image_size=32, seed=0,
    )

    images, labels = next(dataset.as_numpy_iterator())

    assert images.shape == (64, 32, 32, 3)
    assert labels.max() < 10
    # The 4-pixel zero padding shows as black pixels in some crops.
    assert (denormalize(images) < 0.01).all(axis=-1).any()

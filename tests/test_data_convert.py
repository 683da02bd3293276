"""Tests for the image folder to TFRecord converter, `clars_tf.data.make_tfrecords`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from clars_tf.data import BadFileLog, build_dataset
from clars_tf.data.make_tfrecords import convert_folder
from conftest import REPO_ROOT
from test_data_support import (
    decode_with_pil,
    jpeg_bytes,
    make_image_folder,
    png_bytes,
    random_image,
    write_file,
)

SIZE = 32


def _write_input_folder(root):
    """Write train (3 classes) and val (2 classes) with good and bad files."""
    make_image_folder(root, {"n02": 3, "n01": 2, "n03": 1}, size=SIZE)
    train_c01 = root / "train" / "n01"
    write_file(train_c01 / "png_content.JPEG", png_bytes(random_image(50, SIZE, SIZE)))
    write_file(train_c01 / "cmyk.JPEG", jpeg_bytes(random_image(51, SIZE, SIZE), mode="CMYK"))
    write_file(train_c01 / "greyscale.JPEG", jpeg_bytes(random_image(52, SIZE, SIZE), mode="L"))
    write_file(train_c01 / "zero.JPEG", b"")
    write_file(train_c01 / ".DS_Store", b"\0\0\0\1")
    truncated = jpeg_bytes(random_image(53, SIZE, SIZE))
    write_file(root / "train" / "n03" / "truncated.JPEG", truncated[:200])
    for wnid, seed in [("n03", 60), ("n01", 61)]:
        write_file(root / "val" / wnid / f"val_{wnid}.JPEG", jpeg_bytes(random_image(seed, SIZE, SIZE)))


def _read_examples(paths):
    examples = []
    for record in tf.data.TFRecordDataset(paths):
        examples.append(tf.train.Example.FromString(record.numpy()).features.feature)
    return examples


def _stored_train_images(output_dir):
    """Return the encoded image of each train record, keyed by its file name."""
    examples = _read_examples(sorted(str(path) for path in output_dir.glob("train-*")))
    return {
        feature["image/filename"].bytes_list.value[0].decode(): feature["image/encoded"].bytes_list.value[0]
        for feature in examples
    }


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Run the converter command on a generated folder and return (input, output, process)."""
    root = tmp_path_factory.mktemp("convert")
    input_dir = root / "images"
    output_dir = root / "records"
    _write_input_folder(input_dir)
    process = subprocess.run(
        [
            sys.executable, "-m", "clars_tf.data.make_tfrecords",
            f"--input_dir={input_dir}", f"--output_dir={output_dir}",
            "--train_shards=3", "--validation_shards=2", "--num_threads=2",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return input_dir, output_dir, process


def test_command_exits_zero(converted):
    _, _, process = converted

    assert process.returncode == 0, process.stderr


def test_command_writes_standard_shard_names(converted):
    _, output_dir, _ = converted

    names = sorted(os.listdir(output_dir))

    assert names == [
        "dataset_info.json",
        "train-00000-of-00003",
        "train-00001-of-00003",
        "train-00002-of-00003",
        "validation-00000-of-00002",
        "validation-00001-of-00002",
    ]


def test_command_writes_metadata(converted):
    _, output_dir, _ = converted

    metadata = json.loads((output_dir / "dataset_info.json").read_text())

    assert metadata["num_classes"] == 3
    assert metadata["class_names"] == ["n01", "n02", "n03"]
    assert metadata["first_label"] == 1
    assert metadata["splits"] == {"train": 9, "validation": 2}


def test_command_logs_skipped_files(converted):
    _, _, process = converted

    assert "3 files skipped" in process.stderr
    assert "truncated.JPEG" in process.stderr


def test_records_have_standard_features(converted):
    _, output_dir, _ = converted
    class_names = ["n01", "n02", "n03"]

    examples = _read_examples(sorted(str(path) for path in output_dir.glob("train-*")))

    assert len(examples) == 9
    for feature in examples:
        label = feature["image/class/label"].int64_list.value[0]
        synset = feature["image/class/synset"].bytes_list.value[0].decode()
        encoded = feature["image/encoded"].bytes_list.value[0]
        assert 1 <= label <= 3
        assert class_names[label - 1] == synset
        assert feature["image/format"].bytes_list.value[0] == b"JPEG"
        assert bool(tf.io.is_jpeg(encoded))
        height, width, channels = tf.image.extract_jpeg_shape(encoded).numpy()
        assert channels in (1, 3)  # RGB, or greyscale kept as it was.
        assert feature["image/height"].int64_list.value[0] == height
        assert feature["image/width"].int64_list.value[0] == width


def test_records_skip_bad_files(converted):
    _, output_dir, _ = converted

    examples = _read_examples(sorted(str(path) for path in output_dir.glob("*-of-*")))

    filenames = {feature["image/filename"].bytes_list.value[0].decode() for feature in examples}
    assert "zero.JPEG" not in filenames
    assert "truncated.JPEG" not in filenames
    assert ".DS_Store" not in filenames
    assert {"png_content.JPEG", "cmyk.JPEG", "greyscale.JPEG"} <= filenames


def test_records_keep_jpeg_bytes(converted):
    input_dir, output_dir, _ = converted

    stored = _stored_train_images(output_dir)

    assert stored["image_0.JPEG"] in {
        (input_dir / "train" / wnid / "image_0.JPEG").read_bytes() for wnid in ["n01", "n02", "n03"]
    }
    assert stored["greyscale.JPEG"] == (input_dir / "train" / "n01" / "greyscale.JPEG").read_bytes()


def test_reencoded_images_match_originals(converted):
    input_dir, output_dir, _ = converted

    stored = _stored_train_images(output_dir)

    for name in ["png_content.JPEG", "cmyk.JPEG"]:
        original = decode_with_pil((input_dir / "train" / "n01" / name).read_bytes())
        reencoded = decode_with_pil(stored[name])
        assert np.abs(reencoded.astype(float) - original).mean() < 2.0, name


def test_round_trip_matches_folder(converted):
    input_dir, output_dir, _ = converted
    options = dict(global_batch_size=4, training=False, image_size=SIZE, deterministic=True)

    folder_batches = list(build_dataset("folder", "val", data_dir=input_dir, **options))
    record_batches = list(build_dataset("tfrecord", "val", data_dir=str(output_dir), **options))

    folder_images = np.concatenate([images for images, _ in folder_batches])
    folder_labels = np.concatenate([labels for _, labels in folder_batches])
    record_images = np.concatenate([images for images, _ in record_batches])
    record_labels = np.concatenate([labels for _, labels in record_batches])
    assert list(folder_labels) == [0, 2]
    assert list(record_labels) == list(folder_labels)
    assert np.array_equal(record_images, folder_images)


def test_existing_shards_need_overwrite(tmp_path):
    make_image_folder(tmp_path / "images", {"a": 2}, size=SIZE)
    convert_folder(tmp_path / "images", str(tmp_path / "out"), train_shards=1, num_threads=1)

    with pytest.raises(ValueError, match="already contains 1 shards"):
        convert_folder(tmp_path / "images", str(tmp_path / "out"), train_shards=2, num_threads=1)
    convert_folder(
        tmp_path / "images", str(tmp_path / "out"), train_shards=2, num_threads=1, overwrite=True
    )

    assert sorted(path.name for path in (tmp_path / "out").glob("train-*")) == [
        "train-00000-of-00002",
        "train-00001-of-00002",
    ]


def test_fewer_images_than_shards(tmp_path):
    make_image_folder(tmp_path / "images", {"a": 2}, size=SIZE)

    sizes = convert_folder(tmp_path / "images", str(tmp_path / "out"), train_shards=8, num_threads=1)

    assert sizes == {"train": 2}
    assert len(list((tmp_path / "out").glob("train-*-of-00002"))) == 2


def test_invalid_shard_count_raises(tmp_path):
    with pytest.raises(ValueError, match="number of train shards must be >= 1, got 0"):
        convert_folder(tmp_path, str(tmp_path / "out"), train_shards=0)


def test_bad_file_log_receives_skips(tmp_path):
    _write_input_folder(tmp_path / "images")
    log = BadFileLog()

    convert_folder(tmp_path / "images", str(tmp_path / "out"), train_shards=1, validation_shards=1,
                   num_threads=1, bad_file_log=log)

    assert log.counts_by_reason == {
        "empty file": 1,
        "hidden file": 1,
        "truncated JPEG (no end-of-image marker)": 1,
    }

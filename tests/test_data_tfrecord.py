"""Tests for the TFRecord source on shards written in the test."""

import logging

import numpy as np
import pytest
import tensorflow as tf

from clars_tf.data import BadFileLog, build_dataset, get_dataset_info, tfrecord
from test_data_support import decode_with_pil, denormalize, jpeg_bytes, random_image

SIZE = 32


def _example(contents: bytes, label: int, filename: bytes | None) -> bytes:
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[contents])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    if filename is not None:
        feature["image/filename"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[filename]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shards(directory, split, stored_labels, num_shards, with_filenames=True, contents=None):
    """Write one image per stored label, round-robin over shards, and return the encoded images by index."""
    directory.mkdir(parents=True, exist_ok=True)
    writers = [
        tf.io.TFRecordWriter(str(directory / f"{split}-{shard:05d}-of-{num_shards:05d}"))
        for shard in range(num_shards)
    ]
    decoded = {}
    for index, label in enumerate(stored_labels):
        encoded = contents[index] if contents else jpeg_bytes(random_image(index, SIZE, SIZE))
        filename = f"image_{index}.JPEG".encode() if with_filenames else None
        writers[index % num_shards].write(_example(encoded, label, filename))
        decoded[index] = encoded
    for writer in writers:
        writer.close()
    return decoded


def _eval_labels(data_dir, split="train", **options):
    dataset = build_dataset(
        "tfrecord",
        split,
        data_dir=str(data_dir),
        global_batch_size=16,
        training=False,
        image_size=SIZE,
        preprocessing="small",
        deterministic=True,
        **options,
    )
    batches = [labels for _, labels in dataset.as_numpy_iterator()]
    return np.concatenate(batches) if batches else np.array([], np.int32)


def test_default_offset_maps_labels_to_zero(tmp_path):
    write_shards(tmp_path, "train", [1, 2, 3, 1000], num_shards=2)

    labels = _eval_labels(tmp_path)

    assert sorted(labels) == [0, 1, 2, 999]


def test_background_offset_keeps_stored_labels(tmp_path):
    write_shards(tmp_path, "train", [1, 2, 3, 1000], num_shards=2)

    info = get_dataset_info("tfrecord", data_dir=str(tmp_path), label_offset=0)
    labels = _eval_labels(tmp_path, label_offset=0)

    assert info.num_classes == 1001
    assert sorted(labels) == [1, 2, 3, 1000]


def test_info_counts_records_without_metadata(tmp_path):
    write_shards(tmp_path, "train", list(range(1, 8)), num_shards=3)
    write_shards(tmp_path, "validation", [1, 2], num_shards=1)

    info = get_dataset_info("tfrecord", data_dir=str(tmp_path))

    assert info.num_classes == 1000
    assert info.split_sizes == {"train": 7, "validation": 2}
    assert info.small_images


def test_info_assumes_imagenet_sizes_for_standard_layout(tmp_path):
    for split, count in [("train", 1024), ("validation", 128)]:
        for shard in range(count):
            (tmp_path / f"{split}-{shard:05d}-of-{count:05d}").write_bytes(b"")
    write_shards(tmp_path / "probe", "x", [1], num_shards=1)
    (tmp_path / "train-00000-of-01024").write_bytes((tmp_path / "probe" / "x-00000-of-00001").read_bytes())

    info = get_dataset_info("tfrecord", data_dir=str(tmp_path))

    assert info.split_sizes == {"train": 1_281_167, "validation": 50_000}


def test_count_records_reads_framing(tmp_path):
    path = str(tmp_path / "records")
    with tf.io.TFRecordWriter(path) as writer:
        for length in [0, 1, 1000, 70_000]:
            writer.write(b"x" * length)

    assert tfrecord.count_records(path) == 4


def test_count_records_truncated_raises(tmp_path):
    path = tmp_path / "records"
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(b"payload")
    path.write_bytes(path.read_bytes() + b"\1\2\3")

    with pytest.raises(ValueError, match="is truncated after 1 records"):
        tfrecord.count_records(str(path))


def test_images_match_stored_bytes(tmp_path):
    stored = write_shards(tmp_path, "validation", [5, 6, 7], num_shards=1)

    dataset = build_dataset(
        "tfrecord", "val", data_dir=str(tmp_path), global_batch_size=3, training=False,
        image_size=SIZE, preprocessing="small", deterministic=True,
    )
    images, labels = next(dataset.as_numpy_iterator())

    for image, label in zip(images, labels):
        expected = decode_with_pil(stored[int(label) - 4])
        assert np.abs(denormalize(image) - expected).max() < 0.01


def test_label_above_num_classes_raises(tmp_path):
    write_shards(tmp_path, "train", [1, 1500], num_shards=1)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"label outside \[0, 1000\)"):
        _eval_labels(tmp_path)


def test_num_classes_below_source_raises(tmp_path):
    write_shards(tmp_path, "train", [1, 2], num_shards=1)

    with pytest.raises(ValueError, match="num_classes=10 is below the 1000 classes"):
        build_dataset(
            "tfrecord", "train", data_dir=str(tmp_path), global_batch_size=1,
            training=False, num_classes=10,
        )


def test_missing_shards_raise(tmp_path):
    with pytest.raises(ValueError, match="no TFRecord shards match"):
        get_dataset_info("tfrecord", data_dir=str(tmp_path))


def test_missing_data_dir_raises():
    with pytest.raises(ValueError, match="data_dir is required for the tfrecord source"):
        get_dataset_info("tfrecord")


def test_incomplete_shard_set_warns(tmp_path, caplog):
    write_shards(tmp_path, "train", [1, 2, 3], num_shards=3)
    (tmp_path / "train-00001-of-00003").unlink()

    with caplog.at_level(logging.WARNING, logger="clars_tf.data.tfrecord"):
        tfrecord.list_shards(str(tmp_path), "train")

    assert "Found 2 shards for split 'train'" in caplog.text


def test_bad_record_skipped_by_name(tmp_path):
    good = jpeg_bytes(random_image(0, SIZE, SIZE))
    write_shards(tmp_path, "train", [1, 2, 3], num_shards=1, contents=[good, b"", good[:100]])
    log = BadFileLog()
    labels = _eval_labels(tmp_path, bad_file_log=log)

    assert list(labels) == [0]
    assert log.logged_names == ["image_1.JPEG", "image_2.JPEG"]


def test_record_without_filename_named_by_shard(tmp_path):
    write_shards(tmp_path, "train", [1], num_shards=1, with_filenames=False, contents=[b""])
    log = BadFileLog()
    labels = _eval_labels(tmp_path, bad_file_log=log)

    assert len(labels) == 0
    assert log.logged_names == [str(tmp_path / "train-00000-of-00001")]


@pytest.mark.parametrize("num_shards", [1, 4])
def test_input_pipelines_read_disjoint_parts(tmp_path, num_shards):
    write_shards(tmp_path, "train", list(range(1, 13)), num_shards=num_shards)

    parts = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline_id, num_replicas_in_sync=2
        )
        parts.append(sorted(_eval_labels(tmp_path, input_context=context)))

    assert set(parts[0]).isdisjoint(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(12))


def test_training_shuffles_records(tmp_path):
    write_shards(tmp_path, "train", list(range(1, 41)), num_shards=4)

    def first_epoch(seed):
        dataset = build_dataset(
            "tfrecord", "train", data_dir=str(tmp_path), global_batch_size=40,
            training=True, image_size=SIZE, seed=seed, deterministic=True, repeat=False,
        )
        return list(next(dataset.as_numpy_iterator())[1])

    assert sorted(first_epoch(1)) == list(range(40))
    assert first_epoch(1) == first_epoch(1)
    assert first_epoch(1) != first_epoch(2)

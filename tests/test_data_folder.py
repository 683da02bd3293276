"""Tests for the image folder source on folders generated in the test."""

import logging
import os

import numpy as np
import pytest

from clars_tf.data import BadFileLog, build_dataset, folder, get_dataset_info
from test_data_support import (
    decode_with_pil,
    denormalize,
    jpeg_bytes,
    make_image_folder,
    png_bytes,
    random_image,
    write_file,
)

SIZE = 32


def _eval_batches(data_dir, split="train", bad_file_log=None, **options):
    dataset = build_dataset(
        "folder",
        split,
        data_dir=data_dir,
        global_batch_size=64,
        training=False,
        image_size=SIZE,
        preprocessing="small",
        deterministic=True,
        bad_file_log=bad_file_log,
        **options,
    )
    images, labels = [], []
    for image_batch, label_batch in dataset.as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    return np.concatenate(images), np.concatenate(labels)


def test_class_index_is_sorted_position(tmp_path):
    creation_order = ["zebra", "apple", "Mango", "n0123"]
    make_image_folder(tmp_path, {name: 2 for name in creation_order})

    info = get_dataset_info("folder", data_dir=tmp_path)
    _, labels = _eval_batches(tmp_path)

    expected_names = sorted(creation_order)
    assert info.class_names == tuple(expected_names)
    assert info.num_classes == 4
    assert info.split_sizes == {"train": 8}
    assert list(labels) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_validation_folder_alias_and_labels(tmp_path):
    for folder_name in ["val", "validation"]:
        root = tmp_path / folder_name
        write_file(root / folder_name / "c" / "x.JPEG", jpeg_bytes(random_image(0, 20, 20)))
        make_image_folder(root, {"a": 1, "b": 1, "c": 1})

        _, labels = _eval_batches(root, split="validation")

        assert list(labels) == [2]


def test_unusual_file_names_decode(tmp_path):
    names = ["potter's wheel.JPEG", "café ünïcode 名前.jpg", "with space.jpeg", "UPPER.PNG"]
    originals = {}
    for index, name in enumerate(names):
        original = random_image(index, SIZE, SIZE)
        contents = png_bytes(original) if name.endswith(".PNG") else jpeg_bytes(original)
        write_file(tmp_path / "train" / "class" / name, contents)
        originals[name] = decode_with_pil(contents)
    log = BadFileLog()

    images, _ = _eval_batches(tmp_path, bad_file_log=log)

    expected_order = sorted(names, key=os.fsencode)
    assert log.count == 0
    assert len(images) == len(names)
    for image, name in zip(images, expected_order):
        assert np.abs(denormalize(image) - originals[name]).max() < 0.01


def test_non_utf8_file_name_decodes(tmp_path):
    class_dir = tmp_path / "train" / "class"
    class_dir.mkdir(parents=True)
    raw_name = os.fsencode(class_dir) + b"/latin1_\xe9t\xe9.JPEG"
    with open(raw_name, "wb") as image_file:
        image_file.write(jpeg_bytes(random_image(0, SIZE, SIZE)))

    images, _ = _eval_batches(tmp_path)

    assert len(images) == 1


def _write_quirky_folder(root):
    """Write one class with every kind of real-world file and return the PIL decodes of the good ones."""
    class_dir = root / "train" / "n00000001"
    good = {}
    for name, contents in {
        "rgb.JPEG": jpeg_bytes(random_image(1, SIZE, SIZE)),
        "greyscale.JPEG": jpeg_bytes(random_image(2, SIZE, SIZE), mode="L"),
        "cmyk.JPEG": jpeg_bytes(random_image(3, SIZE, SIZE), mode="CMYK"),
        "png_content.JPEG": png_bytes(random_image(4, SIZE, SIZE)),
    }.items():
        write_file(class_dir / name, contents)
        good[name] = decode_with_pil(contents)

    truncated = jpeg_bytes(random_image(5, SIZE, SIZE))
    write_file(class_dir / "truncated.JPEG", truncated[: len(truncated) // 2])
    truncated_png = png_bytes(random_image(6, SIZE, SIZE))
    write_file(class_dir / "truncated_png.png", truncated_png[: len(truncated_png) // 2])
    write_file(class_dir / "zero_bytes.JPEG", b"")
    write_file(class_dir / "error_page.jpg", b"<html>403 Forbidden</html>")
    write_file(class_dir / ".DS_Store", b"\0\0\0\1Bud1")
    write_file(class_dir / "._rgb.JPEG", b"\0\5\26\7")
    write_file(class_dir / "notes.txt", b"downloaded from somewhere")
    (class_dir / "nested").mkdir()
    write_file(root / "train" / ".DS_Store", b"\0\0\0\1Bud1")
    write_file(root / "train" / "README", b"about these images")
    return good


def test_bad_files_are_skipped_and_counted(tmp_path, caplog):
    good = _write_quirky_folder(tmp_path)
    log = BadFileLog(max_logged_names=3)

    with caplog.at_level(logging.WARNING, logger="clars_tf.data"):
        images, labels = _eval_batches(tmp_path, bad_file_log=log)

    assert len(images) == len(good)
    assert set(labels) == {0}
    assert log.counts_by_reason == {
        "file outside a class folder": 2,
        "hidden file": 2,
        "not an image file extension": 1,
        "subfolder inside a class folder": 1,
        "empty file": 1,
        "truncated JPEG (no end-of-image marker)": 1,
        "truncated PNG (no IEND chunk)": 1,
        "not a JPEG, PNG, GIF, BMP or WebP image": 1,
    }
    assert len(log.logged_names) == 3
    logged_messages = [record.getMessage() for record in caplog.records]
    for name in log.logged_names:
        assert f"Skipped {name}: " in " ".join(logged_messages)


def test_bad_file_content_skipped_by_name(tmp_path):
    _write_quirky_folder(tmp_path)
    log = BadFileLog(max_logged_names=100)

    _eval_batches(tmp_path, bad_file_log=log)

    logged = {os.path.basename(name) for name in log.logged_names}
    assert {"truncated.JPEG", "truncated_png.png", "zero_bytes.JPEG", "error_page.jpg"} <= logged


def test_unreported_bad_content_still_skipped(tmp_path):
    good = _write_quirky_folder(tmp_path)
    log = BadFileLog()

    images, _ = _eval_batches(tmp_path, bad_file_log=log, report_bad_files=False)

    assert len(images) == len(good)
    assert "empty file" in log.counts_by_reason  # Found while listing the folder.
    assert "truncated JPEG (no end-of-image marker)" not in log.counts_by_reason


def test_quirky_images_decode_to_rgb(tmp_path):
    good = _write_quirky_folder(tmp_path)

    images, _ = _eval_batches(tmp_path)

    expected_order = sorted(good)
    for image, name in zip(images, expected_order):
        pixels = denormalize(image)
        assert image.shape == (SIZE, SIZE, 3)
        assert np.abs(pixels - good[name]).mean() < 2.0, name
    greyscale = denormalize(images[expected_order.index("greyscale.JPEG")])
    assert np.abs(greyscale[..., 0] - greyscale[..., 1]).max() < 0.01
    assert np.abs(greyscale[..., 0] - greyscale[..., 2]).max() < 0.01


def test_training_skips_bad_files(tmp_path):
    good = _write_quirky_folder(tmp_path)
    dataset = build_dataset(
        "folder",
        "train",
        data_dir=tmp_path,
        global_batch_size=len(good),
        training=True,
        image_size=24,
        seed=0,
        repeat=False,
    )

    batches = list(dataset.as_numpy_iterator())

    assert len(batches) == 1
    assert batches[0][0].shape == (len(good), 24, 24, 3)


def test_missing_data_dir_raises(tmp_path):
    missing = tmp_path / "no_such_folder"

    with pytest.raises(ValueError, match="does not exist"):
        get_dataset_info("folder", data_dir=missing)


def test_data_dir_none_raises():
    with pytest.raises(ValueError, match="data_dir is required"):
        get_dataset_info("folder")


def test_empty_data_dir_raises(tmp_path):
    with pytest.raises(ValueError, match=r"has no train/ for split 'train'"):
        get_dataset_info("folder", data_dir=tmp_path)


def test_split_without_class_folders_raises(tmp_path):
    (tmp_path / "train").mkdir()
    write_file(tmp_path / "train" / "loose.JPEG", jpeg_bytes(random_image(0, 8, 8)))

    with pytest.raises(ValueError, match="contains no class folders"):
        get_dataset_info("folder", data_dir=tmp_path)


def test_empty_class_folder_raises(tmp_path):
    make_image_folder(tmp_path, {"full": 1})
    empty = tmp_path / "train" / "empty"
    write_file(empty / ".DS_Store", b"\0")

    with pytest.raises(ValueError, match=f"class folder {empty} contains no images"):
        get_dataset_info("folder", data_dir=tmp_path)


def test_unknown_validation_class_raises(tmp_path):
    make_image_folder(tmp_path, {"a": 1})
    write_file(tmp_path / "val" / "b" / "x.JPEG", jpeg_bytes(random_image(0, 8, 8)))

    with pytest.raises(ValueError, match=r"val/b is not among the 1 classes"):
        get_dataset_info("folder", data_dir=tmp_path)


def test_missing_validation_split_raises(tmp_path):
    make_image_folder(tmp_path, {"a": 1})

    with pytest.raises(ValueError, match=r"has no val/ or validation/"):
        build_dataset("folder", "validation", data_dir=tmp_path, global_batch_size=1, training=False)


def test_remote_folder_path_raises():
    with pytest.raises(ValueError, match="local folders only"):
        folder.find_split_folder("gs://bucket/images", "train")


def test_invalid_split_name_raises(tmp_path):
    make_image_folder(tmp_path, {"a": 1})

    with pytest.raises(ValueError, match="invalid split 'holdout'"):
        build_dataset("folder", "holdout", data_dir=tmp_path, global_batch_size=1, training=False)


def test_label_offset_rejected_for_folder(tmp_path):
    make_image_folder(tmp_path, {"a": 1})

    with pytest.raises(ValueError, match="label_offset applies to the tfrecord source only"):
        get_dataset_info("folder", data_dir=tmp_path, label_offset=-1)


def test_small_images_detected(tmp_path):
    make_image_folder(tmp_path / "small", {"a": 2}, size=32)
    make_image_folder(tmp_path / "large", {"a": 2}, size=96)

    assert get_dataset_info("folder", data_dir=tmp_path / "small").small_images
    assert not get_dataset_info("folder", data_dir=tmp_path / "large").small_images

"""Tests for bad-file detection (`clars_tf.data.bad_files`) on bytes made with PIL."""

import logging
from collections import Counter

import pytest
import tensorflow as tf

from clars_tf.data import bad_files
from clars_tf.data.bad_files import BadFileLog
from test_data_support import encode, jpeg_bytes, png_bytes, random_image

IMAGE = random_image(seed=1, height=48, width=64)


def _cases() -> dict[str, tuple[bytes, int]]:
    jpeg = jpeg_bytes(IMAGE)
    png = png_bytes(IMAGE)
    return {
        "rgb_jpeg": (jpeg, bad_files.STATUS_OK),
        "greyscale_jpeg": (jpeg_bytes(IMAGE, mode="L"), bad_files.STATUS_OK),
        "cmyk_jpeg": (jpeg_bytes(IMAGE, mode="CMYK"), bad_files.STATUS_OK),
        "jpeg_with_trailing_bytes": (jpeg + b"\0" * 200, bad_files.STATUS_OK),
        "png": (png, bad_files.STATUS_OK),
        "gif": (encode(IMAGE, "GIF"), bad_files.STATUS_OK),
        "bmp": (encode(IMAGE, "BMP"), bad_files.STATUS_OK),
        "webp": (encode(IMAGE, "WEBP"), bad_files.STATUS_OK),
        "empty": (b"", bad_files.STATUS_EMPTY),
        "html_page": (b"<html><body>404 Not Found</body></html>", bad_files.STATUS_UNKNOWN_FORMAT),
        "two_bytes": (b"\xff\xd8", bad_files.STATUS_UNKNOWN_FORMAT),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], bad_files.STATUS_TRUNCATED_JPEG),
        "truncated_png": (png[: len(png) // 2], bad_files.STATUS_TRUNCATED_PNG),
    }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_image_status_graph_classifies(case):
    contents, expected = _cases()[case]

    status = tf.function(bad_files.encoded_image_status)(tf.constant(contents))

    assert int(status) == expected


@pytest.mark.parametrize("case", sorted(_cases()))
def test_image_status_python_classifies(case):
    contents, expected = _cases()[case]

    assert bad_files.encoded_bytes_status(contents) == expected


@pytest.mark.parametrize("case", ["rgb_jpeg", "greyscale_jpeg", "cmyk_jpeg", "png", "gif", "bmp", "webp"])
def test_accepted_images_decode_to_rgb(case):
    contents, _ = _cases()[case]

    image = tf.io.decode_image(contents, channels=3, expand_animations=False)

    assert image.shape == (48, 64, 3)


def test_bad_file_log_counts_by_reason():
    log = BadFileLog(max_logged_names=2)

    log.record("a.JPEG", "empty file")
    log.record("b.JPEG", "empty file")
    log.record("c.txt", "not an image file extension")

    assert log.count == 3
    assert log.counts_by_reason == {"empty file": 2, "not an image file extension": 1}
    assert log.logged_names == ["a.JPEG", "b.JPEG"]


def test_bad_file_log_logs_first_names(caplog):
    log = BadFileLog(max_logged_names=1)

    with caplog.at_level(logging.WARNING, logger="clars_tf.data.bad_files"):
        for index in range(10):
            log.record(f"file_{index}.JPEG", "empty file")

    messages = [record.getMessage() for record in caplog.records]
    assert "Skipped file_0.JPEG: empty file" in messages
    assert not any("file_1.JPEG" in message for message in messages)
    assert any("Skipped 10 files so far" in message for message in messages)


def test_bad_file_log_rejects_negative_limit():
    with pytest.raises(ValueError, match="max_logged_names"):
        BadFileLog(max_logged_names=-1)


def test_keep_decodable_records_rejects():
    cases = _cases()
    names = sorted(cases)
    log = BadFileLog(max_logged_names=100)
    dataset = tf.data.Dataset.from_tensor_slices(
        ([cases[name][0] for name in names], names)
    )

    kept = dataset.filter(lambda contents, name: bad_files.keep_decodable(contents, name, log))
    kept_names = [name.decode() for _, name in kept.as_numpy_iterator()]

    expected_kept = [name for name in names if cases[name][1] == bad_files.STATUS_OK]
    expected_skipped = [name for name in names if cases[name][1] != bad_files.STATUS_OK]
    assert kept_names == expected_kept
    assert log.logged_names == expected_skipped
    assert log.counts_by_reason == Counter(
        bad_files.STATUS_REASONS[cases[name][1]] for name in expected_skipped
    )


def test_keep_decodable_without_log_filters():
    contents = [jpeg_bytes(IMAGE), b""]
    dataset = tf.data.Dataset.from_tensor_slices((contents, ["good", "empty"]))

    kept = dataset.filter(lambda data, name: bad_files.keep_decodable(data, name, None))

    assert [name for _, name in kept.as_numpy_iterator()] == [b"good"]


def test_tail_check_spans_tail_bytes():
    # The end-of-image marker just inside the searched tail is found, but one
    # byte further away it is not.
    jpeg = jpeg_bytes(IMAGE)
    inside = jpeg + b"\0" * (bad_files.TAIL_BYTES - 2)
    outside = jpeg + b"\0" * (bad_files.TAIL_BYTES - 1)

    assert bad_files.encoded_bytes_status(inside) == bad_files.STATUS_OK
    assert bad_files.encoded_bytes_status(outside) == bad_files.STATUS_TRUNCATED_JPEG
    assert int(bad_files.encoded_image_status(tf.constant(inside))) == bad_files.STATUS_OK
    assert int(bad_files.encoded_image_status(tf.constant(outside))) == bad_files.STATUS_TRUNCATED_JPEG

"""Detection and reporting of files that are not decodable images.

Real image collections contain zero-byte files, truncated downloads, HTML
error pages saved as `.jpg` and desktop metadata such as `.DS_Store`. The
input pipeline skips such files instead of stopping, and every skip goes
through a `BadFileLog`, which counts skips by reason and logs the first few
file names.
"""

import logging
import threading
from collections import Counter

import tensorflow as tf

logger = logging.getLogger(__name__)

# Status codes returned by `encoded_image_status`.
STATUS_OK = 0
STATUS_EMPTY = 1
STATUS_UNKNOWN_FORMAT = 2
STATUS_TRUNCATED_JPEG = 3
STATUS_TRUNCATED_PNG = 4

STATUS_REASONS = {
    STATUS_EMPTY: "empty file",
    STATUS_UNKNOWN_FORMAT: "not a JPEG, PNG, GIF, BMP or WebP image",
    STATUS_TRUNCATED_JPEG: "truncated JPEG (no end-of-image marker)",
    STATUS_TRUNCATED_PNG: "truncated PNG (no IEND chunk)",
}

# A complete JPEG ends with the end-of-image marker FF D9, and a complete PNG
# with its IEND chunk. Some writers append padding or metadata after them, so
# the check searches the last TAIL_BYTES bytes rather than the last 2 or 12.
# Inside JPEG entropy-coded data an FF byte is always followed by 00 or a
# restart marker (D0-D7), so FF D9 in the tail of a truncated file is not
# expected.
TAIL_BYTES = 1024

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_HEAD_BYTES = 12


class BadFileLog:
    """Thread-safe count of skipped files by reason, with the first names logged.

    The input pipeline calls `record` from tf.data worker threads, so every
    update holds a lock. A file that is skipped again in a later epoch is
    counted again.

    Args:
        max_logged_names: number of skipped files whose name and reason are
            logged at WARNING level. Later skips are counted, and the running
            total is logged at every power of ten.
    """

    def __init__(self, max_logged_names: int = 5):
        if max_logged_names < 0:
            raise ValueError(
                f"max_logged_names must be >= 0, got {max_logged_names}"
            )
        self.max_logged_names = max_logged_names
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._logged_names: list[str] = []

    @property
    def count(self) -> int:
        """Total number of skips recorded."""
        with self._lock:
            return sum(self._counts.values())

    @property
    def counts_by_reason(self) -> dict[str, int]:
        """Number of skips for each reason."""
        with self._lock:
            return dict(self._counts)

    @property
    def logged_names(self) -> list[str]:
        """Names of the skipped files that were logged, in order."""
        with self._lock:
            return list(self._logged_names)

    def record(self, name: str, reason: str) -> None:
        """Count one skipped file and log it if it is among the first few."""
        with self._lock:
            self._counts[reason] += 1
            total = sum(self._counts.values())
            log_name = len(self._logged_names) < self.max_logged_names
            if log_name:
                self._logged_names.append(name)

        if log_name:
            logger.warning("Skipped %s: %s", name, reason)
            if total == self.max_logged_names:
                logger.warning(
                    "Further skipped files are counted but not named. "
                    "Read BadFileLog.counts_by_reason for the totals."
                )
        elif _is_power_of_ten(total):
            logger.warning("Skipped %d files so far: %s", total, self.counts_by_reason)


def _is_power_of_ten(value: int) -> bool:
    while value >= 10 and value % 10 == 0:
        value //= 10
    return value == 1


def _contains_pair(data: tf.Tensor, first: int, second: int) -> tf.Tensor:
    """Return whether the uint8 vector `data` contains `first` followed by `second`."""
    return tf.reduce_any(
        tf.logical_and(tf.equal(data[:-1], first), tf.equal(data[1:], second))
    )


def _contains_iend(data: tf.Tensor) -> tf.Tensor:
    """Return whether the uint8 vector `data` contains the bytes `IEND`."""
    size = tf.size(data)
    padded = tf.concat([data, tf.zeros([3], tf.uint8)], axis=0)
    matches = [tf.equal(padded[i : i + size], ord(c)) for i, c in enumerate("IEND")]
    return tf.reduce_any(tf.reduce_all(tf.stack(matches), axis=0))


def encoded_image_status(contents: tf.Tensor) -> tf.Tensor:
    """Classify the bytes of one encoded image without decoding it.

    Args:
        contents: scalar string tensor with the file's bytes.

    Returns:
        A scalar int32 tensor: `STATUS_OK` for a JPEG with an end-of-image
        marker, a PNG with an IEND chunk, or a GIF, BMP or WebP header, else
        one of the other `STATUS_*` codes. A file that passes can still fail
        to decode (corrupt data inside the file).
    """
    length = tf.strings.length(contents)
    head = tf.strings.substr(contents, 0, tf.minimum(length, _HEAD_BYTES))
    head = head + b"\0" * _HEAD_BYTES  # Short files compare as non-images.
    tail_start = tf.maximum(length - TAIL_BYTES, 0)
    tail = tf.io.decode_raw(tf.strings.substr(contents, tail_start, TAIL_BYTES), tf.uint8)

    is_jpeg = tf.equal(tf.strings.substr(head, 0, 3), _JPEG_MAGIC)
    is_png = tf.equal(tf.strings.substr(head, 0, 8), _PNG_MAGIC)
    is_gif = tf.equal(tf.strings.substr(head, 0, 4), b"GIF8")
    is_bmp = tf.equal(tf.strings.substr(head, 0, 2), b"BM")
    is_webp = tf.logical_and(
        tf.equal(tf.strings.substr(head, 0, 4), b"RIFF"),
        tf.equal(tf.strings.substr(head, 8, 4), b"WEBP"),
    )
    is_other_image = tf.reduce_any(tf.stack([is_gif, is_bmp, is_webp]))

    jpeg_complete = _contains_pair(tail, 0xFF, 0xD9)
    png_complete = _contains_iend(tail)

    return tf.case(
        [
            (tf.equal(length, 0), lambda: tf.constant(STATUS_EMPTY)),
            (is_jpeg, lambda: tf.where(jpeg_complete, STATUS_OK, STATUS_TRUNCATED_JPEG)),
            (is_png, lambda: tf.where(png_complete, STATUS_OK, STATUS_TRUNCATED_PNG)),
            (is_other_image, lambda: tf.constant(STATUS_OK)),
        ],
        default=lambda: tf.constant(STATUS_UNKNOWN_FORMAT),
        exclusive=False,
    )


def encoded_bytes_status(contents: bytes) -> int:
    """Classify the bytes of one encoded image in Python, like `encoded_image_status`."""
    head = contents[:_HEAD_BYTES]
    tail = contents[-TAIL_BYTES:]
    if not contents:
        return STATUS_EMPTY
    if head.startswith(_JPEG_MAGIC):
        return STATUS_OK if b"\xff\xd9" in tail else STATUS_TRUNCATED_JPEG
    if head.startswith(_PNG_MAGIC):
        return STATUS_OK if b"IEND" in tail else STATUS_TRUNCATED_PNG
    is_webp = head.startswith(b"RIFF") and head[8:12] == b"WEBP"
    if head.startswith((b"GIF8", b"BM")) or is_webp:
        return STATUS_OK
    return STATUS_UNKNOWN_FORMAT


def keep_decodable(
    contents: tf.Tensor, name: tf.Tensor, bad_file_log: BadFileLog | None
) -> tf.Tensor:
    """Return whether to keep one file, recording a skip in `bad_file_log`.

    Meant for `tf.data.Dataset.filter`. The Python callback that records a
    skip runs only for rejected files, so good files never take the GIL.
    """
    status = encoded_image_status(contents)
    if bad_file_log is None:
        return tf.equal(status, STATUS_OK)

    def record_skip(name_value: tf.Tensor, status_value: tf.Tensor) -> bool:
        file_name = name_value.numpy().decode("utf-8", errors="backslashreplace")
        bad_file_log.record(file_name, STATUS_REASONS[int(status_value.numpy())])
        return False

    return tf.cond(
        tf.equal(status, STATUS_OK),
        lambda: tf.constant(True),
        lambda: tf.reshape(tf.py_function(record_skip, [name, status], tf.bool), []),
    )

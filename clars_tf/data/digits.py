"""scikit-learn's bundled handwritten digits, as a real-image source that needs no download.

The 1797 grey 8x8 images of the digits 0 to 9 (the UCI optical recognition
of handwritten digits test set, shipped inside the scikit-learn wheel) are
upscaled to 32x32 RGB and encoded as PNG once, then go through the
small-image pipeline like CIFAR-10. Every fifth image forms the test split.
"""

import functools

import numpy as np
import tensorflow as tf

DIGITS_IMAGE_SIZE = 32
TEST_EVERY = 5  # Image i is in the test split when i % TEST_EVERY == 0.


@functools.cache
def _encoded_digits() -> tuple[tuple[bytes, ...], np.ndarray]:
    """Return the digits as 32x32 RGB PNGs, and their labels; computed once per process."""
    images, labels = _load_digits()
    # Values are 0..16 ink counts; spread them over 0..255.
    pixels = np.clip(images * 16.0, 0, 255)[..., None]
    pixels = tf.image.resize(pixels, [DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE], method="bilinear")
    pixels = tf.cast(tf.round(tf.tile(pixels, [1, 1, 1, 3])), tf.uint8)
    encoded = tuple(tf.io.encode_png(image).numpy() for image in pixels)
    return encoded, labels


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError(
            "the digits source needs scikit-learn, which is missing: "
            'pip install scikit-learn (or pip install -e ".[test]").'
        ) from None
    digits = load_digits()
    return digits.images, digits.target


class DigitsSource:
    """Handwritten digits from scikit-learn, upscaled to 32x32 PNGs."""

    needs_record_shuffle = True

    def __init__(self, source: str):
        from clars_tf.data.sources import DatasetInfo

        encoded, labels = _encoded_digits()
        test = np.arange(len(labels)) % TEST_EVERY == 0
        self._splits = {
            "train": ([e for e, t in zip(encoded, test) if not t], labels[~test]),
            "test": ([e for e, t in zip(encoded, test) if t], labels[test]),
        }
        self.info = DatasetInfo(
            source=source,
            num_classes=10,
            split_sizes={name: len(split[1]) for name, split in self._splits.items()},
            small_images=True,
            class_names=tuple(str(digit) for digit in range(10)),
        )

    def records(self, split, *, input_context, shuffle_files, seed, deterministic, bad_file_log):
        if split not in self._splits:
            raise ValueError(f"the digits source has the splits train and test, not {split!r}")
        contents, labels = self._splits[split]
        names = [f"digits/{split}/{index}" for index in range(len(labels))]
        dataset = tf.data.Dataset.from_tensor_slices(
            (contents, labels.astype(np.int32), names)
        )
        if input_context is not None and input_context.num_input_pipelines > 1:
            dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return dataset

"""Tests for `clars_tf.data.preprocessing` against PIL decoding and NumPy references."""

import numpy as np
import pytest
import tensorflow as tf

from clars_tf.data import preprocessing as prep
from test_data_support import (
    decode_with_pil,
    denormalize,
    jpeg_bytes,
    normalize,
    png_bytes,
    random_image,
    reference_eval_imagenet,
    resize_bilinear,
)


def _seed(value: int) -> tf.Tensor:
    return tf.constant([value, 0], tf.int64)


def test_decode_rgb_greyscale_repeats_channel():
    contents = jpeg_bytes(random_image(0, 30, 40), mode="L")

    image = prep.decode_rgb(contents).numpy()

    expected = decode_with_pil(contents)
    assert image.shape == (30, 40, 3)
    assert np.array_equal(image[..., 0], image[..., 1])
    assert np.array_equal(image[..., 0], image[..., 2])
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 2


def test_decode_rgb_cmyk_matches_pil():
    original = random_image(1, 30, 40)
    contents = jpeg_bytes(original, mode="CMYK")

    image = prep.decode_rgb(contents).numpy().astype(float)

    assert image.shape == (30, 40, 3)
    assert np.abs(image - decode_with_pil(contents)).mean() < 2.0
    assert np.abs(image - original).mean() < 4.0


def test_decode_rgb_png_rgba_drops_alpha():
    original = random_image(2, 20, 24)
    rgba = np.concatenate([original, np.full((20, 24, 1), 128, np.uint8)], axis=-1)

    image = prep.decode_rgb(png_bytes(rgba)).numpy()

    assert np.array_equal(image, original)


@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (68, 56), (2400, 1632)])
def test_crop_window_within_ranges(height, width):
    areas = []
    for seed in range(200):
        window = prep.sample_crop_window(tf.constant([height, width]), _seed(seed)).numpy()
        offset_y, offset_x, crop_height, crop_width = window

        assert offset_y >= 0
        assert offset_x >= 0
        assert offset_y + crop_height <= height
        assert offset_x + crop_width <= width
        # Rounding to whole pixels moves the aspect ratio and area slightly.
        aspect = crop_width / crop_height
        assert 3 / 4 * 0.9 <= aspect <= 4 / 3 * 1.1
        areas.append(crop_height * crop_width / (height * width))

    assert min(areas) >= 0.08 * 0.9
    assert max(areas) <= 1.0
    assert np.std(areas) > 0.1  # The windows vary.


def test_crop_window_fallback_centre_crop():
    # No crop of 8% area with aspect 3/4..4/3 fits in a 10x1000 strip.
    window = prep.sample_crop_window(tf.constant([10, 1000]), _seed(0)).numpy()

    side = round(0.875 * 10)
    assert list(window) == [(10 - side) // 2, (1000 - side) // 2, side, side]


def test_crop_window_same_seed_repeats():
    first = prep.sample_crop_window(tf.constant([300, 400]), _seed(7)).numpy()
    second = prep.sample_crop_window(tf.constant([300, 400]), _seed(7)).numpy()

    assert np.array_equal(first, second)


def _expected_train_image(rgb: np.ndarray, seed: int, image_size: int) -> list[np.ndarray]:
    """Return the resized crop and its mirror image for the window of `seed`."""
    crop_seed, _ = tf.unstack(tf.random.experimental.stateless_split(_seed(seed), 2))
    offset_y, offset_x, height, width = prep.sample_crop_window(
        tf.constant(rgb.shape[:2]), crop_seed
    ).numpy()
    crop = rgb[offset_y : offset_y + height, offset_x : offset_x + width]
    resized = resize_bilinear(crop, image_size, image_size)
    return [resized, resized[:, ::-1]]


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_train_crop_matches_decoded_crop(image_format):
    original = random_image(3, 120, 160)
    contents = jpeg_bytes(original) if image_format == "jpeg" else png_bytes(original)
    rgb = decode_with_pil(contents)

    for seed in range(4):
        image = prep.preprocess_imagenet_train(tf.constant(contents), _seed(seed), 64).numpy()

        assert image.shape == (64, 64, 3)
        errors = [np.abs(image - expected).mean() for expected in _expected_train_image(rgb, seed, 64)]
        assert min(errors) < 1.5


def test_train_flip_varies_with_seed():
    contents = jpeg_bytes(random_image(4, 120, 160))
    rgb = decode_with_pil(contents)

    flipped = []
    for seed in range(16):
        image = prep.preprocess_imagenet_train(tf.constant(contents), _seed(seed), 48).numpy()
        unflipped, mirrored = _expected_train_image(rgb, seed, 48)
        flipped.append(np.abs(image - mirrored).mean() < np.abs(image - unflipped).mean())

    assert any(flipped)
    assert not all(flipped)


@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (68, 56)])
def test_eval_imagenet_matches_reference(height, width):
    contents = jpeg_bytes(random_image(5, height, width))

    image = prep.preprocess_imagenet_eval(tf.constant(contents), 224).numpy()

    expected = reference_eval_imagenet(decode_with_pil(contents), 224)
    assert image.shape == (224, 224, 3)
    assert np.abs(image - expected).mean() < 1.0


def test_small_eval_keeps_image():
    original = random_image(6, 32, 32)

    image = prep.preprocess_small_eval(tf.constant(png_bytes(original)), 32).numpy()

    assert np.array_equal(image, original.astype(np.float32))


def test_small_eval_resizes_other_size():
    original = random_image(7, 28, 28)

    image = prep.preprocess_small_eval(tf.constant(png_bytes(original)), 32).numpy()

    assert image.shape == (32, 32, 3)
    assert np.abs(image - resize_bilinear(original, 32, 32)).max() < 1e-3


def _padded_windows(image: np.ndarray, padding: int):
    """Yield every crop of the zero-padded image and its mirror image."""
    size = image.shape[0]
    padded = np.pad(image, [(padding, padding), (padding, padding), (0, 0)])
    for offset_y in range(2 * padding + 1):
        for offset_x in range(2 * padding + 1):
            window = padded[offset_y : offset_y + size, offset_x : offset_x + size]
            yield (offset_y, offset_x, False), window
            yield (offset_y, offset_x, True), window[:, ::-1]


def test_small_train_is_padded_crop():
    original = random_image(8, 32, 32).astype(np.float32)
    contents = tf.constant(png_bytes(original.astype(np.uint8)))

    placements = set()
    for seed in range(12):
        image = prep.preprocess_small_train(contents, _seed(seed), 32).numpy()
        matches = [key for key, window in _padded_windows(original, 4) if np.array_equal(image, window)]

        assert len(matches) >= 1
        placements.add(matches[0])

    assert len(placements) > 1


def test_normalize_matches_imagenet_statistics():
    pixels = np.random.default_rng(9).uniform(0, 255, size=(4, 5, 3)).astype(np.float32)

    normalized = prep.normalize(tf.constant(pixels), tf.float32).numpy()

    assert np.allclose(normalized, normalize(pixels), atol=1e-5)
    assert np.allclose(denormalize(normalized), pixels, atol=1e-3)


def test_normalize_casts_to_bfloat16():
    pixels = tf.zeros([2, 2, 3])

    assert prep.normalize(pixels, "bfloat16").dtype == tf.bfloat16

"""Helpers for the input pipeline tests: image files made with PIL and NumPy references.

This module contains no tests. The reference functions reimplement the
documented preprocessing with PIL and NumPy, independently of
`clars_tf.data`.
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255


def random_image(seed: int, height: int, width: int) -> np.ndarray:
    """Return a smooth random uint8 RGB image, so JPEG round trips stay close."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(max(2, height // 8), max(2, width // 8), 3))
    image = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR)
    return np.asarray(image)


def encode(array: np.ndarray, image_format: str, mode: str | None = None, **options) -> bytes:
    """Encode a uint8 array with PIL, converted to `mode` (such as "L" or "CMYK") first."""
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    return encode(array, "JPEG", mode=mode, quality=95)


def png_bytes(array: np.ndarray) -> bytes:
    return encode(array, "PNG")


def decode_with_pil(contents: bytes) -> np.ndarray:
    """Decode image bytes to a uint8 RGB array with PIL."""
    return np.asarray(Image.open(io.BytesIO(contents)).convert("RGB"))


def write_file(path: Path, contents: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(contents)
    return path


def make_image_folder(root: Path, classes: dict[str, int], seed: int = 0, size: int = 40) -> Path:
    """Write `classes[name]` JPEGs into `root/train/<name>/` and return root."""
    for class_number, (class_name, count) in enumerate(classes.items()):
        for index in range(count):
            array = random_image(seed + 100 * class_number + index, size, size + 8)
            write_file(root / "train" / class_name / f"image_{index}.JPEG", jpeg_bytes(array))
    return root


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize with bilinear interpolation and half-pixel centres, without antialiasing."""
    in_height, in_width = image.shape[:2]

    def sample_positions(out_size: int, in_size: int):
        centres = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
        centres = np.clip(centres, 0, in_size - 1)
        low = np.floor(centres).astype(int)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, centres - low

    top, bottom, y_weight = sample_positions(height, in_height)
    left, right, x_weight = sample_positions(width, in_width)
    image = image.astype(np.float64)
    rows = (
        image[top] * (1 - y_weight)[:, None, None] + image[bottom] * y_weight[:, None, None]
    )
    return rows[:, left] * (1 - x_weight)[None, :, None] + rows[:, right] * x_weight[None, :, None]


def reference_eval_imagenet(rgb: np.ndarray, image_size: int) -> np.ndarray:
    """Resize the shorter side to round(image_size / 0.875), take the centre square."""
    target = round(image_size / 0.875)
    height, width = rgb.shape[:2]
    scale = target / min(height, width)
    new_height = max(target, round(height * scale))
    new_width = max(target, round(width * scale))
    resized = resize_bilinear(rgb, new_height, new_width)
    top = (new_height - image_size) // 2
    left = (new_width - image_size) // 2
    return resized[top : top + image_size, left : left + image_size]


def normalize(image: np.ndarray) -> np.ndarray:
    return (image - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, np.float64) * IMAGENET_STD + IMAGENET_MEAN

"""Image preprocessing for ImageNet-style and small (CIFAR-style) images.

ImageNet training uses the Inception-style random resized crop: a crop of
8% to 100% of the image area with aspect ratio 3/4 to 4/3 is sampled (10
attempts, centre-crop fallback), resized to `image_size` and flipped at
random. JPEGs are decoded and cropped in one step with
`tf.image.decode_and_crop_jpeg`, which decodes only the crop window. ImageNet
evaluation resizes the shorter side to `image_size / 0.875` (256 for 224) and
takes the central `image_size` square.

Small images get the usual CIFAR augmentation for training: 4 pixels of zero
padding on each side, a random crop back to `image_size` and a random flip.
Evaluation leaves them unchanged.

All random choices are stateless ops driven by a per-example `seed` tensor of
shape [2], so a fixed seed gives the same crops on every run.

Every preprocessing function returns float32 pixel values in [0, 255], and `normalize`
subtracts the ImageNet mean and divides by its standard deviation.
"""

import numpy as np
import tensorflow as tf

# ImageNet RGB channel mean and standard deviation, in [0, 255] pixel units.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# Fraction of the resized shorter side that the evaluation centre crop keeps.
EVAL_CROP_FRACTION = 0.875

CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
CROP_MAX_ATTEMPTS = 10

SMALL_IMAGE_PADDING = 4

# Images at most this many pixels on each side are small (CIFAR-style) images
# when the preprocessing kind is picked automatically.
SMALL_IMAGE_MAX_SIDE = 64

# TensorFlow's default JPEG DCT is libjpeg's fast integer one, which is off by
# about 1.5 grey levels on average. The accurate one gives the same pixels as
# PIL.
JPEG_DCT_METHOD = "INTEGER_ACCURATE"


def decode_rgb(contents: tf.Tensor) -> tf.Tensor:
    """Decode a JPEG, PNG, GIF, BMP or WebP image to uint8 RGB of shape [h, w, 3].

    Greyscale images are repeated to three channels, CMYK JPEGs are converted
    to RGB by the JPEG decoder, an alpha channel is dropped, and an animated
    GIF gives its first frame.
    """
    image = tf.cond(
        tf.io.is_jpeg(contents),
        lambda: tf.io.decode_jpeg(contents, channels=3, dct_method=JPEG_DCT_METHOD),
        lambda: tf.io.decode_image(contents, channels=3, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return image


def _centre_crop_window(image_height_width: tf.Tensor) -> tf.Tensor:
    """Return [y, x, h, w] of the centred square that evaluation keeps."""
    shorter_side = tf.cast(tf.reduce_min(image_height_width), tf.float32)
    side = tf.cast(tf.round(shorter_side * EVAL_CROP_FRACTION), tf.int32)
    side = tf.maximum(side, 1)
    offset_y = (image_height_width[0] - side) // 2
    offset_x = (image_height_width[1] - side) // 2
    return tf.stack([offset_y, offset_x, side, side])


def sample_crop_window(image_height_width: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Sample a random-resized-crop window [y, x, h, w] for an image of this size.

    The crop covers `CROP_AREA_RANGE` of the image area with an aspect ratio in
    `CROP_ASPECT_RATIO_RANGE`. When no window fits within `CROP_MAX_ATTEMPTS`
    samples, the sampler returns the whole image, and this function replaces
    it with the evaluation centre crop.
    """
    image_shape = tf.concat([tf.cast(image_height_width, tf.int32), [3]], axis=0)
    whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=whole_image,
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
        area_range=CROP_AREA_RANGE,
        max_attempts=CROP_MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    sampled = tf.concat([begin[:2], size[:2]], axis=0)

    sampling_failed = tf.reduce_all(tf.equal(size[:2], image_shape[:2]))
    return tf.where(sampling_failed, _centre_crop_window(image_shape[:2]), sampled)


def _crop_jpeg(contents: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Decode only a random crop window of a JPEG."""
    image_height_width = tf.image.extract_jpeg_shape(contents)[:2]
    window = sample_crop_window(image_height_width, seed)
    image = tf.image.decode_and_crop_jpeg(
        contents, window, channels=3, dct_method=JPEG_DCT_METHOD
    )
    image.set_shape([None, None, 3])
    return image


def _crop_decoded(contents: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Decode a whole non-JPEG image, then cut out a random crop window."""
    image = decode_rgb(contents)
    window = sample_crop_window(tf.shape(image)[:2], seed)
    return image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]


def preprocess_imagenet_train(
    contents: tf.Tensor, seed: tf.Tensor, image_size: int
) -> tf.Tensor:
    """Decode a random resized crop of an encoded image and flip it at random.

    Returns float32 [image_size, image_size, 3] in [0, 255].
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    crop = tf.cond(
        tf.io.is_jpeg(contents),
        lambda: _crop_jpeg(contents, crop_seed),
        lambda: _crop_decoded(contents, crop_seed),
    )

    image = tf.image.resize(crop, [image_size, image_size], method="bilinear")
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image.set_shape([image_size, image_size, 3])
    return image


def resize_shorter_side(image: tf.Tensor, target: int) -> tf.Tensor:
    """Resize bilinearly so that the shorter side is `target`, keeping the aspect ratio."""
    height_width = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = target / tf.reduce_min(height_width)
    new_height_width = tf.cast(tf.round(height_width * scale), tf.int32)
    new_height_width = tf.maximum(new_height_width, target)
    return tf.image.resize(image, new_height_width, method="bilinear")


def centre_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Cut the central `size` x `size` square out of an image at least that large."""
    height_width = tf.shape(image)[:2]
    offset_y = (height_width[0] - size) // 2
    offset_x = (height_width[1] - size) // 2
    return image[offset_y : offset_y + size, offset_x : offset_x + size]


def preprocess_imagenet_eval(contents: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode an image, resize its shorter side to `image_size / 0.875` and centre-crop it.

    Returns float32 [image_size, image_size, 3] in [0, 255].
    """
    resize_target = int(round(image_size / EVAL_CROP_FRACTION))
    image = resize_shorter_side(decode_rgb(contents), resize_target)
    image = centre_crop(image, image_size)
    image.set_shape([image_size, image_size, 3])
    return image


def _decode_small(contents: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode a small image to float32, resizing only if it is not `image_size` square."""
    image = tf.cast(decode_rgb(contents), tf.float32)
    height_width = tf.shape(image)[:2]
    needs_resize = tf.reduce_any(tf.not_equal(height_width, image_size))
    image = tf.cond(
        needs_resize,
        lambda: tf.image.resize(image, [image_size, image_size], method="bilinear"),
        lambda: image,
    )
    image.set_shape([image_size, image_size, 3])
    return image


def preprocess_small_train(contents: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode a small image, pad it by 4 pixels, take a random crop and flip it at random.

    Returns float32 [image_size, image_size, 3] in [0, 255].
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = _decode_small(contents, image_size)

    padding = [[SMALL_IMAGE_PADDING, SMALL_IMAGE_PADDING]] * 2 + [[0, 0]]
    image = tf.pad(image, padding)
    image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], crop_seed)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def preprocess_small_eval(contents: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode a small image unchanged (resized only if it is not `image_size` square).

    Returns float32 [image_size, image_size, 3] in [0, 255].
    """
    return _decode_small(contents, image_size)


def normalize(image: tf.Tensor, dtype: tf.DType | str) -> tf.Tensor:
    """Subtract the ImageNet mean, divide by its standard deviation and cast to `dtype`.

    For images with a static shape the per-channel scale and offset are tiled
    to the full image shape, because broadcasting over a channel axis of
    size 3 made the multiply-add several times slower on CPU (measured with
    TensorFlow 2.21).
    """
    image = tf.cast(image, tf.float32)
    scale = 1.0 / np.asarray(IMAGENET_STD_RGB, np.float32)
    offset = -np.asarray(IMAGENET_MEAN_RGB, np.float32) * scale

    if image.shape.is_fully_defined():
        tile_shape = image.shape[:-1] + [1]
        scale = np.tile(scale, tile_shape)
        offset = np.tile(offset, tile_shape)
    return tf.cast(image * scale + offset, dtype)

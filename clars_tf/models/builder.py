"""Build any supported model by name, under a chosen dtype policy."""

import contextlib
from collections.abc import Iterator

import keras
from keras import layers

from clars_tf.models.applications import (
    APPLICATION_MIN_IMAGE_SIZE,
    APPLICATION_NAMES,
    build_application,
)
from clars_tf.models.cifar_resnet import build_cifar_resnet

_CIFAR_RESNET_DEPTHS = {"resnet20": 20, "resnet56": 56}

MODEL_NAMES = APPLICATION_NAMES + tuple(_CIFAR_RESNET_DEPTHS)

# Name of the last layer of every model built here. It casts the logits to float32.
OUTPUT_LAYER_NAME = "logits_float32"


def minimum_image_size(name: str) -> int:
    """Return the smallest height and width in pixels that model `name` accepts."""
    _validate_model_name(name)
    if name in _CIFAR_RESNET_DEPTHS:
        # Stride-2 layers round sizes up, so the feature maps never become empty.
        return 1
    return APPLICATION_MIN_IMAGE_SIZE


def build_model(
    name: str,
    num_classes: int,
    image_size: int,
    *,
    dtype_policy: str | keras.DTypePolicy | None = None,
    seed: int | None = None,
) -> keras.Model:
    """Build an untrained classifier that maps RGB images to float32 logits.

    The model takes `(batch, image_size, image_size, 3)` images and returns
    `(batch, num_classes)` logits with no softmax. Train it with
    `keras.losses.SparseCategoricalCrossentropy(from_logits=True)` (or
    `CategoricalCrossentropy(from_logits=True)` for one-hot labels). The last layer,
    named `logits_float32`, casts the logits to float32 so that the loss is computed
    in float32 under mixed precision.

    Args:
        name: one of `MODEL_NAMES`. `resnet50`, `densenet121`, `mobilenet_v1` and
            `mobilenet_v2` are the Keras applications for ImageNet. `resnet20` and
            `resnet56` are the CIFAR ResNets of He et al. 2016.
        num_classes: number of output logits.
        image_size: input height and width in pixels, at least
            `minimum_image_size(name)`.
        dtype_policy: Keras dtype policy for the layers, such as `"float32"`,
            `"mixed_float16"` or `"mixed_bfloat16"`. None uses the current global
            policy. The global policy is restored after the build.
        seed: if given, `keras.utils.set_random_seed(seed)` runs before the build so
            that the initial weights are reproducible. That call also reseeds the
            global Python, NumPy and TensorFlow random generators.

    Raises:
        ValueError: on an unknown name, a non-positive `num_classes`, an image size
            below the model's minimum, or an invalid dtype policy.
    """
    _validate_model_name(name)
    _validate_positive_int("num_classes", num_classes)
    _validate_image_size(name, image_size)
    policy = _resolve_dtype_policy(dtype_policy)

    if seed is not None:
        keras.utils.set_random_seed(seed)

    with _global_dtype_policy(policy):
        body = _build_body(name, num_classes, image_size)

        # The TensorFlow mixed precision guide (tensorflow.org/guide/mixed_precision)
        # recommends a float32 output, because softmax and cross-entropy are
        # numerically unstable in float16 and bfloat16.
        logits = layers.Activation("linear", dtype="float32", name=OUTPUT_LAYER_NAME)(
            body.outputs[0]
        )
        # The Model is created inside the scope so that its own dtype policy is the
        # requested one. Keras `compile` wraps the optimizer in a LossScaleOptimizer
        # when that policy is mixed_float16.
        return keras.Model(body.inputs[0], logits, name=name)


def _build_body(name: str, num_classes: int, image_size: int) -> keras.Model:
    """Build the named architecture with logits in the compute dtype."""
    if name in _CIFAR_RESNET_DEPTHS:
        return build_cifar_resnet(_CIFAR_RESNET_DEPTHS[name], num_classes, image_size)
    return build_application(name, num_classes, image_size)


@contextlib.contextmanager
def _global_dtype_policy(policy: keras.DTypePolicy) -> Iterator[None]:
    """Set the global Keras dtype policy inside the block and restore it afterwards.

    Keras stores the global policy per thread, so other threads are not affected.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _resolve_dtype_policy(dtype_policy: str | keras.DTypePolicy | None) -> keras.DTypePolicy:
    """Return `dtype_policy` as a DTypePolicy, or the global policy when it is None."""
    if dtype_policy is None:
        return keras.config.dtype_policy()
    if isinstance(dtype_policy, keras.DTypePolicy):
        return dtype_policy
    try:
        return keras.DTypePolicy(dtype_policy)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Invalid dtype_policy={dtype_policy!r}: use 'float32', 'mixed_float16' "
            f"or 'mixed_bfloat16'. Keras reported: {error}"
        ) from error


def _validate_model_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(
            f"Unknown model name {name!r}. Valid names: {', '.join(MODEL_NAMES)}."
        )


def _validate_positive_int(argument: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {argument}={value!r}: pass a positive integer.")


def _validate_image_size(name: str, image_size: int) -> None:
    _validate_positive_int("image_size", image_size)
    minimum = minimum_image_size(name)
    if image_size < minimum:
        raise ValueError(
            f"Invalid image_size={image_size} for model {name!r}: it needs images of "
            f"at least {minimum}x{minimum} pixels. Pass image_size >= {minimum}."
        )

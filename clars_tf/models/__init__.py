"""Image classifiers for large-batch training, built by name with `build_model`."""

from clars_tf.models.builder import (
    MODEL_NAMES,
    OUTPUT_LAYER_NAME,
    build_model,
    minimum_image_size,
)
from clars_tf.models.cifar_resnet import ZeroPaddingShortcut, build_cifar_resnet

__all__ = [
    "MODEL_NAMES",
    "OUTPUT_LAYER_NAME",
    "ZeroPaddingShortcut",
    "build_cifar_resnet",
    "build_model",
    "minimum_image_size",
]

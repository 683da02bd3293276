"""ImageNet architectures from `keras.applications`, built without pretrained weights."""

import keras

# Keras 3.15 rejects inputs smaller than 32x32 for all four architectures.
APPLICATION_MIN_IMAGE_SIZE = 32

_APPLICATIONS = {
    "resnet50": keras.applications.ResNet50,
    "densenet121": keras.applications.DenseNet121,
    "mobilenet_v1": keras.applications.MobileNet,
    "mobilenet_v2": keras.applications.MobileNetV2,
}

APPLICATION_NAMES = tuple(_APPLICATIONS)


def build_application(name: str, num_classes: int, image_size: int) -> keras.Model:
    """Build a randomly initialized Keras application that returns logits.

    The classifier has `num_classes` outputs and no softmax. Nothing is downloaded,
    because `weights=None`. The output is in the compute dtype of the current dtype
    policy. Layer and variable names are those of Keras (`conv1_conv/kernel`,
    `conv1_bn/gamma`).

    Raises:
        KeyError: if `name` is not in `APPLICATION_NAMES`.
    """
    constructor = _APPLICATIONS[name]
    return constructor(
        weights=None,
        input_shape=(image_size, image_size, 3),
        classes=num_classes,
        classifier_activation=None,
    )

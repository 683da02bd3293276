"""ResNets for 32x32 images (CIFAR-10), as defined by He et al. 2016.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
arXiv 1512.03385, section 4.2. A network of depth 6n + 2 has:

- a 3x3 convolution with 16 filters, batch normalization and ReLU.
- three stages of n basic blocks with 16, 32 and 64 filters. A basic block is
  conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU. The first block of
  stages 2 and 3 halves the height and width with a stride-2 convolution.
- global average pooling and a fully connected layer with one logit per class.

Shortcuts are identities (option A of the paper). Where a block changes the shape,
the shortcut takes every second pixel and appends zero channels, so shortcuts add
no parameters. ResNet-20 (n = 3) has 0.27M trainable parameters and ResNet-56
(n = 9) has 0.85M.
Convolutions have no bias, because the batch normalization that follows has a shift.
"""

import keras
from keras import layers, ops

STAGE_FILTERS = (16, 32, 64)
# PyTorch's BatchNorm2d defaults (momentum 0.1 there is 0.9 in Keras' convention),
# as in the CIFAR models of the CLARS reference code. Keras' default of 0.99
# leaves the moving statistics far from the data after a short run.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def blocks_per_stage(depth: int) -> int:
    """Return n, the number of basic blocks per stage, for a network of `depth` layers.

    Raises:
        ValueError: if `depth` is not of the form 6n + 2 with n >= 1.
    """
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ValueError(f"Invalid depth={depth!r}: pass an integer such as 20 or 56.")
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"Invalid depth={depth}: a CIFAR ResNet has depth 6n + 2 with n >= 1 "
            "(8, 14, 20, 32, 44, 56, 110, ...)."
        )
    return (depth - 2) // 6


@keras.saving.register_keras_serializable(package="clars_tf")
class ZeroPaddingShortcut(layers.Layer):
    """Identity shortcut that subsamples pixels and appends zero channels.

    This is option A of He et al. 2016: the output keeps pixel (strides * i,
    strides * j) of the input and pads the channel axis with zeros up to `filters`.
    Inputs are channels-last.
    """

    def __init__(self, filters: int, strides: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.strides = strides

    def call(self, inputs):
        subsampled = inputs[:, :: self.strides, :: self.strides, :]
        extra_channels = self.filters - inputs.shape[-1]
        return ops.pad(subsampled, [[0, 0], [0, 0], [0, 0], [0, extra_channels]])

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape

        def subsampled_size(size):
            return None if size is None else -(-size // self.strides)

        return (batch, subsampled_size(height), subsampled_size(width), self.filters)

    def get_config(self):
        config = super().get_config()
        config.update({"filters": self.filters, "strides": self.strides})
        return config


def _conv_bn(inputs, filters: int, strides: int, prefix: str, index: int):
    """Apply a 3x3 convolution and batch normalization, named `{prefix}_conv{index}`."""
    x = inputs
    padding = "same"
    if strides > 1:
        # Pad one pixel on each side, as PyTorch's padding=1 does, so that output
        # pixel i is centered on input pixel strides * i. TensorFlow's "same"
        # padding pads only after the image for even sizes, which would shift the
        # convolution one pixel away from the pixels that the shortcut keeps.
        x = layers.ZeroPadding2D(padding=1, name=f"{prefix}_pad{index}")(x)
        padding = "valid"
    x = layers.Conv2D(
        filters,
        kernel_size=3,
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{prefix}_conv{index}",
    )(x)
    return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{prefix}_bn{index}")(x)


def _basic_block(inputs, filters: int, strides: int, prefix: str):
    """Apply one basic block with an identity (option A) shortcut."""
    x = _conv_bn(inputs, filters, strides, prefix, index=1)
    x = layers.ReLU(name=f"{prefix}_relu1")(x)
    x = _conv_bn(x, filters, 1, prefix, index=2)

    shortcut = inputs
    if strides > 1 or inputs.shape[-1] != filters:
        shortcut = ZeroPaddingShortcut(filters, strides, name=f"{prefix}_shortcut")(inputs)

    x = layers.Add(name=f"{prefix}_add")([shortcut, x])
    return layers.ReLU(name=f"{prefix}_relu2")(x)


def build_cifar_resnet(
    depth: int, num_classes: int, image_size: int = 32, name: str | None = None
) -> keras.Model:
    """Build the CIFAR ResNet of the given depth, returning logits.

    Layers are named so that variable paths read `stem_conv/kernel`,
    `stage1_block1_conv1/kernel`, `stage1_block1_bn1/gamma` and `logits/kernel`.
    The output is one logit per class with no softmax, in the compute dtype of the
    current dtype policy.

    Args:
        depth: number of weighted layers, 6n + 2 (20 for ResNet-20, 56 for ResNet-56).
        num_classes: number of output logits.
        image_size: height and width of the square RGB input. The paper uses 32.
        name: model name, `resnet{depth}` by default.
    """
    num_blocks = blocks_per_stage(depth)

    inputs = keras.Input(shape=(image_size, image_size, 3), name="images")
    x = layers.Conv2D(
        STAGE_FILTERS[0],
        kernel_size=3,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name="stem_conv",
    )(inputs)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)

    for stage_index, filters in enumerate(STAGE_FILTERS, start=1):
        for block_index in range(1, num_blocks + 1):
            downsamples = stage_index > 1 and block_index == 1
            strides = 2 if downsamples else 1
            prefix = f"stage{stage_index}_block{block_index}"
            x = _basic_block(x, filters, strides, prefix)

    x = layers.GlobalAveragePooling2D(name="pool")(x)
    logits = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name=name or f"resnet{depth}")

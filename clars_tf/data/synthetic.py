"""Synthetic batches for smoke runs and throughput benchmarks.

One batch of random images (standard normal, the range of normalized real
images) and random labels is made once and repeated, so the input pipeline
costs almost nothing per step.
"""

import math

import tensorflow as tf

# ILSVRC-2012 split sizes, so that steps per epoch match a real ImageNet run.
SYNTHETIC_SPLIT_SIZES = {"train": 1_281_167, "validation": 50_000}
SYNTHETIC_NUM_CLASSES = 1000


def synthetic_batches(
    *,
    batch_size: int,
    image_size: int,
    num_classes: int,
    dtype: tf.DType | str,
    seed: int | None,
    num_examples: int | None,
) -> tf.data.Dataset:
    """Return one random batch repeated, forever or for `ceil(num_examples / batch_size)` steps.

    Every batch is full, including the last one of a finite dataset.
    """
    seed_pair = tf.constant([0 if seed is None else seed, 0], tf.int64)
    images = tf.random.stateless_normal([batch_size, image_size, image_size, 3], seed=seed_pair)
    labels = tf.random.stateless_uniform(
        [batch_size], seed=seed_pair + 1, minval=0, maxval=num_classes, dtype=tf.int32
    )
    batch = tf.data.Dataset.from_tensors((tf.cast(images, dtype), labels))

    if num_examples is None:
        return batch.repeat()
    return batch.repeat(math.ceil(num_examples / batch_size))

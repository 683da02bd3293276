"""Image classification input pipelines for tfds, TFRecord shards, image folders and synthetic data.

`build_dataset` returns the batched `(images, labels)` pipeline of one split,
distributed over a `tf.distribute` strategy when one is given.
`get_dataset_info` returns the number of classes and examples of a source
without reading it all. `python -m clars_tf.data.make_tfrecords` converts an
image folder to TFRecord shards.
"""

from clars_tf.data.bad_files import BadFileLog
from clars_tf.data.pipeline import DatasetInfo, build_dataset, get_dataset_info
from clars_tf.data.preprocessing import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

__all__ = [
    "BadFileLog",
    "DatasetInfo",
    "IMAGENET_MEAN_RGB",
    "IMAGENET_STD_RGB",
    "build_dataset",
    "get_dataset_info",
]

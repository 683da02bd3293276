"""Packaging for clars-tf: CLARS and LARS optimizers for Keras 3 on TensorFlow."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="clars-tf",
    version="0.1.0",
    description=(
        "CLARS and LARS large-batch optimizers for Keras 3 on TensorFlow, "
        "with an ImageNet training script."
    ),
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["clars_tf", "clars_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Keras 3 is tf.keras from TensorFlow 2.16 on.
        "tensorflow>=2.16,<2.22",
        "tensorflow-datasets",
        # tensorflow-datasets 4.9.10 imports importlib_resources when it
        # prepares imagenet2012 but does not declare it as a dependency.
        "importlib_resources",
        "absl-py",
        # TensorFlow 2.21 no longer installs TensorBoard, which tf.summary needs.
        "tensorboard",
    ],
    extras_require={
        # scikit-learn ships the digits images of the quick start, and the
        # plotting tests draw with matplotlib.
        "test": ["pytest", "pillow", "scikit-learn", "matplotlib"],
        "plot": ["matplotlib"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)

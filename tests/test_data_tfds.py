"""Tests for the tfds source with datasets prepared offline in the test.

`imagenet2012` is prepared by tfds' real builder from a manual folder with
`ILSVRC2012_img_train.tar` (a tar of per-class tars) and
`ILSVRC2012_img_val.tar`. The builder pairs the sorted validation file names
with the first lines of its own `validation_labels.txt`, so a validation tar
with the first three file names gets the first three labels.
"""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from clars_tf.data import build_dataset, get_dataset_info
from test_data_support import denormalize, jpeg_bytes, random_image

TFDS_IMAGENET_DIR = Path(tfds.__file__).parent / "datasets" / "imagenet2012"
TRAIN_CLASSES = ["n01440764", "n01443537", "n01484850"]
IMAGES_PER_CLASS = 2
NUM_VALIDATION = 3


def _read_lines(path: Path) -> list[str]:
    return path.read_text().split()


def _add_to_tar(tar: tarfile.TarFile, name: str, contents: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(contents)
    tar.addfile(info, io.BytesIO(contents))


def _write_manual_dir(manual_dir: Path, images: dict[str, bytes]) -> None:
    """Write the ILSVRC2012 train and validation tars with the given member files."""
    manual_dir.mkdir(parents=True)
    with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid in TRAIN_CLASSES:
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as inner:
                for index in range(IMAGES_PER_CLASS):
                    name = f"{wnid}_{index}.JPEG"
                    _add_to_tar(inner, name, images[name])
            _add_to_tar(outer, f"{wnid}.tar", buffer.getvalue())
    with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val_tar:
        for index in range(1, NUM_VALIDATION + 1):
            name = f"ILSVRC2012_val_{index:08d}.JPEG"
            _add_to_tar(val_tar, name, images[name])


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory, imagenet_sample_dir):
    """Tiny imagenet2012 prepared by tfds' builder from real ImageNet photographs."""
    root = tmp_path_factory.mktemp("tiny_imagenet")
    validation_wnids = _read_lines(TFDS_IMAGENET_DIR / "validation_labels.txt")[:NUM_VALIDATION]

    images = {}
    for wnid in TRAIN_CLASSES:
        photo = next((imagenet_sample_dir / "train" / wnid).iterdir()).read_bytes()
        images[f"{wnid}_0.JPEG"] = photo
        images[f"{wnid}_1.JPEG"] = jpeg_bytes(random_image(len(images), 60, 80))
    for index, wnid in enumerate(validation_wnids, start=1):
        photo = next((imagenet_sample_dir / "train" / wnid).iterdir()).read_bytes()
        images[f"ILSVRC2012_val_{index:08d}.JPEG"] = photo

    _write_manual_dir(root / "manual", images)
    source_options = dict(data_dir=str(root / "tfds"), manual_dir=str(root / "manual"))
    info = get_dataset_info("imagenet2012", **source_options)
    return info, source_options, images, validation_wnids


def _eval_examples(source, split, **options):
    dataset = build_dataset(
        source, split, global_batch_size=4, training=False, deterministic=True, **options
    )
    images, labels = [], []
    for image_batch, label_batch in dataset.as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    return np.concatenate(images), np.concatenate(labels)


def test_imagenet2012_info_from_builder(tiny_imagenet):
    info, _, _, _ = tiny_imagenet

    assert info.num_classes == 1000
    assert info.split_sizes == {"train": 6, "validation": 3}
    assert not info.small_images
    assert list(info.class_names) == _read_lines(TFDS_IMAGENET_DIR / "labels.txt")


def test_imagenet2012_validation_labels(tiny_imagenet):
    _, kwargs, _, validation_wnids = tiny_imagenet
    label_order = _read_lines(TFDS_IMAGENET_DIR / "labels.txt")

    _, labels = _eval_examples("imagenet2012", "validation", **kwargs)

    expected = [label_order.index(wnid) for wnid in validation_wnids]
    assert sorted(labels) == sorted(expected)


def test_imagenet2012_images_match_folder(tiny_imagenet, tmp_path):
    # The same photographs in an image folder must give the same eval images.
    _, source_options, images, validation_wnids = tiny_imagenet
    label_order = _read_lines(TFDS_IMAGENET_DIR / "labels.txt")
    for index, wnid in enumerate(validation_wnids, start=1):
        class_dir = tmp_path / "train" / wnid
        class_dir.mkdir(parents=True)
        (class_dir / "photo.JPEG").write_bytes(images[f"ILSVRC2012_val_{index:08d}.JPEG"])

    tfds_images, tfds_labels = _eval_examples("imagenet2012", "validation", **source_options)
    folder_images, folder_labels = _eval_examples("folder", "train", data_dir=tmp_path)

    # The folder has 3 of the 1000 classes, so its labels are 0..2. Both
    # sources sort classes by WordNet id, so the orders agree.
    tfds_order = np.argsort(tfds_labels)
    folder_order = np.argsort(folder_labels)
    tfds_wnids = [label_order[label] for label in tfds_labels[tfds_order]]
    assert tfds_wnids == sorted(validation_wnids)
    assert np.array_equal(tfds_images[tfds_order], folder_images[folder_order])


def test_imagenet2012_training_batches(tiny_imagenet):
    _, kwargs, _, _ = tiny_imagenet
    dataset = build_dataset(
        "tfds:imagenet2012", "train", global_batch_size=4, training=True,
        image_size=64, seed=0, **kwargs,
    )

    images, labels = next(dataset.as_numpy_iterator())

    assert images.shape == (4, 64, 64, 3)
    assert set(labels) <= {0, 1, 2}


def test_unprepared_dataset_without_download_raises(tmp_path):
    with pytest.raises(ValueError, match="is not prepared"):
        get_dataset_info("imagenet2012", data_dir=str(tmp_path), download=False)


def test_imagenet2012_without_tars_raises(tmp_path):
    # imagenet2012 has no download URLs, so tfds rejects an empty manual folder.
    (tmp_path / "manual").mkdir()

    with pytest.raises(AssertionError, match="manual_dir should contain two files"):
        get_dataset_info(
            "imagenet2012", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual")
        )


class TinyCifarLike(tfds.core.GeneratorBasedBuilder):
    """32x32 images in 5 classes, generated locally, to exercise the small-image path."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds looks for metadata files beside the builder's package, and a test
    # module has no package.
    pkg_dir_path = epath.Path(__file__).parent
    NUM_CLASSES = 5
    SPLIT_SIZES = {"train": 20, "test": 10}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.SPLIT_SIZES}

    def _generate_examples(self, split):
        offset = 0 if split == "train" else 1000
        for index in range(self.SPLIT_SIZES[split]):
            image = random_image(offset + index, 32, 32)
            yield index, {"image": image, "label": index % self.NUM_CLASSES}


@pytest.fixture(scope="module")
def tiny_cifar_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tiny_cifar")
    TinyCifarLike(data_dir=str(data_dir)).download_and_prepare()
    return str(data_dir)


def test_local_builder_info(tiny_cifar_dir):
    info = get_dataset_info("tiny_cifar_like", data_dir=tiny_cifar_dir, download=False)

    assert info.num_classes == 5
    assert info.small_images
    assert info.split_sizes == {"train": 20, "test": 10}
    assert info.eval_split == "test"
    assert info.num_examples("train[:50%]") == 10


def test_local_builder_eval_images(tiny_cifar_dir):
    images, labels = _eval_examples(
        "tiny_cifar_like", "test", data_dir=tiny_cifar_dir, image_size=32, download=False
    )

    # tfds stores the examples in a shuffled order, so each output image is
    # matched against all generated ones.
    assert images.shape == (10, 32, 32, 3)
    assert sorted(labels) == sorted([index % 5 for index in range(10)])
    originals = [random_image(1000 + index, 32, 32) for index in range(10)]
    for image in denormalize(images):
        assert min(np.abs(image - original).max() for original in originals) < 0.01


def test_local_builder_training_is_small_path(tiny_cifar_dir):
    dataset = build_dataset(
        "tiny_cifar_like", "train", data_dir=tiny_cifar_dir, global_batch_size=8,
        training=True, image_size=32, seed=0, download=False,
    )

    images, labels = next(dataset.as_numpy_iterator())

    assert images.shape == (8, 32, 32, 3)
    assert labels.max() < 5
    # The 4-pixel zero padding shows as black pixels in some crops.
    black = denormalize(images) < 0.01
    assert black.all(axis=-1).any()


"""Image folders in the ImageNet raw layout: `<split>/<class>/<image>`.

The training split is `train/`, the validation split `val/` or
`validation/`, and the test split `test/` (as in CIFAR-10 folders). The class index is the position of the class folder name in
the sorted list of the folder names under `train/` (or under the requested
split's folder when there is no `train/`). For ImageNet, where the folder
names are WordNet ids, this is the label order of tfds' `imagenet2012`.

Scanning skips hidden files (`.DS_Store`, `._name.JPEG`), files without an
image extension, zero-byte files and subfolders inside class folders, and
reports each skip to a `BadFileLog`. File contents are checked later, in the
input pipeline.
"""

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from clars_tf.data.bad_files import BadFileLog

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp"})

SPLIT_FOLDER_NAMES = {
    "train": ("train",),
    "validation": ("val", "validation"),
    "test": ("test",),
}
SPLIT_ALIASES = {"val": "validation"}


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """Image files of one split, with their class indices.

    `paths` are file system paths as bytes (`os.fsencode`), so names that are
    not valid UTF-8 still reach `tf.io.read_file` unchanged.
    """

    paths: tuple[bytes, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (path, reason) of each file skipped while scanning.


def canonical_split(split: str) -> str:
    """Map `val` to `validation` and reject splits other than train, validation and test."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLIT_FOLDER_NAMES:
        raise ValueError(
            f"invalid split {split!r} for an image folder. Use 'train', 'validation' or 'test'."
        )
    return split


def _check_data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        raise ValueError(
            "data_dir is required for the folder source. Pass the folder that "
            "contains train/ and val/"
        )
    if "://" in os.fspath(data_dir):
        raise ValueError(
            f"the folder source reads local folders only, got {data_dir}. Convert "
            "the folder with `python -m clars_tf.data.make_tfrecords` and read the "
            "shards with source='tfrecord', which accepts gs:// paths"
        )
    path = Path(data_dir)
    if not path.is_dir():
        raise ValueError(
            f"image folder {path} does not exist. Pass data_dir= the folder that "
            "contains train/<class>/ and val/<class>/"
        )
    return path


def find_split_folder(data_dir: str | os.PathLike | None, split: str) -> Path | None:
    """Return the folder of `split` under `data_dir`, or None if it has none."""
    path = _check_data_dir(data_dir)
    for folder_name in SPLIT_FOLDER_NAMES[canonical_split(split)]:
        candidate = path / folder_name
        if candidate.is_dir():
            return candidate
    return None


def require_split_folder(data_dir: str | os.PathLike | None, split: str) -> Path:
    folder = find_split_folder(data_dir, split)
    if folder is None:
        expected = " or ".join(f"{name}/" for name in SPLIT_FOLDER_NAMES[canonical_split(split)])
        found = sorted(entry.name for entry in Path(data_dir).iterdir())
        raise ValueError(
            f"image folder {data_dir} has no {expected} for split {split!r} "
            f"(it contains {found[:10]}). Put the images in "
            f"{data_dir}/{expected.split(' ')[0]}<class>/"
        )
    return folder


def _class_folders(split_folder: Path) -> list[os.DirEntry]:
    """Return the visible subfolders of a split folder, sorted by name."""
    with os.scandir(split_folder) as entries:
        folders = [
            entry
            for entry in entries
            if entry.is_dir() and not entry.name.startswith(".")
        ]
    return sorted(folders, key=lambda entry: entry.name)


def list_class_names(data_dir: str | os.PathLike | None) -> tuple[str, ...]:
    """Return the sorted class folder names that define the class indices.

    They come from `train/` when it exists, otherwise from the validation
    folder, otherwise from `test/`.
    """
    split_folder = None
    for split in SPLIT_FOLDER_NAMES:
        split_folder = split_folder or find_split_folder(data_dir, split)
    if split_folder is None:
        require_split_folder(data_dir, "train")  # Raises, naming what the folder contains.
    names = tuple(entry.name for entry in _class_folders(split_folder))
    if not names:
        raise ValueError(
            f"image folder {split_folder} contains no class folders. Put each class's "
            f"images in {split_folder}/<class name>/"
        )
    return names


def _scan_class_folder(folder: Path) -> tuple[list[bytes], list[tuple[str, str]]]:
    """Return the image files of one class folder and the files skipped in it."""
    images = []
    skipped = []
    with os.scandir(folder) as entries:
        for entry in entries:
            reason = None
            if entry.name.startswith("."):
                reason = "hidden file"
            elif entry.is_dir():
                reason = "subfolder inside a class folder"
            elif Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS:
                reason = "not an image file extension"
            elif entry.stat().st_size == 0:
                reason = "empty file"

            if reason is None:
                images.append(os.fsencode(entry.path))
            else:
                skipped.append((entry.path, reason))
    return sorted(images), skipped


def _stray_files(split_folder: Path) -> list[tuple[str, str]]:
    """Return the files that sit directly in a split folder, outside class folders."""
    with os.scandir(split_folder) as entries:
        return [
            (entry.path, "file outside a class folder")
            for entry in entries
            if not entry.is_dir()
        ]


def scan_split(
    data_dir: str | os.PathLike | None,
    split: str,
    class_names: Sequence[str] | None = None,
) -> FolderSplit:
    """List the image files of one split and their class indices.

    Raises:
        ValueError: if `data_dir` or the split folder is missing, a class
            folder contains no images, or a class folder of the split is not
            among `class_names`. The message names the path.
    """
    split_folder = require_split_folder(data_dir, split)
    if class_names is None:
        class_names = list_class_names(data_dir)
    class_index = {name: index for index, name in enumerate(class_names)}

    paths: list[bytes] = []
    labels: list[int] = []
    skipped = _stray_files(split_folder)
    for entry in _class_folders(split_folder):
        if entry.name not in class_index:
            raise ValueError(
                f"class folder {entry.path} is not among the {len(class_names)} classes "
                f"of the training folder. Rename it to a training class or remove it."
            )
        images, class_skipped = _scan_class_folder(Path(entry.path))
        skipped.extend(class_skipped)
        if not images:
            raise ValueError(
                f"class folder {entry.path} contains no images "
                f"({len(class_skipped)} other files skipped). Add images to it "
                "or remove it"
            )
        paths.extend(images)
        labels.extend([class_index[entry.name]] * len(images))

    if not paths:
        raise ValueError(
            f"split folder {split_folder} contains no class folders with images. "
            f"put the images in {split_folder}/<class name>/"
        )
    return FolderSplit(
        paths=tuple(paths),
        labels=tuple(labels),
        class_names=tuple(class_names),
        skipped=tuple(skipped),
    )


def record_skipped(folder_split: FolderSplit, bad_file_log: BadFileLog | None) -> None:
    """Report the files skipped while scanning to `bad_file_log`."""
    if bad_file_log is None:
        return
    for path, reason in folder_split.skipped:
        bad_file_log.record(path, reason)

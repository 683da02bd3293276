r"""Benchmark the ImageNet training input pipeline against a decode-then-crop baseline.

Both pipelines read the same image folder, sample the same random-resized-crop
windows (`clars_tf.data.preprocessing.sample_crop_window`), resize to
`image_size`, flip and batch. The measured one is the library's
`preprocess_imagenet_train`, which decodes only the crop window with
`tf.image.decode_and_crop_jpeg`. The baseline decodes the whole JPEG and then
crops. Passes alternate between the two. The script prints the median
images per wall-clock second and per CPU second of this process, the median
of the per-repeat ratios and the 1-minute load average. Other processes on
a shared machine change wall-clock rates from pass to pass, and CPU time far
less. A second measurement calls each preprocessing
function on one image at a time and keeps the fastest of 3 calls per image,
which is less sensitive to such load. It also times the full
`build_dataset` training pipeline (bad-file checks, normalization included).

Usage:

    python benchmarks/bench_input.py \
        --data_dir=../shared/data/imagenet-sample --repeats=10
"""

import os
import statistics
import time
from pathlib import Path

import tensorflow as tf
from absl import app, flags, logging

from clars_tf.data import build_dataset, folder
from clars_tf.data import preprocessing as prep

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", str(DEFAULT_DATA_DIR), "Image folder with train/<class>/*.JPEG.")
flags.DEFINE_integer("image_size", 224, "Output image side, in pixels.")
flags.DEFINE_integer("batch_size", 64, "Images per batch.")
flags.DEFINE_integer("repeats", 10, "Timed passes over the folder for each pipeline.")
flags.DEFINE_integer("seed", 0, "Seed of the file order and the crop windows.")


def _decode_then_crop(contents: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
    """Baseline: decode the whole JPEG, then cut and resize the same crop window."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = prep.decode_rgb(contents)
    window = prep.sample_crop_window(tf.shape(image)[:2], crop_seed)
    crop = image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]
    crop = tf.image.resize(crop, [image_size, image_size], method="bilinear")
    return tf.image.stateless_random_flip_left_right(crop, flip_seed)


def _pipeline(paths: list[bytes], preprocess, image_size: int, batch_size: int, seed: int):
    files = tf.data.Dataset.from_tensor_slices(paths).shuffle(len(paths), seed=seed)
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    dataset = tf.data.Dataset.zip((files, seeds))
    dataset = dataset.map(
        lambda path, seed_pair: preprocess(tf.io.read_file(path), seed_pair, image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _images_per_second(dataset: tf.data.Dataset, max_batches: int | None = None) -> tuple[float, float]:
    """Return images per wall-clock second and per CPU second of one pass over `dataset`.

    CPU time is this process's user and system time over all its threads, so
    other processes on the machine change it far less than wall-clock time.
    """
    count = 0
    wall_start = time.perf_counter()
    cpu_start = time.process_time()
    for index, batch in enumerate(dataset):
        images = batch[0] if isinstance(batch, tuple) else batch  # build_dataset adds labels.
        count += int(images.shape[0])
        if max_batches is not None and index + 1 >= max_batches:
            break
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    return count / wall, count / cpu


def _single_thread_rates(
    paths: list[bytes], functions: dict[str, object], image_size: int, trials: int
) -> dict[str, float]:
    """Return images per second of each function called on one image at a time.

    Each image's time is the minimum over `trials` calls, which filters out
    interruptions by other processes. The rate is images over the summed
    minimum times.
    """
    traced = {
        name: tf.function(lambda contents, seed, function=function: function(contents, seed, image_size))
        for name, function in functions.items()
    }
    contents = [tf.io.read_file(path) for path in paths]
    seeds = [tf.constant([index, 1], tf.int64) for index in range(len(paths))]
    for function in traced.values():
        function(contents[0], seeds[0])

    totals = dict.fromkeys(traced, 0.0)
    for image, seed in zip(contents, seeds):
        for name, function in traced.items():
            best = float("inf")
            for _ in range(trials):
                start = time.perf_counter()
                function(image, seed)
                best = min(best, time.perf_counter() - start)
            totals[name] += best
    return {name: len(paths) / total for name, total in totals.items()}


def _measure_pairs(
    pipelines: dict[str, tf.data.Dataset], repeats: int
) -> dict[str, list[tuple[float, float]]]:
    """Time alternating passes, flipping the order each repeat so that drift in load cancels."""
    rates = {name: [] for name in pipelines}
    names = list(pipelines)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            rates[name].append(_images_per_second(pipelines[name]))
    return rates


def _median_ratio(numerators: list[float], denominators: list[float]) -> str:
    ratios = [top / bottom for top, bottom in zip(numerators, denominators)]
    return (
        f"median {statistics.median(ratios):.2f}x "
        f"(range {min(ratios):.2f}-{max(ratios):.2f})"
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    paths = list(folder.scan_split(FLAGS.data_dir, "train").paths)
    logging.info("Benchmarking on %d images from %s.", len(paths), FLAGS.data_dir)
    load_before = os.getloadavg()[0]

    pipelines = {
        "fused decode_and_crop_jpeg": _pipeline(
            paths, prep.preprocess_imagenet_train, FLAGS.image_size, FLAGS.batch_size, FLAGS.seed
        ),
        "decode whole JPEG, then crop": _pipeline(
            paths, _decode_then_crop, FLAGS.image_size, FLAGS.batch_size, FLAGS.seed
        ),
    }
    for dataset in pipelines.values():  # Warm-up: trace functions, fill the page cache.
        _images_per_second(dataset)
    rates = _measure_pairs(pipelines, FLAGS.repeats)

    full_pipeline = build_dataset(
        "folder", "train", data_dir=FLAGS.data_dir, global_batch_size=FLAGS.batch_size,
        training=True, image_size=FLAGS.image_size, seed=FLAGS.seed,
    )
    batches_per_pass = len(paths) // FLAGS.batch_size
    _images_per_second(full_pipeline, batches_per_pass)
    full_rates = [_images_per_second(full_pipeline, batches_per_pass) for _ in range(FLAGS.repeats)]

    single_thread = _single_thread_rates(
        paths,
        {"fused": prep.preprocess_imagenet_train, "baseline": _decode_then_crop},
        FLAGS.image_size,
        trials=3,
    )
    load_after = os.getloadavg()[0]

    print(
        f"images: {len(paths)}, image_size: {FLAGS.image_size}, batch: {FLAGS.batch_size}, "
        f"repeats: {FLAGS.repeats}, cpus: {os.cpu_count()}, tensorflow: {tf.__version__}, "
        f"1-minute load average: {load_before:.1f} before, {load_after:.1f} after"
    )
    rows = dict(rates, **{"build_dataset (train)": full_rates})
    for name, values in rows.items():
        wall = [wall_rate for wall_rate, _ in values]
        cpu = [cpu_rate for _, cpu_rate in values]
        print(
            f"{name:30s} median {statistics.median(wall):7.1f} images/s, "
            f"{statistics.median(cpu):7.1f} images per CPU second"
        )

    fused, baseline = rates.values()
    print(
        "ratio fused / baseline, per repeat: "
        f"images/s {_median_ratio([r[0] for r in fused], [r[0] for r in baseline])}, "
        f"images per CPU second {_median_ratio([r[1] for r in fused], [r[1] for r in baseline])}"
    )
    print(
        f"one image at a time (min of 3 calls): fused {single_thread['fused']:.1f} images/s, "
        f"baseline {single_thread['baseline']:.1f} images/s, "
        f"ratio {single_thread['fused'] / single_thread['baseline']:.2f}x"
    )


if __name__ == "__main__":
    app.run(main)

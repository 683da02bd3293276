r"""Benchmark training steps with per-example norms against a plain Keras SGD step.

Configurations, each the model's `train_step` (the step `model.fit` runs) in
one `tf.function`, traced once, on the same model, weights and batch:

- `sgd`: `keras.optimizers.SGD(momentum=0.9)` with Keras' own train step. The
  baseline of every ratio.
- `clars`: `clars_tf.CLARS` with Keras' own train step, without complete
  norms. It shows the optimizer's share of the cost.
- `fast`: CLARS with `enable_per_example_norms(model, method="fast")`.
- `reference`: CLARS with `enable_per_example_norms(model, method="reference")`.

Models (`clars_tf.models.build_model`, random images and labels): `resnet50`
at 224x224 with batch 32 and 1000 classes, and `resnet20` at 32x32 with batch
256 and 10 classes.

Time: one process per model builds every configuration, then runs rounds in
which each configuration takes one step, in alternating order, so that load
from other processes falls on all of them alike. A row reports the median
over rounds of the wall-clock seconds and of the process CPU seconds of a
step, and the median over rounds of the ratio to the SGD step of the same
round.

Memory: each (model, configuration) runs in a fresh subprocess that builds the
model, traces the step and then runs it once. The result is the peak resident
set size during that first run minus the resident size just before it
(VmHWM and VmRSS from `/proc/self/status`, with the peak reset through
`/proc/self/clear_refs` after tracing). Freed tracing memory that the
allocator hands out again is not counted, so the growth is a lower bound.

Chunks: the reference path's peak growth for one wide layer at several chunk
sizes, each in a fresh subprocess measured as above: `dense1024`, a
Dense(1024 -> 1024, relu) + Dense(10) model on 1024 features with batch 256.

Usage:

    python benchmarks/bench_per_example.py --output=runs/bench_per_example.json
    python benchmarks/bench_per_example.py --models=resnet20 --rounds=2 --sections=time
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import clars_tf  # noqa: E402
from clars_tf.models import build_model  # noqa: E402
from clars_tf.per_example import enable_per_example_norms  # noqa: E402
from machine import machine_info  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet20", "resnet50"], "Models to run: resnet20, resnet50.")
flags.DEFINE_list(
    "configs", ["sgd", "clars", "fast", "reference"], "Configurations to run, which must include sgd."
)
flags.DEFINE_list(
    "sections", ["time", "memory", "chunks"], "Sections to run: time, memory, chunks."
)
flags.DEFINE_list("chunk_sizes", ["8", "32", "128"], "Chunk sizes of the chunks section.")
flags.DEFINE_integer("rounds", 3, "Timed rounds, in which each configuration takes one step.")
flags.DEFINE_integer("warmup", 1, "Untimed steps per configuration before the rounds start.")
flags.DEFINE_integer("chunk_size", 16, "Examples per chunk of the reference path.")
flags.DEFINE_string("output", None, "Path of a JSON file for the results. Unset writes none.")
flags.DEFINE_string(
    "single", None, "Internal: MODEL:CONFIG measured for memory in this process, as JSON."
)

BASELINE = "sgd"
LEARNING_RATE = 0.01
# name -> (image size, batch size, number of classes)
MODEL_SPECS = {
    "resnet50": (224, 32, 1000),
    "resnet20": (32, 256, 10),
}
CHUNK_MODEL = "dense1024"
CHUNK_MODEL_BATCH = 256
CONFIGS = ("sgd", "clars", "fast", "reference")


def build_config(model_name: str, config: str):
    """Build the model and batch of one configuration and trace its training step."""
    if model_name == CHUNK_MODEL:
        model, images, labels = _dense_model_and_batch()
    else:
        model, images, labels = _image_model_and_batch(model_name)
    if config == BASELINE:
        optimizer = keras.optimizers.SGD(LEARNING_RATE, momentum=0.9)
    else:
        optimizer = clars_tf.CLARS(LEARNING_RATE)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    if config in ("fast", "reference"):
        enable_per_example_norms(model, method=config, chunk_size=FLAGS.chunk_size)

    # `model.train_step` is the instance's per-example step when it is enabled.
    step = tf.function(lambda images, labels: model.train_step((images, labels)))
    traced = step.get_concrete_function(images, labels)
    return traced, (images, labels)


def _image_model_and_batch(model_name: str):
    image_size, batch_size, num_classes = MODEL_SPECS[model_name]
    model = build_model(model_name, num_classes, image_size, seed=0)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(batch_size, image_size, image_size, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, num_classes, size=batch_size), tf.int32)
    return model, images, labels


def _dense_model_and_batch():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((1024,))
    hidden = keras.layers.Dense(1024, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(10)(hidden))
    rng = np.random.default_rng(0)
    features = tf.constant(rng.normal(size=(CHUNK_MODEL_BATCH, 1024)), tf.float32)
    labels = tf.constant(rng.integers(0, 10, size=CHUNK_MODEL_BATCH), tf.int32)
    return model, features, labels


def run_step(traced, batch) -> tuple[float, float]:
    """Run one training step and return its wall-clock and process CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    logs = traced(*batch)
    float(logs["loss"])
    return time.perf_counter() - wall, time.process_time() - cpu


def time_model(model_name: str, configs: list[str]) -> dict:
    """Time the configurations of one model in interleaved rounds."""
    built = {}
    for config in configs:
        logging.info("%s/%s: building and tracing", model_name, config)
        traced, batch = build_config(model_name, config)
        for _ in range(FLAGS.warmup):
            run_step(traced, batch)
        built[config] = (traced, batch)

    samples = {config: [] for config in configs}
    for round_index in range(FLAGS.rounds):
        order = configs if round_index % 2 == 0 else list(reversed(configs))
        for config in order:
            samples[config].append(run_step(*built[config]))
        logging.info(
            "%s round %d: %s",
            model_name,
            round_index + 1,
            ", ".join(f"{c} {samples[c][-1][0]:.2f}s" for c in configs),
        )

    return {config: summarize(samples[config], samples[BASELINE]) for config in configs}


def summarize(samples, baseline) -> dict:
    """Return medians and ratios to the baseline of the same rounds."""
    wall = [s[0] for s in samples]
    cpu = [s[1] for s in samples]
    return {
        "wall_seconds": statistics.median(wall),
        "cpu_seconds": statistics.median(cpu),
        "wall_ratio": statistics.median(s[0] / b[0] for s, b in zip(samples, baseline)),
        "cpu_ratio": statistics.median(s[1] / b[1] for s, b in zip(samples, baseline)),
        "wall_ratio_range": [
            min(s[0] / b[0] for s, b in zip(samples, baseline)),
            max(s[0] / b[0] for s, b in zip(samples, baseline)),
        ],
    }


def read_memory_kib() -> dict[str, int]:
    """Return VmRSS and VmHWM of this process in KiB, from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident size, and return False where Linux rejects it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_memory_here(model_name: str, config: str) -> dict:
    """Measure the peak resident-size growth of one configuration's first run."""
    traced, batch = build_config(model_name, config)
    if not reset_peak_rss():
        raise OSError(
            "Writing 5 to /proc/self/clear_refs failed to reset the peak resident size. "
            "The memory section needs Linux 4.0 or newer."
        )
    before = read_memory_kib()["VmRSS"]
    run_step(traced, batch)
    return {"step_peak_growth_mib": (read_memory_kib()["VmHWM"] - before) / 1024}


def measure_memory(model_name: str, config: str, chunk_size: int | None = None) -> dict:
    """Run the memory measurement of one configuration in a fresh subprocess."""
    command = [
        sys.executable,
        __file__,
        f"--single={model_name}:{config}",
        f"--chunk_size={chunk_size or FLAGS.chunk_size}",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        logging.error(
            "memory run %s/%s failed with status %d:\n%s",
            model_name,
            config,
            completed.returncode,
            completed.stderr[-3000:],
        )
        return {"error": f"exit status {completed.returncode}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def validate_flags() -> None:
    """Raise ValueError for flag values the benchmark cannot run with."""
    unknown_models = sorted(set(FLAGS.models) - set(MODEL_SPECS))
    if unknown_models:
        raise ValueError(f"Unknown --models {unknown_models}. Valid: {sorted(MODEL_SPECS)}.")
    unknown_configs = sorted(set(FLAGS.configs) - set(CONFIGS))
    if unknown_configs:
        raise ValueError(f"Unknown --configs {unknown_configs}. Valid: {list(CONFIGS)}.")
    if BASELINE not in FLAGS.configs:
        raise ValueError(f"--configs must include the baseline {BASELINE!r}.")
    unknown_sections = sorted(set(FLAGS.sections) - {"time", "memory", "chunks"})
    if unknown_sections:
        raise ValueError(f"Unknown --sections {unknown_sections}. Valid: time, memory, chunks.")
    if FLAGS.rounds < 1:
        raise ValueError(f"--rounds={FLAGS.rounds} must be at least 1.")


def print_tables(results: dict) -> None:
    """Print one Markdown table per model and section, and the chunk-size table."""
    for model_name, sections in results["models"].items():
        if "time" in sections:
            print(f"\n{model_name} step time, median over {FLAGS.rounds} rounds")
            print("| config | wall s | CPU s | wall ratio to sgd (range) | CPU ratio to sgd |")
            print("| --- | --- | --- | --- | --- |")
            for config, row in sections["time"].items():
                low, high = row["wall_ratio_range"]
                print(
                    f"| {config} | {row['wall_seconds']:.2f} | {row['cpu_seconds']:.2f} | "
                    f"{row['wall_ratio']:.2f}x ({low:.2f}-{high:.2f}) | {row['cpu_ratio']:.2f}x |"
                )
        if "memory" in sections:
            print(f"\n{model_name} peak resident-size growth of one step, MiB")
            print("| config | growth |")
            print("| --- | --- |")
            for config, row in sections["memory"].items():
                growth = row.get("step_peak_growth_mib", float("nan"))
                print(f"| {config} | {growth:.0f} |")
    if "chunks" in results:
        print(f"\n{CHUNK_MODEL} reference path, peak resident-size growth of one step")
        print("| chunk size | growth MiB | chunk_size * kernel size, MiB |")
        print("| --- | --- | --- |")
        for size, row in results["chunks"].items():
            growth = row.get("step_peak_growth_mib", float("nan"))
            rows_mib = size * 1024 * 1024 * 4 / 2**20
            print(f"| {size} | {growth:.0f} | {rows_mib:.0f} |")


def main(argv):
    del argv
    if FLAGS.single:
        model_name, config = FLAGS.single.split(":")
        print(json.dumps(measure_memory_here(model_name, config)))
        return 0

    validate_flags()
    results = {"machine_before": machine_info(), "models": {}}
    configs = [c for c in CONFIGS if c in FLAGS.configs]
    # The subprocesses of the memory sections run first, while this process is
    # still small: the time section keeps every configuration of a model alive.
    for model_name in FLAGS.models:
        results["models"][model_name] = {}
        if "memory" in FLAGS.sections:
            memory = {c: measure_memory(model_name, c) for c in configs}
            results["models"][model_name]["memory"] = memory
    if "chunks" in FLAGS.sections:
        results["chunks"] = {
            int(size): measure_memory(CHUNK_MODEL, "reference", int(size))
            for size in FLAGS.chunk_sizes
        }
    if "time" in FLAGS.sections:
        for model_name in FLAGS.models:
            results["models"][model_name]["time"] = time_model(model_name, configs)
            keras.backend.clear_session()
    results["load_average_1min_after"] = os.getloadavg()[0]
    results["flags"] = {
        "rounds": FLAGS.rounds,
        "warmup": FLAGS.warmup,
        "chunk_size": FLAGS.chunk_size,
    }

    print_tables(results)
    if FLAGS.output:
        Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.output).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

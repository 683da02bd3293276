r"""Benchmark the step time of CLARS and LARS against Keras SGD and Lamb.

Two sections, each timed against `keras.optimizers.SGD(momentum=0.9)` in the
same run:

- `apply`: `optimizer.apply(gradients, variables)` alone inside one
  `tf.function`, with and without `jit_compile`, on the trainable variables
  of Keras' ResNet-50 with fixed random gradients. The rows are CLARS with no
  gradient-sample source, CLARS with `gradient_accumulation_steps=2`, LARS,
  SGD and Lamb. With gradient
  accumulation one sample is two calls, the accumulate-only call and the
  update call, and the time is their mean per call.
- `train`: the full training step (forward, backward, apply) of ResNet-50 at
  224x224 with a global batch of 16, CLARS against SGD. It runs on one
  device, and under `MirroredStrategy` over two logical CPUs, where CLARS
  takes each replica's gradient as a gradient sample.

Configurations run interleaved, one sample each per round, in alternating
order, so that load from other processes falls on all of them alike. The
ratio of a row is the median over rounds of its time divided by the SGD time
of the same round. Every timed function must trace exactly once; the script
exits with status 1 otherwise.

Usage:

    python benchmarks/bench_optimizer.py --output=runs/bench_optimizer.json
    python benchmarks/bench_optimizer.py --quick
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# MirroredStrategy needs two logical CPUs, and the CPU can only be split
# before TensorFlow initializes its runtime.
NUM_LOGICAL_CPUS = 2
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS,
)

import dataclasses  # noqa: E402
import json  # noqa: E402
import logging as std_logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import clars_tf  # noqa: E402
from machine import machine_info  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 30, "Timed samples per configuration in the apply section.")
flags.DEFINE_integer("train_steps", 8, "Timed samples per configuration in the train section.")
flags.DEFINE_integer("warmup", 2, "Untimed samples per configuration before timing starts.")
flags.DEFINE_bool(
    "quick", False, "Smoke run: 3 apply samples, 2 train samples and 1 warm-up sample."
)
flags.DEFINE_list("sections", ["apply", "train"], "Sections to run: apply, train or both.")
flags.DEFINE_integer("batch_size", 16, "Global batch size of the train section.")
flags.DEFINE_integer("image_size", 224, "Image side of the train section, in pixels.")
flags.DEFINE_string("output", None, "Path of a JSON file for the results; none if unset.")

SECTIONS = ("apply", "train")
BASELINE = "SGD"
NUM_CLASSES = 1000
# Small enough that the weights of the shared model stay finite over a run.
LEARNING_RATE = 1e-4
GRADIENT_SCALE = 1e-3
@dataclasses.dataclass
class Config:
    """One timed configuration: a name and the function that runs one step."""

    section: str
    name: str
    jit_compile: bool
    step: Callable[[], None]
    traced_function: tf.types.experimental.PolymorphicFunction
    calls_per_sample: int = 1
    replicas: int = 1
    is_baseline: bool = False
    call_times: list[float] = dataclasses.field(default_factory=list)
    sample_times: list[float] = dataclasses.field(default_factory=list)

    def run_sample(self) -> float:
        """Run one sample (all its calls), store the mean seconds per call."""
        times = []
        for _ in range(self.calls_per_sample):
            start = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - start)
        self.call_times.extend(times)
        self.sample_times.append(sum(times) / len(times))
        return self.sample_times[-1]

    def traces(self) -> int:
        return self.traced_function.experimental_get_tracing_count()


# ---------------------------------------------------------------------------
# Optimizers


def _optimizer_factories() -> dict[str, tuple[Callable, int]]:
    """Return, per row name, an optimizer factory and the calls per sample."""
    factories = {
        BASELINE: (lambda: keras.optimizers.SGD(LEARNING_RATE, momentum=0.9), 1),
        "CLARS, no source": (lambda: clars_tf.CLARS(LEARNING_RATE), 1),
        "CLARS, accumulation": (
            lambda: clars_tf.CLARS(LEARNING_RATE, gradient_accumulation_steps=2),
            2,
        ),
        f"{BASELINE}, accumulation": (
            lambda: keras.optimizers.SGD(
                LEARNING_RATE, momentum=0.9, gradient_accumulation_steps=2
            ),
            2,
        ),
        "LARS": (lambda: clars_tf.LARS(LEARNING_RATE), 1),
        "Lamb": (lambda: keras.optimizers.Lamb(LEARNING_RATE), 1),
    }
    return factories


# ---------------------------------------------------------------------------
# apply section


def _random_gradients(variables) -> list[tf.Tensor]:
    """Return one fixed random gradient per variable, from a fixed seed."""
    gradients = []
    for index, variable in enumerate(variables):
        noise = tf.random.stateless_normal(variable.shape, seed=[index, 0])
        gradients.append(GRADIENT_SCALE * noise)
    return gradients


def build_apply_configs() -> tuple[list[Config], dict]:
    """Build the apply-only configurations on ResNet-50's trainable variables."""
    model = keras.applications.ResNet50(weights=None)
    variables = model.trainable_variables
    gradients = _random_gradients(variables)

    configs = []
    for jit_compile in (False, True):
        for name, (factory, calls) in _optimizer_factories().items():
            optimizer = factory()
            optimizer.build(variables)

            def apply(grads, optimizer=optimizer):
                optimizer.apply(grads, variables)

            # TensorFlow may log a retracing warning here because it counts
            # traces across these functions. Each of them traces once, as the
            # `traces` column of the results shows.
            traced = tf.function(apply, jit_compile=jit_compile)
            configs.append(
                Config(
                    section="apply",
                    name=name,
                    jit_compile=jit_compile,
                    step=lambda traced=traced: traced(gradients),
                    traced_function=traced,
                    calls_per_sample=calls,
                    is_baseline=name == BASELINE,
                )
            )

    model_info = {
        "trainable_variables": len(variables),
        "trainable_parameters": int(sum(v.shape.num_elements() for v in variables)),
    }
    return configs, model_info


# ---------------------------------------------------------------------------
# train section


def _training_batch(batch_size: int, image_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    images = tf.random.stateless_uniform([batch_size, image_size, image_size, 3], seed=[1, 0])
    labels = tf.random.stateless_uniform(
        [batch_size], seed=[2, 0], maxval=NUM_CLASSES, dtype=tf.int32
    )
    return images, labels


def _single_device_step(model, optimizer, batch_size: int):
    """Return a traced training step of `model` on the default strategy."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = loss_fn(labels, logits)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)

    return train_step


def _mirrored_step(strategy, model, optimizer, global_batch_size: int):
    """Return a traced training step that runs on every replica of `strategy`."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None
    )

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example_loss = loss_fn(labels, logits)
            loss = tf.nn.compute_average_loss(
                per_example_loss, global_batch_size=global_batch_size
            )
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)

    @tf.function
    def train_step(images, labels):
        strategy.run(replica_step, args=(images, labels))

    return train_step


def build_train_configs(batch_size: int, image_size: int) -> list[Config]:
    """Build the full-training-step configurations: one device and two replicas."""
    images, labels = _training_batch(batch_size, image_size)
    factories = {
        BASELINE: lambda: keras.optimizers.SGD(LEARNING_RATE, momentum=0.9),
        "CLARS": lambda: clars_tf.CLARS(LEARNING_RATE),
    }
    configs = []

    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    for name, factory in factories.items():
        optimizer = factory()
        optimizer.build(model.trainable_variables)
        traced = _single_device_step(model, optimizer, batch_size)
        configs.append(
            Config(
                section="train",
                name=f"{name}, 1 device",
                jit_compile=False,
                step=lambda traced=traced: traced(images, labels),
                traced_function=traced,
                is_baseline=name == BASELINE,
            )
        )

    devices = [device.name for device in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices[:NUM_LOGICAL_CPUS])
    dataset = tf.data.Dataset.from_tensors((images, labels))
    distributed_images, distributed_labels = next(
        iter(strategy.experimental_distribute_dataset(dataset))
    )
    with strategy.scope():
        mirrored_model = keras.applications.ResNet50(
            weights=None, classifier_activation=None
        )
        for name, factory in factories.items():
            optimizer = factory()
            optimizer.build(mirrored_model.trainable_variables)
            traced = _mirrored_step(strategy, mirrored_model, optimizer, batch_size)
            label = "CLARS, replica source" if name == "CLARS" else name
            configs.append(
                Config(
                    section="train",
                    name=f"{label}, 2 replicas",
                    jit_compile=False,
                    step=lambda traced=traced: traced(distributed_images, distributed_labels),
                    traced_function=traced,
                    replicas=NUM_LOGICAL_CPUS,
                    is_baseline=name == BASELINE,
                )
            )
    return configs


# ---------------------------------------------------------------------------
# Timing and reporting


def run_interleaved(configs: list[Config], warmup: int, samples: int) -> None:
    """Warm up every configuration, then time one sample of each per round.

    The order reverses every round, so a slow drift in machine load does not
    favour the configurations that run first.
    """
    for config in configs:
        start = time.perf_counter()
        for _ in range(warmup):
            config.run_sample()
        logging.info(
            "Warmed up %s (jit_compile=%s) in %.1f s.",
            config.name,
            config.jit_compile,
            time.perf_counter() - start,
        )
        config.call_times.clear()
        config.sample_times.clear()

    for round_index in range(samples):
        order = configs if round_index % 2 == 0 else list(reversed(configs))
        for config in order:
            config.run_sample()


def _baseline_of(config: Config, configs: list[Config]) -> Config:
    """Return the SGD configuration of the same section, device layout and jit mode."""
    for candidate in configs:
        if (
            candidate.is_baseline
            and candidate.section == config.section
            and candidate.jit_compile == config.jit_compile
            and candidate.replicas == config.replicas
        ):
            return candidate
    raise ValueError(f"No {BASELINE} baseline for configuration {config.name!r}.")


def summarize(configs: list[Config]) -> list[dict]:
    """Return one result row per configuration with medians and SGD ratios."""
    rows = []
    for config in configs:
        baseline = _baseline_of(config, configs)
        round_ratios = [
            own / reference
            for own, reference in zip(config.sample_times, baseline.sample_times)
        ]
        row = {
            "section": config.section,
            "name": config.name,
            "jit_compile": config.jit_compile,
            "median_ms": 1000 * statistics.median(config.sample_times),
            "ratio_to_sgd": statistics.median(round_ratios),
            "traces": config.traces(),
            "samples": len(config.sample_times),
            "sample_times_ms": [1000 * t for t in config.sample_times],
        }
        if config.calls_per_sample == 2:
            # With 2 accumulation steps every sample is one accumulate-only
            # call followed by one update call.
            row["accumulate_call_median_ms"] = 1000 * statistics.median(config.call_times[0::2])
            row["update_call_median_ms"] = 1000 * statistics.median(config.call_times[1::2])
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Format the result rows as a Markdown table."""
    lines = [
        "| section | configuration | jit_compile | median ms/call | ratio to SGD | traces |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['section']} | {row['name']} | {row['jit_compile']} "
            f"| {row['median_ms']:.1f} | {row['ratio_to_sgd']:.2f} | {row['traces']} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------


def _validate_flags() -> tuple[int, int, int]:
    unknown = sorted(set(FLAGS.sections) - set(SECTIONS))
    if unknown:
        raise app.UsageError(
            f"Unknown --sections value(s) {unknown}; choose from {list(SECTIONS)}."
        )
    if FLAGS.quick:
        return 3, 2, 1
    for flag in ("steps", "train_steps", "warmup"):
        if FLAGS[flag].value < 1:
            raise app.UsageError(f"--{flag} must be >= 1; received {FLAGS[flag].value}.")
    return FLAGS.steps, FLAGS.train_steps, FLAGS.warmup


def main(argv: list[str]) -> None:
    del argv
    apply_samples, train_samples, warmup = _validate_flags()
    # The no-source CLARS rows are intended, so CLARS's one-time warning
    # about missing gradient samples is silenced.
    std_logging.getLogger("clars_tf.optimizers").setLevel(std_logging.ERROR)

    record = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": machine_info(),
        "load_average_start": os.getloadavg()[0],
        "rows": [],
    }
    start = time.perf_counter()

    if "apply" in FLAGS.sections:
        configs, record["model"] = build_apply_configs()
        run_interleaved(configs, warmup=warmup, samples=apply_samples)
        record["rows"] += summarize(configs)

    if "train" in FLAGS.sections:
        configs = build_train_configs(FLAGS.batch_size, FLAGS.image_size)
        run_interleaved(configs, warmup=warmup, samples=train_samples)
        record["rows"] += summarize(configs)

    record["load_average_end"] = os.getloadavg()[0]
    record["wall_time_s"] = time.perf_counter() - start
    print(format_table(record["rows"]))
    print(
        f"1-minute load average: {record['load_average_start']:.1f} at start, "
        f"{record['load_average_end']:.1f} at end; wall time {record['wall_time_s']:.0f} s."
    )

    if FLAGS.output:
        output = Path(FLAGS.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(record, indent=2) + "\n")
        logging.info("Wrote %s.", output)

    retraced = [row for row in record["rows"] if row["traces"] != 1]
    for row in retraced:
        logging.error(
            "%s (jit_compile=%s) traced %d times; every timed function must trace once.",
            row["name"],
            row["jit_compile"],
            row["traces"],
        )
    if retraced:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)

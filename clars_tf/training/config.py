"""The settings of one training run, and their checks."""

import dataclasses
import os

from clars_tf.models import MODEL_NAMES

OPTIMIZERS = ("clars", "lars", "sgd", "lamb")
COMPLETE_NORM_SOURCES = ("auto", "replica", "accumulation", "batch", "per_example")
LR_SCHEDULES = ("poly", "cosine", "step")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
DTYPES = ("float32", "bfloat16", "float16")
# Sources that read files from --data_dir; tfds names read a tfds data dir.
FILE_SOURCES = ("tfrecord", "folder")
BUILT_IN_SOURCES = ("synthetic", "digits")


class ConfigError(ValueError):
    """An invalid training setting; the message names the setting and the fix."""


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run. Field names match the flags of train_imagenet.py.

    Steps count global batches: with `gradient_accumulation_steps=k` the
    optimizer updates every k steps, and learning-rate schedules advance
    every step.
    """

    # Data.
    dataset: str = "synthetic"
    data_dir: str | None = None
    manual_dir: str | None = None
    image_size: int = 224
    label_offset: int | None = None
    cache: bool = False
    deterministic: bool = False
    tf_data_autotune: bool = True
    # Model.
    model: str = "resnet50"
    # Optimizer.
    optimizer: str = "clars"
    momentum: float = 0.9
    nesterov: bool = False
    classic_momentum: str = "auto"
    weight_decay: float = 0.0
    trust_coefficient: float | None = None
    max_trust_ratio: str | None = None
    epsilon: float = 1e-6
    exclude_from_weight_decay: list[str] | None = None
    exclude_from_layer_adaptation: list[str] | None = None
    complete_norm_source: str = "auto"
    gradient_accumulation_steps: int = 1
    # Schedule.
    base_learning_rate: float = 0.128
    reference_batch_size: int = 256
    lr_schedule: str = "poly"
    poly_power: float = 2.0
    end_learning_rate: float = 1e-4
    step_boundaries: list[float] = dataclasses.field(default_factory=lambda: [30.0, 60.0, 80.0])
    step_factor: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    global_batch_size: int = 256
    epochs: int = 90
    train_steps: int = 0
    # Distribution.
    strategy: str = "default"
    tpu: str | None = None
    cpu_replicas: int = 0
    dtype: str = "float32"
    jit_compile: bool = False
    steps_per_execution: int = 1
    # Run.
    model_dir: str | None = None
    eval_every: int = 1
    eval_steps: int = 0
    seed: int | None = None
    log_every_steps: int = 100
    diagnostics_every_steps: int = 100

    def validate(self) -> None:
        """Raise ConfigError for the first invalid setting, before any work."""
        _check_choice("model", self.model, MODEL_NAMES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("complete_norm_source", self.complete_norm_source, COMPLETE_NORM_SOURCES)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("classic_momentum", self.classic_momentum, ("auto", "true", "false"))

        for name in ("image_size", "global_batch_size", "epochs", "reference_batch_size",
                     "gradient_accumulation_steps", "steps_per_execution", "eval_every",
                     "log_every_steps"):
            _check_positive(name, getattr(self, name))
        for name in ("train_steps", "cpu_replicas", "diagnostics_every_steps", "eval_steps"):
            _check_non_negative(name, getattr(self, name))
        for name in ("base_learning_rate", "poly_power", "step_factor"):
            _check_positive(name, getattr(self, name))
        for name in ("weight_decay", "epsilon", "end_learning_rate", "warmup_epochs", "momentum"):
            _check_non_negative(name, getattr(self, name))
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                f"--label_smoothing must be in [0, 1); received {self.label_smoothing}."
            )
        if self.warmup_epochs >= self.epochs and not self.train_steps:
            raise ConfigError(
                f"--warmup_epochs={self.warmup_epochs} must be shorter than "
                f"--epochs={self.epochs}."
            )
        self.max_trust_ratio_value()  # Raises for text that is not a number or "none".

        if not self.model_dir:
            raise ConfigError("--model_dir is missing: set the folder for checkpoints and logs.")
        if self.tpu and self.strategy != "tpu":
            raise ConfigError(
                f"--tpu={self.tpu!r} is only used with --strategy=tpu; received "
                f"--strategy={self.strategy}. Set --strategy=tpu or drop --tpu."
            )
        if self.strategy == "tpu" and not self.tpu:
            raise ConfigError(
                "--strategy=tpu needs --tpu: the TPU name, its grpc:// address, or "
                "'local' on a TPU VM."
            )
        if self.cpu_replicas and self.strategy != "mirrored":
            raise ConfigError(
                f"--cpu_replicas={self.cpu_replicas} splits this machine's CPU into the "
                f"replicas of --strategy=mirrored; received --strategy={self.strategy}. "
                "Add --strategy=mirrored or drop --cpu_replicas."
            )
        self._validate_data()
        self._validate_complete_norm_source()

    def _validate_data(self) -> None:
        if self.dataset in FILE_SOURCES:
            if not self.data_dir:
                raise ConfigError(
                    f"--dataset={self.dataset} reads files from --data_dir, which is missing."
                )
            if not self.data_dir.startswith("gs://") and not os.path.isdir(self.data_dir):
                raise ConfigError(
                    f"--data_dir={self.data_dir} does not exist or is not a folder; "
                    f"--dataset={self.dataset} needs it."
                )
        elif self.dataset not in BUILT_IN_SOURCES:
            if self.data_dir and not self.data_dir.startswith("gs://") and not os.path.isdir(self.data_dir):
                raise ConfigError(
                    f"--data_dir={self.data_dir} (the tfds data directory) does not exist."
                )
            if self.manual_dir and not os.path.isdir(self.manual_dir):
                raise ConfigError(f"--manual_dir={self.manual_dir} does not exist.")
        if self.label_offset is not None and self.dataset != "tfrecord":
            raise ConfigError(
                f"--label_offset only applies to --dataset=tfrecord; received "
                f"--dataset={self.dataset}."
            )

    def _validate_complete_norm_source(self) -> None:
        source = self.complete_norm_source
        if source == "auto":
            return
        if self.optimizer != "clars":
            raise ConfigError(
                f"--complete_norm_source={source} sets where CLARS takes its complete "
                f"norms; --optimizer={self.optimizer} has none. Use --optimizer=clars or "
                "--complete_norm_source=auto."
            )
        if source == "accumulation" and self.gradient_accumulation_steps < 2:
            raise ConfigError(
                "--complete_norm_source=accumulation takes one sample per micro-batch and "
                "needs --gradient_accumulation_steps >= 2."
            )
        if source == "batch" and self.gradient_accumulation_steps > 1:
            raise ConfigError(
                "--complete_norm_source=batch divides by the norm of the whole batch "
                "gradient, but --gradient_accumulation_steps > 1 would add micro-batch "
                "samples. Use --complete_norm_source=accumulation, or accumulation steps 1."
            )

    def max_trust_ratio_value(self) -> float | None | str:
        """Return the max trust ratio as a float, None for no clip, or "default"."""
        if self.max_trust_ratio is None or self.max_trust_ratio == "":
            return "default"
        if str(self.max_trust_ratio).lower() == "none":
            return None
        try:
            value = float(self.max_trust_ratio)
        except ValueError:
            raise ConfigError(
                f"--max_trust_ratio must be a number or 'none'; received {self.max_trust_ratio!r}."
            ) from None
        _check_positive("max_trust_ratio", value)
        return value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"--{name}={value!r} is not valid; choose one of {', '.join(choices)}.")


def _check_positive(name, value):
    if value is None or not value > 0:
        raise ConfigError(f"--{name} must be > 0; received {value}.")


def _check_non_negative(name, value):
    if value is None or not value >= 0:
        raise ConfigError(f"--{name} must be >= 0; received {value}.")

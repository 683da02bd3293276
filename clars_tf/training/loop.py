"""The training loop of train_imagenet.py.

Keras 3.15's `fit` fails under MirroredStrategy with `steps_per_execution`
above 1 or `jit_compile=True`, and under a multi-worker
MultiWorkerMirroredStrategy, while TPU runs need both options. This loop
works under every strategy: a `tf.function` runs several steps per call,
each step is `strategy.run` of a replica step whose forward and backward
pass can be XLA-compiled, and the optimizer update runs in the same step.
"""

import dataclasses
import logging
import math
import os
import shutil
import time

import keras
import tensorflow as tf

from clars_tf import data
from clars_tf.models import build_model
from clars_tf.training import factory
from clars_tf.training.config import ConfigError, TrainConfig
from clars_tf.training.run_logs import RunLog
from clars_tf.training.strategies import check_batch_split, create_strategy

logger = logging.getLogger(__name__)

_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


@dataclasses.dataclass
class _Metrics:
    """Loss, top-1 and top-5 accuracy of one phase (training or evaluation)."""

    loss: keras.metrics.Mean
    top1: keras.metrics.SparseCategoricalAccuracy
    top5: keras.metrics.SparseTopKCategoricalAccuracy

    @classmethod
    def create(cls, prefix: str) -> "_Metrics":
        return cls(
            keras.metrics.Mean(name=f"{prefix}_loss"),
            keras.metrics.SparseCategoricalAccuracy(name=f"{prefix}_top1"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=5, name=f"{prefix}_top5"),
        )

    def update(self, labels, per_example_loss, logits, weights=None) -> None:
        self.loss.update_state(per_example_loss, sample_weight=weights)
        self.top1.update_state(labels, logits, sample_weight=weights)
        self.top5.update_state(labels, logits, sample_weight=weights)

    def reset(self) -> None:
        for metric in (self.loss, self.top1, self.top5):
            metric.reset_state()

    def results(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.result()),
            "top1": float(self.top1.result()),
            "top5": float(self.top5.result()),
        }


class Trainer:
    """Build everything a run needs from a TrainConfig, then train with `run()`.

    Raises:
        ConfigError: for an invalid setting, before any data is read or any
            model is built where the check allows it.
    """

    def __init__(self, config: TrainConfig):
        config.validate()
        self.config = config
        self.strategy = create_strategy(config)
        check_batch_split(config, self.strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        self.info = self._dataset_info()

        train_examples = self.info.num_examples("train")
        self.steps_per_epoch = train_examples // config.global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"The train split has {train_examples} examples, fewer than one global batch "
                f"of {config.global_batch_size}; lower --global_batch_size."
            )
        self.total_steps = config.train_steps or config.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)

        keras.mixed_precision.set_global_policy(_POLICIES[config.dtype])
        if config.seed is not None:
            keras.utils.set_random_seed(config.seed)

        with self.strategy.scope():
            self.model = build_model(config.model, self.info.num_classes, config.image_size)
            self.schedule = factory.build_schedule(config, self.steps_per_epoch, self.total_steps)
            self.optimizer = factory.build_optimizer(config, self.schedule)
            self.optimizer.build(self.model.trainable_variables)
            self.train_metrics = _Metrics.create("train")
            self.eval_metrics = _Metrics.create("eval")

        self.norms_engine = None
        if config.complete_norm_source == "per_example":
            from clars_tf.per_example import PerExampleNorms

            self.norms_engine = PerExampleNorms(self.model)

        self._loss_fn = keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing, reduction=None
        )
        self._compute_gradients = self._gradients
        if config.jit_compile:
            self._compute_gradients = tf.function(self._gradients, jit_compile=True)

        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)
        self.checkpoint_manager = tf.train.CheckpointManager(
            self.checkpoint, self._checkpoint_dir(), max_to_keep=3
        )
        self.run_log = RunLog(
            config.model_dir,
            is_chief=self._is_chief(),
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
        )
        self.train_dataset = self._build_dataset("train", training=True)
        self.eval_dataset = None
        if self._has_split(self.info.eval_split):
            self.eval_dataset = self._build_dataset(self.info.eval_split, training=False)
        else:
            logger.warning(
                "--dataset=%s has no %s split; the run trains without evaluation.",
                config.dataset,
                self.info.eval_split,
            )

    # ------------------------------------------------------------------
    # Setup helpers.

    def _dataset_info(self) -> data.DatasetInfo:
        config = self.config
        try:
            return data.get_dataset_info(
                config.dataset,
                data_dir=config.data_dir,
                manual_dir=config.manual_dir,
                label_offset=config.label_offset,
                image_size=config.image_size,
            )
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"--dataset={config.dataset}: {error}") from None

    def _build_dataset(self, split: str, *, training: bool):
        config = self.config
        try:
            return self._build_dataset_unchecked(split, training=training)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"--dataset={config.dataset}, split {split!r}: {error}") from None

    def _build_dataset_unchecked(self, split: str, *, training: bool):
        config = self.config
        return data.build_dataset(
            config.dataset,
            split,
            global_batch_size=config.global_batch_size,
            training=training,
            data_dir=config.data_dir,
            manual_dir=config.manual_dir,
            image_size=config.image_size,
            strategy=self.strategy,
            seed=config.seed,
            deterministic=config.deterministic,
            cache=config.cache,
            label_offset=config.label_offset,
            num_classes=self.info.num_classes,
            autotune=config.tf_data_autotune,
        )

    def _has_split(self, split: str) -> bool:
        try:
            return self.info.num_examples(split) > 0
        except ValueError:
            return False

    def _is_chief(self) -> bool:
        resolver = getattr(self.strategy, "cluster_resolver", None)
        if resolver is None or not resolver.cluster_spec().as_dict():
            return True
        if resolver.task_type == "chief":
            return True
        has_chief = "chief" in resolver.cluster_spec().as_dict()
        return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief

    def _checkpoint_dir(self) -> str:
        directory = os.path.join(self.config.model_dir, "checkpoints")
        if self._is_chief():
            return directory
        # Every worker takes part in saving, but only the chief keeps its files.
        resolver = self.strategy.cluster_resolver
        return os.path.join(directory, f"temporary_{resolver.task_type}_{resolver.task_id}")

    # ------------------------------------------------------------------
    # Steps, run on every replica.

    def _per_example_loss(self, labels, logits):
        one_hot = tf.one_hot(labels, self.info.num_classes)
        return self._loss_fn(one_hot, tf.cast(logits, tf.float32))

    def _average_loss(self, per_example_loss):
        # Divided by the global batch, so the summed replica gradients are
        # the gradient of the mean loss. Weight regularizers count once, as
        # in Keras' fit.
        loss = tf.nn.compute_average_loss(
            per_example_loss, global_batch_size=self.config.global_batch_size
        )
        if self.model.losses:
            loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
        return loss

    def _gradients(self, images, labels):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            per_example_loss = self._per_example_loss(labels, logits)
            scaled_loss = self.optimizer.scale_loss(self._average_loss(per_example_loss))
        return tape.gradient(scaled_loss, variables), per_example_loss, logits

    def _per_example_gradients(self, images, labels):
        variables = self.model.trainable_variables
        with self.norms_engine.record() as recording:
            logits = self.model(images, training=True)
            per_example_loss = self._per_example_loss(labels, logits)
            scaled_loss = self.optimizer.scale_loss(self._average_loss(per_example_loss))
        loss_scale = getattr(self.optimizer, "dynamic_scale", None)
        grads, norms = recording.gradients_and_norms(
            scaled_loss, variables, loss_divisor=self.config.global_batch_size, loss_scale=loss_scale
        )
        factory.inner_optimizer(self.optimizer).set_complete_norms(norms)
        return grads, per_example_loss, logits

    def _replica_train_step(self, images, labels):
        if self.norms_engine is not None:
            grads, per_example_loss, logits = self._per_example_gradients(images, labels)
        else:
            grads, per_example_loss, logits = self._compute_gradients(images, labels)
        self.optimizer.apply(grads, self.model.trainable_variables)
        self.train_metrics.update(labels, per_example_loss, logits)

    def _replica_eval_step(self, images, labels):
        # The last batches of an epoch can be short or empty on some
        # replicas. Padding to the full per-replica batch with zero-weight
        # examples keeps every shape static, as XLA and TPUs need.
        batch = self.config.global_batch_size // self.replicas
        count = tf.shape(labels)[0]
        padding = batch - count
        images = tf.pad(images, [[0, padding]] + [[0, 0]] * (len(images.shape) - 1))
        labels = tf.pad(labels, [[0, padding]])
        weights = tf.sequence_mask(count, batch, dtype=tf.float32)

        logits = self.model(images, training=False)
        per_example_loss = self._per_example_loss(labels, logits)
        self.eval_metrics.update(labels, per_example_loss, logits, weights)

    @tf.function
    def _train_steps(self, iterator, steps):
        for _ in tf.range(steps):
            self.strategy.run(self._replica_train_step, args=next(iterator))

    @tf.function
    def _evaluate_dataset(self, dataset):
        for images, labels in dataset:
            self.strategy.run(self._replica_eval_step, args=(images, labels))

    @tf.function
    def _evaluate_steps(self, iterator, steps):
        for _ in tf.range(steps):
            self.strategy.run(self._replica_eval_step, args=next(iterator))

    # ------------------------------------------------------------------
    # The run.

    def evaluate(self) -> dict[str, float]:
        """Return the loss, top-1 and top-5 accuracy on the evaluation split."""
        self.eval_metrics.reset()
        if self.eval_dataset is None:
            return {}
        if self.config.eval_steps:
            self._evaluate_steps(iter(self.eval_dataset), tf.constant(self.config.eval_steps))
        else:
            self._evaluate_dataset(self.eval_dataset)
        return self.eval_metrics.results()

    def _restore(self) -> int:
        """Restore the latest checkpoint, if any; return the steps already done."""
        latest = self.checkpoint_manager.restore_or_initialize()
        # `_iterations` counts apply calls, one per step; `iterations`
        # counts updates, fewer with gradient accumulation.
        step = int(factory.inner_optimizer(self.optimizer)._iterations.numpy())
        if latest and step < self.total_steps:
            logger.info("Resuming from %s after %d steps.", latest, step)
            self.run_log.forget_from(step)
        return step

    def _save_checkpoint(self, step: int) -> None:
        self.checkpoint_manager.save(checkpoint_number=step)
        if not self._is_chief():
            shutil.rmtree(self._checkpoint_dir(), ignore_errors=True)

    def _next_chunk(self, step: int, epoch_end: int) -> int:
        """Return how many steps the next call runs, stopping at every boundary."""
        config = self.config
        limit = min(config.steps_per_execution, epoch_end - step)
        for every in (config.log_every_steps, config.diagnostics_every_steps):
            if every:
                limit = min(limit, every - step % every)
        return limit

    def _log_diagnostics(self, step: int) -> None:
        statistics = getattr(factory.inner_optimizer(self.optimizer), "layer_statistics", None)
        if statistics is not None:
            self.run_log.diagnostics(step, step / self.steps_per_epoch, statistics())

    def _learning_rate(self, step: int) -> float:
        return float(self.schedule(step))

    def run(self) -> dict:
        """Train to the configured length, resuming from a checkpoint if one exists.

        Returns the summary that is also written to `summary.json`.
        """
        config = self.config
        started = time.time()
        step = self._restore()
        first_step = step
        iterator = iter(self.train_dataset)
        record = {}

        # A run resumed inside an epoch finishes that epoch.
        for epoch in range(step // self.steps_per_epoch + 1, self.epochs + 1):
            epoch_end = min(epoch * self.steps_per_epoch, self.total_steps)
            if step >= epoch_end:
                continue
            self.run_log.start_epoch(epoch, self.epochs, step)
            self.train_metrics.reset()
            epoch_started = time.time()
            epoch_first_step = step

            while step < epoch_end:
                chunk = self._next_chunk(step, epoch_end)
                self._train_steps(iterator, tf.constant(chunk))
                step += chunk
                values = dict(self.train_metrics.results(), lr=self._learning_rate(step))
                log_now = step % config.log_every_steps == 0
                self.run_log.progress(step - epoch_first_step, step, values, log_line=log_now)
                if log_now:
                    self.run_log.train_scalars(step, values)
                if config.diagnostics_every_steps and step % config.diagnostics_every_steps == 0:
                    self._log_diagnostics(step)

            train_seconds = time.time() - epoch_started
            record = dict(
                epoch=epoch,
                step=step,
                **self.train_metrics.results(),
                learning_rate=self._learning_rate(step),
                images_per_second=(step - epoch_first_step) * config.global_batch_size / train_seconds,
            )
            if epoch % config.eval_every == 0 or step == self.total_steps:
                record.update({f"eval_{k}": v for k, v in self.evaluate().items()})
            record["wall_time"] = time.time() - started
            self._save_checkpoint(step)
            self.run_log.end_epoch(record)

        if not record:
            logger.info("The run in %s is already complete; evaluating.", config.model_dir)
            # Keep the training metrics of the last epoch next to the new evaluation.
            record = self.run_log.last_epoch_record()
            record.update({f"eval_{k}": v for k, v in self.evaluate().items()})
        summary = {
            "final": record,
            "steps": step,
            "steps_this_invocation": step - first_step,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "replicas": self.replicas,
            "num_classes": self.info.num_classes,
            "peak_learning_rate": factory.peak_learning_rate(config),
            "wall_time_seconds": time.time() - started,
            "flags": config.to_dict(),
        }
        self.run_log.summary(summary)
        return summary


def train(config: TrainConfig) -> dict:
    """Run the training that `config` describes and return the run summary."""
    return Trainer(config).run()

"""The files a run writes to its model directory, and its console progress.

- `metrics.jsonl`: one JSON object per epoch (training loss, top-1, top-5,
  learning rate, images per second, and the evaluation metrics when that
  epoch was evaluated).
- `diagnostics.jsonl`: per-layer trust ratios, complete norms and gradient
  norms every `--diagnostics_every_steps` steps.
- `summary.json`: final metrics, wall time and the run's settings.
- `tensorboard/train` and `tensorboard/eval`: the same values as TensorBoard
  summaries.
"""

import json
import logging
import math
import os
import sys

import keras
import tensorflow as tf

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
DIAGNOSTICS_FILE = "diagnostics.jsonl"
SUMMARY_FILE = "summary.json"


def _append_json_line(path: str, record: dict) -> None:
    with tf.io.gfile.GFile(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def _read_json_lines(path: str) -> list[dict]:
    """Return the records of a JSON-lines file, or [] if it does not exist."""
    if not tf.io.gfile.exists(path):
        return []
    with tf.io.gfile.GFile(path) as file:
        lines = file.read().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # A line cut short by an interrupted run.
    return records


def _drop_records(path: str, key: str, first_dropped: float) -> None:
    """Remove the records whose `key` is at least `first_dropped`."""
    if not tf.io.gfile.exists(path):
        return
    earlier_records = [r for r in _read_json_lines(path) if r.get(key, -1) < first_dropped]
    with tf.io.gfile.GFile(path, "w") as file:
        file.write("".join(json.dumps(record) + "\n" for record in earlier_records))


class RunLog:
    """Write the run's JSON files and TensorBoard summaries; show progress.

    Only the chief worker writes files (`is_chief=False` on the others), so
    several workers can share one model directory.
    """

    def __init__(self, model_dir: str, *, is_chief: bool, steps_per_epoch: int, total_steps: int):
        self.model_dir = model_dir
        self.is_chief = is_chief
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self._progress = None
        self._epoch_steps = steps_per_epoch
        self._interactive = sys.stdout.isatty()
        if is_chief:
            tf.io.gfile.makedirs(model_dir)
            board = os.path.join(model_dir, "tensorboard")
            self._train_writer = tf.summary.create_file_writer(os.path.join(board, "train"))
            self._eval_writer = tf.summary.create_file_writer(os.path.join(board, "eval"))

    def path(self, name: str) -> str:
        return os.path.join(self.model_dir, name)

    def forget_from(self, step: int) -> None:
        """Drop the records that a run resumed at `step` writes again.

        These are the diagnostics after `step` and the epoch records from the
        epoch that contains `step + 1`, whose record is rewritten when that
        epoch ends.
        """
        if self.is_chief:
            resumed_epoch = step // self.steps_per_epoch + 1
            _drop_records(self.path(METRICS_FILE), "epoch", resumed_epoch)
            _drop_records(self.path(DIAGNOSTICS_FILE), "step", step + 1)

    def last_epoch_record(self) -> dict:
        """Return the last complete record of metrics.jsonl, or {} if there is none."""
        records = _read_json_lines(self.path(METRICS_FILE))
        return records[-1] if records else {}

    def start_epoch(self, epoch: int, epochs: int, first_step: int) -> None:
        logger.info("Epoch %d/%d starts at step %d.", epoch, epochs, first_step)
        # A run resumed inside an epoch starts at `first_step`, not at the epoch's start.
        epoch_end = (first_step // self.steps_per_epoch + 1) * self.steps_per_epoch
        self._epoch_steps = min(epoch_end, self.total_steps) - first_step
        self._progress = None

    def progress(self, steps_in_epoch: int, step: int, values: dict, *, log_line: bool) -> None:
        """Report training progress: a progress bar on a terminal, log lines otherwise.

        `values` are running means over the epoch, so the bar shows them as
        they are. Without a terminal, only calls with `log_line` log a line.
        """
        if self._interactive:
            if self._progress is None:
                self._progress = keras.utils.Progbar(self._epoch_steps, stateful_metrics=list(values))
            self._progress.update(steps_in_epoch, list(values.items()))
            return
        if log_line:
            text = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
            logger.info("Step %d/%d: %s", step, self.total_steps, text)

    def train_scalars(self, step: int, values: dict) -> None:
        if self.is_chief:
            with self._train_writer.as_default(step=step):
                for name, value in values.items():
                    tf.summary.scalar(name, value)

    def end_epoch(self, record: dict) -> None:
        """Write one epoch's record to metrics.jsonl and TensorBoard."""
        self._progress = None
        logger.info(
            "Epoch %d: %s",
            record["epoch"],
            ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)),
        )
        if not self.is_chief:
            return
        _append_json_line(self.path(METRICS_FILE), record)
        with self._train_writer.as_default(step=record["step"]):
            for name in ("loss", "top1", "top5", "learning_rate", "images_per_second"):
                tf.summary.scalar(f"epoch_{name}", record[name])
        if "eval_loss" in record:
            with self._eval_writer.as_default(step=record["step"]):
                for name in ("loss", "top1", "top5"):
                    tf.summary.scalar(f"epoch_{name}", record[f"eval_{name}"])
        self._train_writer.flush()
        self._eval_writer.flush()

    def diagnostics(self, step: int, epoch: float, statistics: dict) -> None:
        """Log per-layer trust ratios and the batch-to-complete norm ratio."""
        if not self.is_chief or not statistics:
            return
        record = {"step": step, "epoch": epoch}
        for name in ("trust_ratio", "complete_norm", "gradient_norm"):
            record[name] = {path: float(values[name]) for path, values in statistics.items()}
        _append_json_line(self.path(DIAGNOSTICS_FILE), record)

        with self._train_writer.as_default(step=step):
            ratios = list(record["trust_ratio"].values())
            tf.summary.histogram("trust_ratio", ratios)
            for path in statistics:
                complete = record["complete_norm"][path]
                batch_to_complete = record["gradient_norm"][path] / complete if complete > 0 else math.nan
                tf.summary.scalar(f"trust_ratio/{path}", record["trust_ratio"][path])
                tf.summary.scalar(f"batch_to_complete_norm/{path}", batch_to_complete)

    def summary(self, record: dict) -> None:
        if not self.is_chief:
            return
        with tf.io.gfile.GFile(self.path(SUMMARY_FILE), "w") as file:
            json.dump(record, file, indent=2, sort_keys=True)
        logger.info("Wrote %s.", self.path(SUMMARY_FILE))

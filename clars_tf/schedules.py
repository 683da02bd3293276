"""Learning-rate schedules for large-batch training, each with an optional linear warmup.

The schedules are Keras 3 `LearningRateSchedule` objects. A Keras optimizer calls its
schedule with `optimizer.iterations`, the number of updates applied so far, so the
first update uses step 0. The schedules use only `keras.ops`, with no Python branching
on the step, so they run inside `tf.function` and under XLA (`jit_compile=True`).

During the warmup (`step < warmup_steps`) every schedule returns
`peak_learning_rate * step / warmup_steps`, which is 0 at step 0. This matches the
warmup of the CLARS authors' PyTorch code (`poly_lr_rate` in `main_imagenet_lars.py`,
github.com/slowbull/largebatch).
"""

import math
import numbers
from collections.abc import Sequence

import keras
from keras import ops
from keras.optimizers.schedules import LearningRateSchedule

# Batch size that a base learning rate refers to, 256 in the CLARS reference code.
REFERENCE_BATCH_SIZE = 256


def scaled_learning_rate(
    base_learning_rate: float,
    global_batch_size: int,
    reference_batch_size: int = REFERENCE_BATCH_SIZE,
) -> float:
    """Scale a learning rate linearly with the batch size.

    Returns `base_learning_rate * global_batch_size / reference_batch_size`. The CLARS
    reference code scales its peak learning rate this way, with a reference batch
    size of 256.

    Raises:
        ValueError: if the learning rate is not positive or a batch size is not a
            positive integer.
    """
    _validate_positive_float("base_learning_rate", base_learning_rate)
    _validate_positive_int("global_batch_size", global_batch_size)
    _validate_positive_int("reference_batch_size", reference_batch_size)
    return float(base_learning_rate) * global_batch_size / reference_batch_size


class _LinearWarmupSchedule(LearningRateSchedule):
    """Base class for a linear warmup from 0 to the peak, followed by a subclass's decay."""

    def __init__(self, peak_learning_rate: float, warmup_steps: int, name: str | None):
        super().__init__()
        _validate_positive_float("peak_learning_rate", peak_learning_rate)
        _validate_non_negative_int("warmup_steps", warmup_steps)
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.name = name or type(self).__name__

    def __call__(self, step):
        with keras.name_scope(self.name):
            # NOTE: float32 holds whole step counts exactly only up to 2**24 (16.8M).
            step = ops.cast(step, "float32")
            # Without warmup the divisor is 1, which avoids a division by zero. The
            # warmup value is then unused, because no step is below 0.
            warmup_fraction = step / float(max(self.warmup_steps, 1))
            warmup_rate = self.peak_learning_rate * warmup_fraction
            decayed_rate = self._decayed_rate(step)
            in_warmup = ops.less(step, float(self.warmup_steps))
            return ops.where(in_warmup, warmup_rate, decayed_rate)

    def _decayed_rate(self, step):
        """Return the learning rate after the warmup at float32 `step`."""
        raise NotImplementedError

    def get_config(self) -> dict:
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="clars_tf")
class WarmupPolynomialDecay(_LinearWarmupSchedule):
    """Apply linear warmup, then the polynomial decay of the CLARS reference code.

    This reproduces `poly_lr_rate` and `polynomial_decay` in `main_imagenet_lars.py`
    of the CLARS authors' PyTorch code (github.com/slowbull/largebatch), with `step`
    the 0-based update count:

        if step < warmup_steps:
            lr = peak * step / warmup_steps
        else:
            T = total_steps - warmup_steps + 1
            t = min(max(step - warmup_steps, 1), T)
            lr = (peak - end) * (1 - t / T) ** power + end

    The reference calls it with `power=2` and `end=1e-4`, the defaults here. Three
    consequences of the reference formula are kept:

    - With a warmup, step 0 has learning rate 0.
    - The peak is never reached: at `step == warmup_steps`, `t` is already 1.
      Without warmup, steps 0 and 1 share the same learning rate.
    - The rate reaches `end` at step `total_steps + 1` and stays there.

    Args:
        peak_learning_rate: learning rate at the end of the warmup, usually from
            `scaled_learning_rate`.
        total_steps: number of updates in the whole run, warmup included.
        warmup_steps: number of warmup updates, 0 for none. At most `total_steps`.
        end_learning_rate: final learning rate, at least 0 and at most the peak.
        power: exponent of the decay, positive.
        name: name scope of the schedule's operations.
    """

    def __init__(
        self,
        peak_learning_rate: float,
        total_steps: int,
        warmup_steps: int = 0,
        end_learning_rate: float = 1e-4,
        power: float = 2.0,
        name: str | None = None,
    ):
        super().__init__(peak_learning_rate, warmup_steps, name)
        _validate_total_steps(total_steps, self.warmup_steps)
        _validate_end_learning_rate(end_learning_rate, self.peak_learning_rate)
        _validate_positive_float("power", power)
        self.total_steps = int(total_steps)
        self.end_learning_rate = float(end_learning_rate)
        self.power = float(power)

    def _decayed_rate(self, step):
        decay_steps = float(self.total_steps - self.warmup_steps + 1)
        steps_since_warmup = ops.maximum(step - float(self.warmup_steps), 1.0)
        steps_since_warmup = ops.minimum(steps_since_warmup, decay_steps)

        # (T - t) / T equals the reference's 1 - t / T. Both terms are whole numbers,
        # so the numerator is exact in float32 and the end of the decay keeps its
        # precision.
        remaining_fraction = (decay_steps - steps_since_warmup) / decay_steps
        decay_factor = ops.power(remaining_fraction, self.power)
        rate_range = self.peak_learning_rate - self.end_learning_rate
        return rate_range * decay_factor + self.end_learning_rate

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "total_steps": self.total_steps,
                "end_learning_rate": self.end_learning_rate,
                "power": self.power,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="clars_tf")
class WarmupCosineDecay(_LinearWarmupSchedule):
    """Apply linear warmup, then a half-cosine decay from the peak to an end value.

    With `step` the 0-based update count and `D = total_steps - warmup_steps`:

        if step < warmup_steps:
            lr = peak * step / warmup_steps
        else:
            p = min((step - warmup_steps) / D, 1)
            lr = end + (peak - end) * (1 + cos(pi * p)) / 2

    The rate is the peak at `step == warmup_steps` and `end` from `step == total_steps`
    on. With `warmup_steps == total_steps` there is no decay phase, and the rate goes
    from the warmup straight to `end`.

    Args:
        peak_learning_rate: learning rate at the end of the warmup.
        total_steps: number of updates in the whole run, warmup included.
        warmup_steps: number of warmup updates, 0 for none. At most `total_steps`.
        end_learning_rate: final learning rate, at least 0 and at most the peak.
        name: name scope of the schedule's operations.
    """

    def __init__(
        self,
        peak_learning_rate: float,
        total_steps: int,
        warmup_steps: int = 0,
        end_learning_rate: float = 0.0,
        name: str | None = None,
    ):
        super().__init__(peak_learning_rate, warmup_steps, name)
        _validate_total_steps(total_steps, self.warmup_steps)
        _validate_end_learning_rate(end_learning_rate, self.peak_learning_rate)
        self.total_steps = int(total_steps)
        self.end_learning_rate = float(end_learning_rate)

    def _decayed_rate(self, step):
        # The divisor is at least 1 so that D == 0 gives no division by zero. The
        # remaining fraction is then 0 from step total_steps on, which yields `end`.
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        remaining_steps = float(self.total_steps) - step
        remaining_fraction = ops.clip(remaining_steps / decay_steps, 0.0, 1.0)

        # (1 + cos(pi * p)) / 2 equals sin(pi * (1 - p) / 2) ** 2. The sine form keeps
        # float32 precision near the end, where 1 + cos(...) cancels.
        cosine_factor = ops.square(ops.sin(0.5 * math.pi * remaining_fraction))
        rate_range = self.peak_learning_rate - self.end_learning_rate
        return rate_range * cosine_factor + self.end_learning_rate

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "total_steps": self.total_steps,
                "end_learning_rate": self.end_learning_rate,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="clars_tf")
class WarmupStepDecay(_LinearWarmupSchedule):
    """Apply linear warmup, then multiply the rate by `factor` at each boundary.

    With `step` the 0-based update count:

        if step < warmup_steps:
            lr = peak * step / warmup_steps
        else:
            lr = peak * factor ** (number of boundaries <= step)

    `WarmupStepDecay.from_epochs(peak, steps_per_epoch)` builds the common ImageNet
    ResNet-50 schedule, which multiplies the rate by 0.1 at epochs 30, 60 and 80.

    Args:
        peak_learning_rate: learning rate from the end of the warmup to the first
            boundary.
        boundaries: strictly increasing steps at which the rate is multiplied by
            `factor`, each at least `warmup_steps` and at least 1. May be empty.
        factor: multiplier applied at each boundary, in (0, 1].
        warmup_steps: number of warmup updates, 0 for none.
        name: name scope of the schedule's operations.
    """

    def __init__(
        self,
        peak_learning_rate: float,
        boundaries: Sequence[int],
        factor: float = 0.1,
        warmup_steps: int = 0,
        name: str | None = None,
    ):
        super().__init__(peak_learning_rate, warmup_steps, name)
        self.boundaries = _validate_boundaries(boundaries, self.warmup_steps)
        _validate_factor(factor)
        self.factor = float(factor)

    @classmethod
    def from_epochs(
        cls,
        peak_learning_rate: float,
        steps_per_epoch: int,
        boundary_epochs: Sequence[float] = (30, 60, 80),
        factor: float = 0.1,
        warmup_epochs: float = 0,
        name: str | None = None,
    ) -> "WarmupStepDecay":
        """Build the schedule from boundaries and warmup given in epochs.

        Each epoch count is converted to `round(epochs * steps_per_epoch)` steps.
        """
        _validate_positive_int("steps_per_epoch", steps_per_epoch)
        _validate_non_negative_float("warmup_epochs", warmup_epochs)
        for epochs in boundary_epochs:
            _validate_non_negative_float("boundary_epochs", epochs)

        boundaries = [round(epochs * steps_per_epoch) for epochs in boundary_epochs]
        warmup_steps = round(warmup_epochs * steps_per_epoch)
        return cls(peak_learning_rate, boundaries, factor, warmup_steps, name)

    def _decayed_rate(self, step):
        if not self.boundaries:
            return ops.full_like(step, self.peak_learning_rate)

        boundaries = ops.convert_to_tensor(self.boundaries, dtype="float32")
        passed = ops.cast(ops.greater_equal(step, boundaries), "float32")
        num_decays = ops.sum(passed)
        return self.peak_learning_rate * ops.power(self.factor, num_decays)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"boundaries": list(self.boundaries), "factor": self.factor})
        return config


def _validate_positive_float(argument: str, value: float) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid {argument}={value!r}: pass a finite number > 0.")


def _validate_non_negative_float(argument: str, value: float) -> None:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {argument}={value!r}: pass a finite number >= 0.")


def _validate_positive_int(argument: str, value: int) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"Invalid {argument}={value!r}: pass an integer >= 1.")


def _validate_non_negative_int(argument: str, value: int) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"Invalid {argument}={value!r}: pass an integer >= 0.")


def _validate_total_steps(total_steps: int, warmup_steps: int) -> None:
    _validate_positive_int("total_steps", total_steps)
    if warmup_steps > total_steps:
        raise ValueError(
            f"Invalid warmup_steps={warmup_steps}: it exceeds total_steps={total_steps}. "
            "Pass warmup_steps <= total_steps."
        )


def _validate_end_learning_rate(end_learning_rate: float, peak_learning_rate: float) -> None:
    _validate_non_negative_float("end_learning_rate", end_learning_rate)
    if end_learning_rate > peak_learning_rate:
        raise ValueError(
            f"Invalid end_learning_rate={end_learning_rate!r}: it exceeds "
            f"peak_learning_rate={peak_learning_rate!r}. Pass an end rate <= the peak."
        )


def _validate_factor(factor: float) -> None:
    if not _is_real(factor) or not 0 < factor <= 1:
        raise ValueError(f"Invalid factor={factor!r}: pass a number in (0, 1].")


def _validate_boundaries(boundaries: Sequence[int], warmup_steps: int) -> list[int]:
    """Return `boundaries` as a list of ints after checking order and range."""
    boundaries = list(boundaries)
    for boundary in boundaries:
        _validate_positive_int("boundaries", boundary)

    for previous, current in zip(boundaries, boundaries[1:]):
        if current <= previous:
            raise ValueError(
                f"Invalid boundaries={boundaries}: {current} follows {previous}. "
                "Pass strictly increasing steps."
            )

    if boundaries and boundaries[0] < warmup_steps:
        raise ValueError(
            f"Invalid boundaries={boundaries}: the first boundary {boundaries[0]} falls "
            f"inside the warmup of warmup_steps={warmup_steps}. Pass boundaries >= "
            "warmup_steps."
        )
    return [int(boundary) for boundary in boundaries]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)

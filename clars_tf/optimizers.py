"""CLARS and LARS: layer-wise adaptive rate scaling optimizers for Keras 3.

Both optimizers share one update rule, in `_TrustRatioOptimizer`, and differ
only in the norm that the trust ratio divides by. `LARS` divides by the norm
of the batch's update direction. `CLARS` divides by the complete norm: the
mean of the layer's gradient norms over gradient samples, which are replicas,
accumulation micro-batches or per-example gradients.
"""

import logging
import re
import warnings
from collections.abc import Sequence

import keras
import tensorflow as tf

from clars_tf.norms import l2_norm, trust_ratio

logger = logging.getLogger(__name__)

# Marks "no gradient sample for this variable" in the complete-norm vectors.
# Norms are never negative, so any negative value is free to use.
_NO_SAMPLE = -1.0

# Columns of each variable's `layer_statistics` slot.
_STATISTICS = ("trust_ratio", "complete_norm", "gradient_norm")


def _check_positive(argument: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{argument}` must be a number; received {argument}={value!r}.")
    if not value > 0:
        raise ValueError(f"`{argument}` must be > 0; received {argument}={value!r}.")
    return float(value)


def _check_non_negative(argument: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{argument}` must be a number; received {argument}={value!r}.")
    if not value >= 0:
        raise ValueError(f"`{argument}` must be >= 0; received {argument}={value!r}.")
    return float(value)


def _check_patterns(argument: str, patterns) -> list[str] | None:
    """Validate an exclusion list: `None` or a list of regular expressions."""
    if patterns is None:
        return None
    if isinstance(patterns, (str, bytes)):
        raise ValueError(
            f"`{argument}` must be a list of regular expressions, not a bare "
            f"string; received {argument}={patterns!r}. Wrap it in a list: "
            f"{argument}=[{patterns!r}]."
        )
    if not isinstance(patterns, Sequence):
        raise ValueError(
            f"`{argument}` must be a list of regular expressions; received "
            f"{argument}={patterns!r}."
        )
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(
                f"`{argument}` must contain only strings; received the item "
                f"{pattern!r} in {argument}={patterns!r}."
            )
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"`{argument}` contains an invalid regular expression "
                f"{pattern!r}: {error}."
            ) from None
    return list(patterns)


def _variable_path(variable) -> str:
    # Keras 3 variables carry the full path (`conv1_bn/gamma`), and a raw
    # tf.Variable only its name (`conv1_bn/gamma:0`).
    return getattr(variable, "path", None) or variable.name


class _TrustRatioOptimizer(keras.optimizers.Optimizer):
    """Momentum SGD whose step for each tensor is scaled by a trust ratio.

    Subclasses choose the norm in the trust ratio's denominator through
    `_denominator_norm`. See `CLARS` for the full update rule.
    """

    def __init__(
        self,
        learning_rate,
        momentum,
        nesterov,
        classic_momentum,
        weight_decay,
        trust_coefficient,
        max_trust_ratio,
        epsilon,
        exclude_from_weight_decay,
        exclude_from_layer_adaptation,
        **kwargs,
    ):
        if isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool):
            learning_rate = _check_positive("learning_rate", learning_rate)
        momentum = _check_non_negative("momentum", momentum)
        if momentum >= 1:
            raise ValueError(f"`momentum` must be in [0, 1); received momentum={momentum!r}.")
        if nesterov and momentum == 0:
            raise ValueError(
                "`nesterov=True` needs a momentum > 0; received momentum=0. "
                "Set a momentum such as 0.9, or nesterov=False."
            )
        if weight_decay is None:
            weight_decay = 0.0
        weight_decay = _check_non_negative("weight_decay", weight_decay)
        trust_coefficient = _check_positive("trust_coefficient", trust_coefficient)
        if max_trust_ratio is not None:
            max_trust_ratio = _check_positive("max_trust_ratio", max_trust_ratio)
        epsilon = _check_non_negative("epsilon", epsilon)
        exclude_from_weight_decay = _check_patterns(
            "exclude_from_weight_decay", exclude_from_weight_decay
        )
        exclude_from_layer_adaptation = _check_patterns(
            "exclude_from_layer_adaptation", exclude_from_layer_adaptation
        )

        # The coupled L2 term is part of this optimizer's update direction.
        # Passing weight_decay to Keras would add its decoupled decay on top.
        super().__init__(learning_rate=learning_rate, weight_decay=None, **kwargs)
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.nesterov = bool(nesterov)
        self.classic_momentum = bool(classic_momentum)
        self.trust_coefficient = trust_coefficient
        self.max_trust_ratio = max_trust_ratio
        self.epsilon = epsilon
        # Stored under private names: Keras' base class already has a method
        # called `exclude_from_weight_decay`.
        self._weight_decay_patterns = exclude_from_weight_decay
        self._layer_adaptation_patterns = exclude_from_layer_adaptation

    def build(self, variables):
        """Create the momentum and statistics slots and decide the exclusions."""
        if self.built:
            return
        super().build(variables)

        self._momentums = None
        if self.momentum > 0:
            self._momentums = self.add_optimizer_variables(variables, "momentum")

        self._layer_statistics = []
        for variable in variables:
            if self._overwrite_variable_with_gradient(variable):
                self._layer_statistics.append(None)
                continue
            self._layer_statistics.append(
                self.add_variable(
                    shape=(len(_STATISTICS),),
                    dtype="float32",
                    name=_variable_path(variable).replace("/", "_") + "_layer_statistics",
                )
            )

        self._decay_flags, self._adaptation_flags = self._decide_exclusions(variables)

    def _decide_exclusions(self, variables) -> tuple[list[bool], list[bool]]:
        """Return, per variable, whether it gets weight decay and layer adaptation."""
        paths = [_variable_path(v) for v in variables]
        self._warn_unmatched("exclude_from_weight_decay", self._weight_decay_patterns, paths)
        self._warn_unmatched(
            "exclude_from_layer_adaptation", self._layer_adaptation_patterns, paths
        )

        decay_flags = []
        adaptation_flags = []
        for variable, path in zip(variables, paths):
            excluded_from_decay = any(
                re.search(p, path) for p in self._weight_decay_patterns or []
            )
            # `_use_weight_decay` honours Keras' own
            # `optimizer.exclude_from_weight_decay(var_list, var_names)`.
            decay_flags.append(
                self.weight_decay > 0
                and not excluded_from_decay
                and self._use_weight_decay(variable)
            )

            if self._layer_adaptation_patterns is None:
                # Biases and normalization scales and offsets: the reference
                # code skips names containing "bn" or "bias", and rank <= 1
                # catches the same tensors under any naming scheme.
                adapted = len(variable.shape) > 1
            else:
                adapted = not any(re.search(p, path) for p in self._layer_adaptation_patterns)
            adaptation_flags.append(adapted)
        return decay_flags, adaptation_flags

    @staticmethod
    def _warn_unmatched(argument: str, patterns: list[str] | None, paths: list[str]) -> None:
        for pattern in patterns or []:
            if not any(re.search(pattern, path) for path in paths):
                example = f" (paths look like {paths[0]!r})" if paths else ""
                warnings.warn(
                    f"The {argument} pattern {pattern!r} matches no variable "
                    f"path{example}, so it excludes nothing. Patterns are "
                    "searched in `variable.path`.",
                    UserWarning,
                    stacklevel=3,
                )

    def _apply_weight_decay(self, variables):
        # Weight decay is coupled L2, added to the gradient in update_step.
        # Keras' decoupled decay must never run as well.
        return

    def _backend_apply_gradients(self, grads, trainable_variables):
        # Replaces Keras' version, which applies decoupled weight decay and
        # runs accumulation as a conditional around the cross-replica
        # reduction (that fails under MirroredStrategy in Keras 3.15). Here
        # every call reduces, and update_step decides whether to accumulate
        # or update, so no collective sits inside a conditional.
        grads = self._clip_gradients(grads)
        self._backend_update_step(grads, trainable_variables, self.learning_rate)

        if self.use_ema:
            self._update_model_variables_moving_average(self._trainable_variables)
            if self.ema_overwrite_frequency:
                overwrite = tf.equal((self.iterations + 1) % self.ema_overwrite_frequency, 0)
                tf.cond(
                    overwrite,
                    lambda: self._overwrite_model_variables_with_average_value(
                        self._trainable_variables
                    ),
                    lambda: None,
                )

    def update_step(self, gradient, variable, learning_rate):
        """Update one variable, or add its gradient to the accumulator."""
        index = self._get_variable_index(variable)
        steps = self.gradient_accumulation_steps
        if not steps:
            self._update_variable(index, gradient, variable, learning_rate)
            return

        accumulator = self._accumulated_gradients[index]
        gradient = tf.convert_to_tensor(gradient)
        is_update_step = tf.equal((self._iterations + 1) % steps, 0)

        def update():
            mean_gradient = (tf.cast(accumulator, tf.float32) + tf.cast(gradient, tf.float32)) / steps
            self._update_variable(index, mean_gradient, variable, learning_rate)
            self.assign(accumulator, tf.zeros_like(accumulator))

        def accumulate():
            self.assign_add(accumulator, gradient)

        tf.cond(is_update_step, update, accumulate)

    def _update_variable(self, index, gradient, variable, learning_rate):
        """Apply the trust-ratio-scaled momentum step to one variable."""
        gradient = tf.cast(tf.convert_to_tensor(gradient), tf.float32)
        learning_rate = tf.cast(learning_rate, tf.float32)
        weight = tf.cast(variable, tf.float32)

        gradient_norm = l2_norm(gradient)
        direction = gradient
        direction_norm = gradient_norm
        if self._decay_flags[index]:
            direction = gradient + self.weight_decay * weight
            direction_norm = l2_norm(direction)

        denominator = self._denominator_norm(index, direction_norm)
        if self._adaptation_flags[index]:
            ratio = trust_ratio(
                l2_norm(weight), denominator, self.trust_coefficient, self.epsilon, self.max_trust_ratio
            )
        else:
            ratio = tf.constant(1.0)
        scaled_learning_rate = learning_rate * ratio

        if variable.dtype == tf.float32:
            self._apply_fused_step(index, variable, direction, scaled_learning_rate)
        else:
            self._apply_step(index, variable, weight, direction, scaled_learning_rate)
        self.assign(
            self._layer_statistics[index],
            tf.stack([ratio, denominator, gradient_norm]),
        )

    def _apply_step(self, index, variable, weight, direction, scaled_learning_rate):
        """Take the momentum step in float32 and store it in the variable's dtype."""
        if self._momentums is None:
            step = scaled_learning_rate * direction
        elif self.classic_momentum:
            velocity = self.momentum * tf.cast(self._momentums[index], tf.float32)
            velocity += scaled_learning_rate * direction
            self.assign(self._momentums[index], velocity)
            step = velocity
            if self.nesterov:
                step = self.momentum * velocity + scaled_learning_rate * direction
        else:
            velocity = self.momentum * tf.cast(self._momentums[index], tf.float32) + direction
            self.assign(self._momentums[index], velocity)
            step = scaled_learning_rate * velocity
            if self.nesterov:
                step = scaled_learning_rate * (direction + self.momentum * velocity)
        self.assign(variable, weight - step)

    def _apply_fused_step(self, index, variable, direction, scaled_learning_rate):
        """Take the momentum step of a float32 variable in one fused kernel.

        `ResourceApplyMomentum` computes `v = momentum * v + grad` and
        `w -= lr * v` (Nesterov: `w -= lr * (grad + momentum * v)`), reading
        each tensor once. The plain form passes `grad=d, lr=lr * r`. The
        classic form, whose buffer contains the scaled step, passes
        `grad=lr * r * d, lr=1`. Both then match `_apply_step`.
        """
        if isinstance(variable, keras.Variable):
            variable = variable.value
        if self._momentums is None:
            tf.raw_ops.ResourceApplyGradientDescent(
                var=variable.handle, alpha=scaled_learning_rate, delta=direction
            )
            return
        if self.classic_momentum:
            kernel_gradient = scaled_learning_rate * direction
            kernel_learning_rate = tf.constant(1.0)
        else:
            kernel_gradient = direction
            kernel_learning_rate = scaled_learning_rate
        tf.raw_ops.ResourceApplyMomentum(
            var=variable.handle,
            accum=self._momentums[index].value.handle,
            lr=kernel_learning_rate,
            grad=kernel_gradient,
            momentum=tf.constant(self.momentum, tf.float32),
            use_nesterov=self.nesterov,
        )

    def _denominator_norm(self, index: int, direction_norm: tf.Tensor) -> tf.Tensor:
        """Return the norm that the trust ratio of variable `index` divides by.

        `direction_norm` is the norm of the update direction `d`.
        """
        raise NotImplementedError

    def layer_statistics(self) -> dict[str, dict[str, tf.Tensor]]:
        """Return the statistics of the last update, by variable path.

        For each trainable variable: `trust_ratio` (the factor on its
        learning rate, 1 where layer adaptation is excluded), `complete_norm`
        (the norm the trust ratio divided by) and `gradient_norm` (the norm
        of the mean gradient, before weight decay). All zeros before the
        first update.
        """
        if not self.built:
            raise ValueError(
                "The optimizer has no statistics before it is built. Call "
                "`optimizer.build(model.trainable_variables)` or train a step first."
            )
        statistics = {}
        for variable, slot in zip(self._trainable_variables, self._layer_statistics):
            if slot is None:
                continue
            values = tf.convert_to_tensor(slot)
            statistics[_variable_path(variable)] = {
                name: values[column] for column, name in enumerate(_STATISTICS)
            }
        return statistics

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "classic_momentum": self.classic_momentum,
                "trust_coefficient": self.trust_coefficient,
                "max_trust_ratio": self.max_trust_ratio,
                "epsilon": self.epsilon,
                "exclude_from_weight_decay": self._weight_decay_patterns,
                "exclude_from_layer_adaptation": self._layer_adaptation_patterns,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="clars_tf")
class LARS(_TrustRatioOptimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman and Ginsburg 2017).

    For each variable `w` with mean gradient `g` (the same rule as `CLARS`,
    with the norm of the batch's update direction in the denominator):

    ```python
    d = g + weight_decay * w                 # unless excluded from decay
    r = trust_coefficient * ||w|| / (||d|| + epsilon)
    r = min(r, max_trust_ratio)              # only if max_trust_ratio is set
    r = 1                                    # if excluded from adaptation,
                                             # or ||w|| == 0, or ||d|| == 0
    v = momentum * v + learning_rate * r * d
    w = w - v                                # classic_momentum=True (default)
    ```

    Source: Y. You, I. Gitman, B. Ginsburg, "Large Batch Training of
    Convolutional Networks", arXiv:1708.03888. The arguments mean the same
    as in `CLARS`, and only the defaults differ: `trust_coefficient=0.001`,
    `max_trust_ratio=None` (no clip) and `classic_momentum=True`. That is
    the form of the LARS paper and of TF Model Garden's LARS.
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum=0.9,
        nesterov=False,
        classic_momentum=True,
        weight_decay=0.0,
        trust_coefficient=0.001,
        max_trust_ratio=None,
        epsilon=1e-6,
        exclude_from_weight_decay=None,
        exclude_from_layer_adaptation=None,
        name=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            classic_momentum=classic_momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            max_trust_ratio=max_trust_ratio,
            epsilon=epsilon,
            exclude_from_weight_decay=exclude_from_weight_decay,
            exclude_from_layer_adaptation=exclude_from_layer_adaptation,
            name=name,
            **kwargs,
        )

    def _denominator_norm(self, index, direction_norm):
        return direction_norm


@keras.saving.register_keras_serializable(package="clars_tf")
class CLARS(_TrustRatioOptimizer):
    """Complete Layer-wise Adaptive Rate Scaling (Huo, Gu and Huang 2021).

    For each variable `w` with mean gradient `g`:

    ```python
    d = g + weight_decay * w                 # unless excluded from decay
    r = trust_coefficient * ||w|| / (complete_norm + epsilon)
    r = min(r, max_trust_ratio)              # unless max_trust_ratio is None
    r = 1                                    # if excluded from adaptation, or
                                             # ||w|| == 0 or complete_norm == 0
    v = momentum * v + d
    w = w - learning_rate * r * v            # nesterov: r * (d + momentum * v)
    ```

    With `classic_momentum=True` the scaled step goes into the buffer
    instead: `v = momentum * v + learning_rate * r * d; w = w - v` (with
    nesterov, `w = w - (momentum * v + learning_rate * r * d)`).

    `complete_norm` is the mean of the layer's gradient norms over the
    gradient samples of the step, which is large when the samples disagree
    and so shrinks early steps without a warmup schedule. The samples are:

    - Replicas: under a strategy with R >= 2 replicas in sync (and
      `replica_norms=True`), each replica's local mean gradient.
    - Accumulation micro-batches: with `gradient_accumulation_steps=k`, each
      of the k gradients passed to `apply` before an update. With replicas
      too, the complete norm is the mean over R * k norms.
    - Explicit norms: `set_complete_norms` hands in norms computed by the
      training step, such as the mean per-example gradient norm. They take
      the place of the local gradient norm of the next `apply` call.

    With no sample (one replica, no accumulation, nothing handed in) the
    complete norm is `||d||`, so CLARS is LARS with a clipped trust ratio,
    and the optimizer logs one warning.

    Sources: Z. Huo, B. Gu, H. Huang, "Large Batch Training Does Not Need
    Warmup", AAAI 2021, arXiv:2002.01576; the authors' PyTorch code,
    GitHub `slowbull/largebatch` (`lars_optimizer.py`), which sets the
    defaults below. Deviations from that code:

    - Where `||w|| == 0` or `complete_norm == 0` the ratio is 1 (unclipped),
      so zero-initialized layers learn; the reference clips this case too,
      and with a zero gradient norm its ratio becomes 0.
    - The reference computes `r` as the LARS ratio times
      `||d|| / (complete_norm + epsilon)`; here the LARS factor cancels, which
      differs only in where epsilon enters.
    - The reference takes its complete norm from separate micro-batches of
      8 examples before each step; here the samples come from the step's own
      gradients (replicas, micro-batches or per-example norms).
    - Norms and the update are computed in float32 for every variable dtype.

    Args:
        learning_rate: A float > 0, a
            `keras.optimizers.schedules.LearningRateSchedule`, or a callable
            with no arguments that returns the learning rate. Defaults to 0.1.
        momentum: Momentum in [0, 1). Defaults to 0.9.
        nesterov: Use Nesterov momentum (needs momentum > 0). Defaults to
            False.
        classic_momentum: Put the scaled step into the momentum buffer
            (You et al. 2017, TF Model Garden) instead of the raw direction
            (the reference code and PyTorch SGD). Defaults to False.
        weight_decay: Coupled L2 coefficient, added to the gradient of every
            variable not excluded, before the trust ratio. Defaults to 0.
            Keras' decoupled weight decay is never applied.
        trust_coefficient: Factor on `||w|| / complete_norm`. Defaults to
            0.01.
        max_trust_ratio: Upper bound on the trust ratio, or None for no
            bound. Defaults to 0.1.
        epsilon: Added to the denominator norm. Defaults to 1e-6.
        exclude_from_weight_decay: A list of regular expressions; a variable
            whose `variable.path` (for example `conv1_bn/gamma`) contains a
            match gets no weight decay. Defaults to None: decay everywhere.
        exclude_from_layer_adaptation: A list of regular expressions; a
            matching variable keeps r = 1. Defaults to None, which excludes
            every variable of rank <= 1 (biases, normalization scales and
            offsets). A list replaces that default; `[]` adapts everything.
        replica_norms: Use each replica's local gradient as a gradient sample
            when the strategy has two or more replicas in sync. Defaults to
            True.
        **kwargs: Keras base optimizer arguments: `name`, `clipnorm`,
            `clipvalue`, `global_clipnorm`, `use_ema`, `ema_momentum`,
            `ema_overwrite_frequency`, `loss_scale_factor`,
            `gradient_accumulation_steps`.
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum=0.9,
        nesterov=False,
        classic_momentum=False,
        weight_decay=0.0,
        trust_coefficient=0.01,
        max_trust_ratio=0.1,
        epsilon=1e-6,
        exclude_from_weight_decay=None,
        exclude_from_layer_adaptation=None,
        replica_norms=True,
        name=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            classic_momentum=classic_momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            max_trust_ratio=max_trust_ratio,
            epsilon=epsilon,
            exclude_from_weight_decay=exclude_from_weight_decay,
            exclude_from_layer_adaptation=exclude_from_layer_adaptation,
            name=name,
            **kwargs,
        )
        self.replica_norms = bool(replica_norms)
        self._explicit_norms_requested = False
        self._warned_no_samples = False

    def build(self, variables):
        """Create the slots, plus the vectors that carry complete norms."""
        if self.built:
            return
        super().build(variables)
        count = len(variables)

        # The complete norm of the current update, or _NO_SAMPLE per variable.
        self._complete_norms = self.add_variable(
            shape=(count,),
            initializer=keras.initializers.Constant(_NO_SAMPLE),
            dtype="float32",
            aggregation="only_first_replica",
            name="complete_norms",
        )
        if self.gradient_accumulation_steps:
            # Sums and counts of the samples since the last update.
            self._sample_norm_sums = self.add_variable(
                shape=(count,), dtype="float32", aggregation="only_first_replica",
                name="sample_norm_sums",
            )
            self._sample_counts = self.add_variable(
                shape=(count,), dtype="float32", aggregation="only_first_replica",
                name="sample_counts",
            )
        # Norms from `set_complete_norms`, one copy per replica: each replica
        # hands in its own, and they are summed with the gradients. A raw
        # tf.Variable, so the transient value stays out of `.keras` files.
        self._pending_norms = tf.Variable(
            tf.fill([count], _NO_SAMPLE),
            trainable=False,
            name="pending_complete_norms",
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.MEAN,
        )

    def set_complete_norms(self, norms) -> None:
        """Hand in complete norms for the next `apply` call.

        Call this in the training step, in the same replica context and
        traced function as the `apply` or `apply_gradients` call that should
        use the norms, before that call. Each replica hands in its own norms.
        The optimizer averages the values of the R replicas, and with
        gradient accumulation those of the k calls.

        Args:
            norms: One float per trainable variable, in the order the
                optimizer was built with (`model.trainable_variables`), or a
                float vector of that length. Each is the mean over this
                replica's examples of `||d loss_i / d w||` for the example's
                own loss `loss_i`, not divided by the replica count and not
                multiplied by a loss scale. `None` leaves that variable's
                norm to the other sources.
        """
        if not self.built:
            raise ValueError(
                "`set_complete_norms` needs a built optimizer. Call "
                "`optimizer.build(model.trainable_variables)` first (`fit` "
                "builds it before the first step)."
            )
        count = len(self._trainable_variables)
        if isinstance(norms, (list, tuple)):
            if len(norms) != count:
                raise ValueError(
                    f"`set_complete_norms` expects {count} norms, one per "
                    f"trainable variable, and received {len(norms)}."
                )
            norms = tf.stack(
                [
                    tf.constant(_NO_SAMPLE) if n is None else tf.reshape(tf.cast(n, tf.float32), [])
                    for n in norms
                ]
            )
        else:
            norms = tf.cast(norms, tf.float32)
            if norms.shape.rank != 1 or norms.shape[0] != count:
                raise ValueError(
                    f"`set_complete_norms` expects a vector of {count} norms, "
                    f"one per trainable variable, and received shape {norms.shape}."
                )
        self._explicit_norms_requested = True
        self._pending_norms.assign(norms)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        trainable_variables = [
            v.value if isinstance(v, keras.Variable) else v for v in trainable_variables
        ]
        indices = [self._get_variable_index(v) for v in trainable_variables]
        replica_context = tf.distribute.get_replica_context()
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        use_replicas = self.replica_norms and num_replicas > 1
        self._warn_if_no_samples(use_replicas)

        samples = self._local_samples(grads, indices, num_replicas, use_replicas)
        if replica_context is not None and num_replicas > 1:
            # One collective call carries the gradients and the packed norms.
            reduced = replica_context.all_reduce(
                tf.distribute.ReduceOp.SUM, list(grads) + [samples]
            )
            grads, samples = reduced[:-1], reduced[-1]
        self._store_complete_norms(samples, grads, indices, use_replicas)

        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_tf_update_step,
            self._distribution_strategy,
            list(zip(grads, trainable_variables)),
            learning_rate,
        )

    def _warn_if_no_samples(self, use_replicas: bool) -> None:
        if use_replicas or self.gradient_accumulation_steps:
            return
        if self._explicit_norms_requested or self._warned_no_samples:
            return
        self._warned_no_samples = True
        logger.warning(
            "CLARS has no gradient samples for complete norms (one replica, "
            "no gradient accumulation, no set_complete_norms call), so it "
            "divides by the norm of the batch gradient: a LARS with a clipped "
            "trust ratio. Train on two or more replicas, set "
            "gradient_accumulation_steps >= 2, or hand in per-example norms "
            "with set_complete_norms to get complete norms."
        )

    def _local_samples(self, grads, indices, num_replicas, use_replicas):
        """Return this replica's packed [norm sums, sample counts] vector.

        The first half contains, per variable, the sample norm this call
        adds, and the second half how many samples (0 or 1) it adds.
        """
        count = len(self._trainable_variables)
        pending = tf.convert_to_tensor(self._pending_norms)
        # Consumed: the next call uses its own gradients unless new norms
        # arrive.
        self._pending_norms.assign(tf.fill([count], _NO_SAMPLE))

        if use_replicas:
            # Keras divides each replica's loss by the replica count, so a
            # local gradient is the local mean gradient over num_replicas.
            local_norms = [tf.constant(0.0)] * count
            local_counts = [tf.constant(0.0)] * count
            for index, gradient in zip(indices, grads):
                local_norms[index] = l2_norm(gradient) * float(num_replicas)
                local_counts[index] = tf.constant(1.0)
            local_norms = tf.stack(local_norms)
            local_counts = tf.stack(local_counts)
        else:
            local_norms = tf.zeros([count])
            local_counts = tf.zeros([count])

        has_explicit = pending >= 0.0
        norms = tf.where(has_explicit, pending, local_norms)
        counts = tf.where(has_explicit, 1.0, local_counts)
        return tf.concat([norms, counts], axis=0)

    def _store_complete_norms(self, samples, grads, indices, use_replicas):
        """Turn the reduced samples into this update's complete norms."""
        count = len(self._trainable_variables)
        norm_sums, sample_counts = samples[:count], samples[count:]
        steps = self.gradient_accumulation_steps

        if steps and not use_replicas:
            # Micro-batches are the samples: the norm of each call's reduced
            # gradient fills every variable that has no explicit norm.
            reduced_norms = [tf.constant(0.0)] * count
            for index, gradient in zip(indices, grads):
                reduced_norms[index] = l2_norm(gradient)
            missing = sample_counts <= 0.0
            norm_sums = tf.where(missing, tf.stack(reduced_norms), norm_sums)
            sample_counts = tf.where(missing, 1.0, sample_counts)

        if steps:
            norm_sums += tf.convert_to_tensor(self._sample_norm_sums)
            sample_counts += tf.convert_to_tensor(self._sample_counts)
            is_update_step = tf.equal((self._iterations + 1) % steps, 0)
            self._sample_norm_sums.assign(tf.where(is_update_step, 0.0, norm_sums))
            self._sample_counts.assign(tf.where(is_update_step, 0.0, sample_counts))

        complete_norms = tf.where(
            sample_counts > 0.0,
            norm_sums / tf.maximum(sample_counts, 1.0),
            _NO_SAMPLE,
        )
        self._complete_norms.assign(complete_norms)

    def _denominator_norm(self, index, direction_norm):
        complete_norm = tf.convert_to_tensor(self._complete_norms)[index]
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if (self.replica_norms and num_replicas > 1) or self.gradient_accumulation_steps:
            # Every update has samples, so the fallback is never needed.
            return complete_norm
        return tf.where(complete_norm >= 0.0, complete_norm, direction_norm)

    def get_config(self):
        config = super().get_config()
        config["replica_norms"] = self.replica_norms
        return config

"""The learning-rate schedule and the optimizer of a run, built from its config."""

import keras

from clars_tf import schedules
from clars_tf.mixed_precision import LossScaleOptimizer
from clars_tf.optimizers import CLARS, LARS
from clars_tf.training.config import ConfigError, TrainConfig

# Complete-norm sources that use each replica's local gradient norm.
_REPLICA_NORM_SOURCES = ("auto", "replica", "per_example")


def peak_learning_rate(config: TrainConfig) -> float:
    """Apply the linear scaling rule to the base learning rate.

    The effective batch of one update is the global batch times the
    accumulation steps.
    """
    effective_batch = config.global_batch_size * config.gradient_accumulation_steps
    return schedules.scaled_learning_rate(
        config.base_learning_rate, effective_batch, config.reference_batch_size
    )


def build_schedule(config: TrainConfig, steps_per_epoch: int, total_steps: int):
    """Return the learning-rate schedule, with steps counted in global batches."""
    peak = peak_learning_rate(config)
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if warmup_steps >= total_steps > 0 and config.warmup_epochs > 0:
        raise ConfigError(
            f"--warmup_epochs={config.warmup_epochs} ({warmup_steps} steps) covers the whole "
            f"run of {total_steps} steps; shorten the warmup or train longer."
        )
    if config.lr_schedule == "poly":
        return schedules.WarmupPolynomialDecay(
            peak,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            end_learning_rate=min(config.end_learning_rate, peak),
            power=config.poly_power,
        )
    if config.lr_schedule == "cosine":
        return schedules.WarmupCosineDecay(
            peak,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            end_learning_rate=min(config.end_learning_rate, peak),
        )
    return schedules.WarmupStepDecay.from_epochs(
        peak,
        steps_per_epoch=steps_per_epoch,
        boundary_epochs=tuple(config.step_boundaries),
        factor=config.step_factor,
        warmup_epochs=config.warmup_epochs,
    )


def build_optimizer(config: TrainConfig, learning_rate) -> keras.optimizers.Optimizer:
    """Return the optimizer of `--optimizer`, wrapped for loss scaling under float16."""
    accumulation = config.gradient_accumulation_steps if config.gradient_accumulation_steps > 1 else None
    trust_kwargs = dict(
        learning_rate=learning_rate,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        epsilon=config.epsilon,
        exclude_from_weight_decay=config.exclude_from_weight_decay,
        exclude_from_layer_adaptation=config.exclude_from_layer_adaptation,
        gradient_accumulation_steps=accumulation,
    )
    if config.classic_momentum != "auto":
        trust_kwargs["classic_momentum"] = config.classic_momentum == "true"
    if config.trust_coefficient is not None:
        trust_kwargs["trust_coefficient"] = config.trust_coefficient
    max_trust_ratio = config.max_trust_ratio_value()
    if max_trust_ratio != "default":
        trust_kwargs["max_trust_ratio"] = max_trust_ratio

    if config.optimizer == "clars":
        optimizer = CLARS(
            replica_norms=config.complete_norm_source in _REPLICA_NORM_SOURCES, **trust_kwargs
        )
    elif config.optimizer == "lars":
        optimizer = LARS(**trust_kwargs)
    elif config.optimizer == "sgd":
        # Momentum SGD with coupled L2, as PyTorch's SGD and the CLARS
        # reference code: the shared update rule with every ratio at 1.
        trust_kwargs.update(exclude_from_layer_adaptation=[".*"], classic_momentum=False)
        optimizer = LARS(name="sgd", **trust_kwargs)
    else:
        # Keras' LAMB applies decoupled weight decay, as the LAMB paper does.
        optimizer = keras.optimizers.Lamb(
            learning_rate=learning_rate,
            weight_decay=config.weight_decay or None,
            gradient_accumulation_steps=accumulation,
        )
        if config.exclude_from_weight_decay:
            optimizer.exclude_from_weight_decay(var_names=config.exclude_from_weight_decay)

    if config.dtype == "float16":
        optimizer = LossScaleOptimizer(optimizer)
    return optimizer


def inner_optimizer(optimizer):
    """Return the optimizer inside a loss-scale wrapper, or the optimizer itself."""
    return getattr(optimizer, "inner_optimizer", optimizer)

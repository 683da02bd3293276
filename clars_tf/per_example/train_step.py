"""Per-example norms in `model.fit`: a training step installed on the model instance.

`enable_per_example_norms(model)` is a one-line change that keeps the model as
it is (class, layers, variable paths, saving), so it works for Sequential,
functional and subclassed models alike. It sets an instance attribute
`train_step` that Keras' `fit` calls in place of the class's own. The step
mirrors Keras 3.15's TensorFlow `train_step` (loss tracker, loss scaling,
metrics) and adds the norms.
"""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf

from clars_tf.per_example.engine import PerExampleNorms
from clars_tf.per_example.recording import replace_attribute

_ENGINE_ATTRIBUTE = "_per_example_norms_engine"
_RESTORE_ATTRIBUTE = "_per_example_norms_restore"


def complete_norm_optimizer(optimizer: keras.optimizers.Optimizer):
    """Return the optimizer whose `set_complete_norms` takes the norms.

    For a `keras.optimizers.LossScaleOptimizer` that is its inner optimizer.

    Raises:
        TypeError: when that optimizer has no `set_complete_norms` method.
    """
    target = optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        target = optimizer.inner_optimizer
    if not callable(getattr(target, "set_complete_norms", None)):
        raise TypeError(
            f"Per-example norms are handed to the optimizer's set_complete_norms(norms), "
            f"and the optimizer {type(target).__name__} has no such method. Compile the "
            "model with clars_tf.CLARS (also inside keras.optimizers.LossScaleOptimizer), "
            "or call disable_per_example_norms(model)."
        )
    return target


def enable_per_example_norms(
    model: keras.Model, *, method: str = "fast", chunk_size: int = 16
) -> PerExampleNorms:
    """Make `model.fit` hand per-example complete norms to CLARS at every step.

    Call it before or after `compile`, and the next `fit` traces the new step. The
    optimizer is checked now if the model is compiled, else at the first step.

    Args:
        model: a Sequential, functional or subclassed `keras.Model` that does
            not override `train_step`.
        method: `"fast"` or `"reference"`, as in `PerExampleNorms`.
        chunk_size: examples per chunk of the reference path.

    Returns:
        The `PerExampleNorms` engine the step uses.

    Raises:
        TypeError: if `model` is not a `keras.Model`, or its optimizer has no
            `set_complete_norms` method.
        ValueError: if the model's class overrides `train_step`, or on an
            invalid method or chunk size.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"enable_per_example_norms expects a keras.Model and received "
            f"{type(model).__name__}."
        )
    if type(model).train_step is not keras.Model.train_step:
        raise ValueError(
            f"{type(model).__name__} overrides train_step, which per-example norms would "
            "replace. Use clars_tf.per_example.PerExampleNorms inside that train_step "
            "instead (see docs/per_example.md)."
        )
    if getattr(model, "optimizer", None) is not None:
        complete_norm_optimizer(model.optimizer)

    engine = PerExampleNorms(model, method=method, chunk_size=chunk_size)
    disable_per_example_norms(model)

    @tf.autograph.experimental.do_not_convert
    def train_step(data):
        return _train_step(model, engine, data)

    restores = [
        replace_attribute(model, "train_step", train_step),
        replace_attribute(model, _ENGINE_ATTRIBUTE, engine),
    ]
    object.__setattr__(model, _RESTORE_ATTRIBUTE, restores)
    model.train_function = None
    return engine


def disable_per_example_norms(model: keras.Model) -> None:
    """Restore Keras' own `train_step` on a model that has per-example norms enabled."""
    restores = model.__dict__.get(_RESTORE_ATTRIBUTE)
    if restores is None:
        return
    for restore in reversed(restores):
        restore()
    object.__delattr__(model, _RESTORE_ATTRIBUTE)
    model.train_function = None


def _train_step(model: keras.Model, engine: PerExampleNorms, data):
    """Run one training step like Keras' `train_step`, handing per-example norms to CLARS."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    optimizer = model.optimizer
    norms_optimizer = complete_norm_optimizer(optimizer)

    with engine.record() as recording:
        y_pred = model(x, training=True) if _call_has_training_arg(model) else model(x)
        loss = model._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        model._loss_tracker.update_state(
            _unscale_loss_for_distribution(loss), sample_weight=_batch_size(x)
        )
        scaled_loss = optimizer.scale_loss(loss)

    trainable_variables = model.trainable_variables
    if trainable_variables:
        _build_optimizer(optimizer, trainable_variables)
        loss_scale = optimizer.scale_loss(tf.constant(1.0))
        grads, norms = recording.gradients_and_norms(
            scaled_loss, trainable_variables, loss_scale=loss_scale
        )
        norms_optimizer.set_complete_norms(norms)
        optimizer.apply_gradients(zip(grads, trainable_variables))
    else:
        warnings.warn("The model does not have any trainable weights.")

    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _build_optimizer(optimizer: keras.optimizers.Optimizer, variables: list) -> None:
    """Build the optimizer as its `apply` would, so that it takes norms before that call.

    Without a distribution strategy Keras 3.15 builds the optimizer only in
    the first `apply_gradients`, while `set_complete_norms` needs it built.
    """
    if optimizer.built:
        return
    with keras.name_scope(optimizer.name, caller=optimizer):
        optimizer.build(variables)
    optimizer.built = True


def _call_has_training_arg(model: keras.Model) -> bool:
    # Keras 3 computes this flag once from the signature of `call`.
    return getattr(model, "_call_has_training_arg", True)


def _batch_size(x) -> tf.Tensor:
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    return tf.shape(first)[0]


def _unscale_loss_for_distribution(loss: tf.Tensor) -> tf.Tensor:
    """Undo Keras' 1 / replicas loss scaling, as its loss tracker does."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        return loss * tf.cast(replicas, loss.dtype)
    return loss

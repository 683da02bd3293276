"""The interface of the per-layer rules and the lookup of the rule for a layer.

Each rule handles one Keras layer class. The fast path gives a rule a recorded
call (inputs, outputs and captured tensors) and the gradient of the loss with
respect to the call's output, and the rule computes per-example quantities
without a Jacobian. For the reference path, the rule rebuilds the call's output
as a function of the layer's variables with the inputs held fixed, and the
engine takes the Jacobian of that.

Every quantity a rule returns is in the units of the output gradient it is
given. The engine multiplies by the factor that turns them into per-example
gradients of the per-example losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from clars_tf.per_example.recording import LayerCall, own_trainable_variables


@dataclasses.dataclass
class PerExampleTerms:
    """Per-example sums for one variable, each of shape (batch,).

    `squared` is `||d_i||^2` for the data gradient `d_i` of example i, and
    `cross` is `<d_i, r>` for the variable's regularizer gradient `r` (None when
    the variable has no regularizer).
    """

    squared: tf.Tensor
    cross: tf.Tensor | None = None


class LayerRule:
    """Per-example gradient formulas for one kind of Keras layer."""

    def matches(self, layer: keras.layers.Layer) -> bool:
        """Return whether this rule computes `layer`'s calls exactly."""
        raise NotImplementedError

    def capture_hooks(self, layer: keras.layers.Layer) -> list[Callable[[], None]]:
        """Install extra capture hooks on `layer` and return their undo callbacks."""
        del layer
        return []

    def gradient_target(self, call: LayerCall) -> tf.Tensor:
        """Return the tensor of `call` whose loss gradient the formulas use."""
        return call.outputs

    def fast_path_obstacle(self, call: LayerCall) -> str | None:
        """Return why the fast formulas cannot handle `call`, or None if they can."""
        del call
        return None

    def fast_terms(
        self,
        call: LayerCall,
        output_grad: tf.Tensor,
        regularizer_grads: dict[int, tf.Tensor],
    ) -> dict[int, PerExampleTerms]:
        """Return the per-example terms of each variable, keyed by `id(variable)`."""
        raise NotImplementedError

    def recompute(self, call: LayerCall, indices: tf.Tensor) -> tf.Tensor:
        """Return the rows `indices` of the call's gradient target, from its fixed inputs.

        The result depends on the layer's variables only, through ops that a
        `tf.GradientTape` records.
        """
        raise NotImplementedError


def variables_of(layer: keras.layers.Layer, *names: str) -> list[tuple[str, object]]:
    """Return `(name, variable)` for the named attributes that are trainable variables."""
    own = {id(v) for v in own_trainable_variables(layer)}
    pairs = []
    for name in names:
        variable = getattr(layer, name, None)
        if variable is not None and id(variable) in own:
            pairs.append((name, variable))
    return pairs


def as_float32(tensor) -> tf.Tensor:
    """Convert a tensor or variable to a float32 tensor."""
    return tf.cast(tf.convert_to_tensor(tensor), tf.float32)


def regularizer_cross(
    regularizer_grads: dict[int, tf.Tensor],
    variable,
    compute: Callable[[tf.Tensor], tf.Tensor],
) -> tf.Tensor | None:
    """Return `compute(r)` for the variable's regularizer gradient r, or None without one."""
    gradient = regularizer_grads.get(id(variable))
    if gradient is None:
        return None
    return compute(gradient)


def is_plain_keras_layer(layer: keras.layers.Layer, keras_class: type) -> bool:
    """Return whether `layer` is a `keras_class` that runs Keras' own `call`.

    Subclasses that override `call`, LoRA layers and quantized layers compute
    their outputs differently and are left to the reference path.
    """
    if not isinstance(layer, keras_class):
        return False
    if type(layer).call is not keras_class.call:
        return False
    if getattr(layer, "lora_enabled", False):
        return False
    return getattr(layer, "quantization_mode", None) is None

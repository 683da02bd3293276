"""Per-example gradient norms of a model's trainable variables inside a training step.

Definition. Let L be the loss the step differentiates and N its divisor, so
that `L = (1/N) * sum_i loss_i` over the N examples of the global batch. For
Keras losses and `tf.nn.compute_average_loss`, N is the per-replica batch times
the number of replicas. The per-example gradient of a variable w is

    g_i = N * sum over the calls of w's layer of (d z_i / d w)^T (d L / d z_i)

with the layer's inputs held fixed, where z_i is example i's rows of the
call's output. It is the gradient of L with respect to a private copy of w
that only example i's forward pass reads, times N. Their mean over the batch is
the batch gradient. For a model in which no layer mixes examples, g_i is
exactly the gradient of loss_i. A BatchNormalization layer in training mode
mixes examples through the batch statistics. Then d L / d z_i contains every
example's loss through those statistics, so g_i is example i's share of the
batch gradient rather than the gradient of loss_i alone.

Weight regularizers (`kernel_regularizer` and the like) are part of each
loss_i in full, as Keras' `compute_loss` adds them to the mean loss, so their
gradient is added to every g_i.
"""

from __future__ import annotations

import dataclasses
import logging

import keras
import tensorflow as tf

from clars_tf.per_example import reference
from clars_tf.per_example.layer_rules import LayerRule, as_float32
from clars_tf.per_example.recording import LayerCall, Recording, own_trainable_variables
from clars_tf.per_example.registry import find_rule

logger = logging.getLogger(__name__)

METHODS = ("fast", "reference")
REDUCTIONS = ("mean", "none")


@dataclasses.dataclass(eq=False)
class _LayerGroup:
    """The recorded calls of one layer and the variables they are responsible for."""

    layer: keras.layers.Layer
    calls: list[LayerCall]
    variables: list
    rule: LayerRule | None
    fallback_reason: str | None = None

    @property
    def uses_fast_path(self) -> bool:
        return self.rule is not None and self.fallback_reason is None


class PerExampleNorms:
    """Compute the per-example gradient norms of a model's trainable variables.

    Usage in a custom training step (see `docs/per_example.md`):

        norms_engine = PerExampleNorms(model)
        with norms_engine.record() as recording:
            logits = model(images, training=True)
            loss = loss_fn(labels, logits)
        grads, norms = recording.gradients_and_norms(loss)

    Args:
        model: the Keras model (or layer) whose calls are recorded.
        method: `"fast"` computes the layers that have a rule (Dense, Conv2D,
            DepthwiseConv2D, Embedding, BatchNormalization, LayerNormalization,
            GroupNormalization) with closed-form formulas and every other
            layer with the reference path, logging their names once.
            `"reference"` uses the chunked Jacobian for every layer.
        chunk_size: number of examples whose Jacobian rows the reference path
            holds at once. Peak extra memory grows linearly with it.

    Raises:
        ValueError: on an unknown method or a chunk size below 1.
    """

    def __init__(self, model: keras.layers.Layer, *, method: str = "fast", chunk_size: int = 16):
        if method not in METHODS:
            raise ValueError(
                f"Invalid method {method!r} for per-example norms. Use one of {METHODS}."
            )
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(
                f"Invalid chunk_size={chunk_size!r}. Pass an integer of at least 1."
            )
        self.model = model
        self.method = method
        self.chunk_size = chunk_size
        self._logged_fallbacks: set[str] = set()

    @tf.autograph.experimental.do_not_convert
    def record(self) -> StepRecording:
        """Return a context that records the model's layer calls and a gradient tape."""
        # NOTE: `_flatten_layers` is private Keras 3 API (3.15 here), because
        # Keras has no public recursive list of a model's layers.
        layers = [
            layer
            for layer in self.model._flatten_layers(include_self=True, recursive=True)
            if layer.trainable_variables
        ]
        return StepRecording(self, layers)

    def _capture_hooks(self, layer: keras.layers.Layer) -> list:
        rule = find_rule(layer)
        return rule.capture_hooks(layer) if rule is not None else []

    def _log_fallbacks(self, groups: list[_LayerGroup]) -> None:
        if self.method != "fast":
            return
        descriptions = [
            f"{group.layer.name} ({type(group.layer).__name__}: {group.fallback_reason})"
            for group in groups
            if not group.uses_fast_path
        ]
        new = [d for d in descriptions if d not in self._logged_fallbacks]
        if not new:
            return
        self._logged_fallbacks.update(new)
        logger.warning(
            "Per-example norms use the reference path (chunked Jacobian, chunk_size=%d) "
            "for these layers: %s",
            self.chunk_size,
            "; ".join(new),
        )


class StepRecording(Recording):
    """The recorded forward pass of one step, which computes gradients and norms after it."""

    def __init__(self, engine: PerExampleNorms, layers: list[keras.layers.Layer]):
        super().__init__(layers, engine._capture_hooks)
        self._engine = engine

    # The graph building below has no Python control flow on tensor values, so
    # AutoGraph must not convert it when a user's tf.function calls it.
    @tf.autograph.experimental.do_not_convert
    def gradients_and_norms(
        self,
        loss: tf.Tensor,
        variables: list | None = None,
        *,
        loss_divisor: int | tf.Tensor | None = None,
        loss_scale: float | tf.Tensor | None = None,
        include_regularization: bool = True,
        reduction: str = "mean",
    ) -> tuple[list, list[tf.Tensor]]:
        """Return the gradients of `loss` and the per-example gradient norms.

        Call this after the `with` block that recorded the forward pass.

        Args:
            loss: the scalar the step differentiates, as it was computed inside
                the recording (scaled by `loss_scale` if the step scales it).
            variables: the variables to differentiate, by default the model's
                trainable variables. Norms come in the same order.
            loss_divisor: N in `loss = loss_scale * (1/N) * sum_i loss_i`. By
                default this replica's batch size times the number of replicas
                in sync, which is what Keras losses and
                `tf.nn.compute_average_loss` divide by.
            loss_scale: the factor the loss was multiplied by (the dynamic scale
                of `keras.optimizers.LossScaleOptimizer`). The default is 1.
            include_regularization: whether every loss_i contains the model's
                weight-regularization losses, as Keras' `compute_loss` makes it.
            reduction: `"mean"` returns one scalar per variable, the mean over
                this replica's examples of `||g_i||`, and `"none"` returns the
                vector of `||g_i||` over the examples.

        Returns:
            `(gradients, norms)`: the gradients as `tape.gradient` returns them
            (scaled by `loss_scale`), and one float32 norm tensor per variable.

        Raises:
            RuntimeError: when called inside the `with` block.
            ValueError: on an unknown reduction, or a variable whose gradient
                reaches the loss outside every recorded layer call.
        """
        if self.active:
            raise RuntimeError(
                "gradients_and_norms was called inside the `with` block of the recording. "
                "Call it after the block, once the loss is computed."
            )
        if reduction not in REDUCTIONS:
            raise ValueError(f"Invalid reduction {reduction!r}. Use one of {REDUCTIONS}.")
        if variables is None:
            variables = self._engine.model.trainable_variables
        variables = list(variables)

        groups = self._plan(variables)
        self._engine._log_fallbacks(groups)
        targets = [_gradient_targets(group) for group in groups]
        flat_targets = [t for group_targets in targets for t in group_targets]
        all_grads = self.tape.gradient(loss, variables + flat_targets)
        grads = all_grads[: len(variables)]
        target_grads = _split(all_grads[len(variables) :], [len(t) for t in targets])

        self._check_attribution(variables, grads, groups)
        regularizer_grads = _regularizer_gradients(variables) if include_regularization else {}

        batch_size = self._batch_size(groups)
        # Variables that no recorded call uses keep these values.
        squared = {id(v): _regularizer_only(v, regularizer_grads, batch_size) for v in variables}
        after = []
        for group, group_targets, group_grads in zip(groups, targets, target_grads):
            _check_batch_size(group, group_targets[0], batch_size)
            factor = _factor(batch_size, loss_divisor, loss_scale)
            if group.uses_fast_path and self._engine.method == "fast":
                group_squared = _fast_squared_norms(
                    group, group_targets[0], group_grads[0], factor, regularizer_grads
                )
            else:
                group_squared = self._reference_squared_norms(
                    group, group_targets, group_grads, batch_size, factor, regularizer_grads, after
                )
                after = list(group_squared.values())
            squared.update(group_squared)

        norms = []
        for variable in variables:
            per_example = tf.sqrt(tf.maximum(squared[id(variable)], 0.0))
            norms.append(tf.reduce_mean(per_example) if reduction == "mean" else per_example)
        return grads, norms

    def _plan(self, variables: list) -> list[_LayerGroup]:
        """Group the recorded calls by layer and pick the path of each group."""
        requested = {id(v) for v in variables}
        # Calls that claim variables of nested layers called inside control flow.
        claims: dict[int, list[LayerCall]] = {}
        for call in self.calls:
            for variable in call.nested_variables:
                claims.setdefault(id(variable), []).append(call)

        groups: dict[int, _LayerGroup] = {}
        for call in self.calls:
            own = [
                v
                for v in own_trainable_variables(call.layer)
                if not _claimed_by_enclosing_call(call, v, claims)
            ]
            responsible = [v for v in own + call.nested_variables if id(v) in requested]
            if not responsible:
                continue
            group = groups.get(id(call.layer))
            if group is None:
                group = _LayerGroup(call.layer, [], [], find_rule(call.layer))
                groups[id(call.layer)] = group
            group.calls.append(call)
            known = {id(v) for v in group.variables}
            group.variables.extend(v for v in responsible if id(v) not in known)

        for group in groups.values():
            group.fallback_reason = _fallback_reason(group)
        _check_disjoint(list(groups.values()))
        return list(groups.values())

    def _batch_size(self, groups: list[_LayerGroup]) -> tf.Tensor:
        """Return this replica's batch size, the leading size of the first recorded output."""
        if groups:
            return tf.shape(_gradient_targets(groups[0])[0])[0]
        for call in self.calls:
            if tf.is_tensor(call.inputs):
                return tf.shape(call.inputs)[0]
        raise ValueError(
            "The recording contains no layer call with trainable variables. Run the "
            "model's forward pass inside the `with` block of the recording."
        )

    def _check_attribution(self, variables, grads, groups) -> None:
        # NOTE: a variable that its own layer reads and another layer reads too
        # (tied weights) passes this check, and its norms miss the other use.
        covered = {id(v) for group in groups for v in group.variables}
        missing = [
            v.path
            for v, g in zip(variables, grads)
            if g is not None and id(v) not in covered
        ]
        if missing:
            raise ValueError(
                "Per-example norms need every variable to be read inside the call of the "
                f"layer that owns it, but these variables reach the loss another way: "
                f"{missing}. Read them through their layer, or leave them out of "
                "`variables`."
            )

    def _reference_squared_norms(
        self, group, targets, target_grads, batch_size, factor, regularizer_grads, after
    ) -> dict[int, tf.Tensor]:
        output_grads = [
            tf.zeros_like(t) if g is None else g for t, g in zip(targets, target_grads)
        ]
        if group.rule is not None and not _has_nested(group):
            rows = _recomputed_jacobian_rows(group, output_grads)
        else:
            _check_no_feedback(self.tape, group)
            rows = _recorded_jacobian_rows(self.tape, group, targets, output_grads)
        sums = reference.chunked_squared_norms(
            group.variables,
            rows,
            batch_size,
            self._engine.chunk_size,
            factor,
            regularizer_grads,
            after + output_grads,
        )
        return {id(v): s for v, s in zip(group.variables, sums)}


def _claimed_by_enclosing_call(call: LayerCall, variable, claims) -> bool:
    """Return whether a call enclosing `call` already covers `variable`.

    Keras RNN layers, for example, run their cell once in the outer graph to
    get the output structure and then inside a `tf.while_loop`. The Jacobian
    of the RNN layer's call covers both.
    """
    claimers = claims.get(id(variable), [])
    if not claimers:
        return False
    if any(call.runs_inside(claimer) for claimer in claimers):
        return True
    raise NotImplementedError(
        f"Variable {variable.path} is used by {call.layer.name} and inside control flow "
        f"of {claimers[0].layer.name}. Per-example norms cannot combine these uses, so "
        "read the variable through one layer."
    )


def _fallback_reason(group: _LayerGroup) -> str | None:
    if group.rule is None:
        return "no fast-path rule for this layer class or configuration"
    if _has_nested(group):
        return "nested layers run inside control flow"
    if len(group.calls) > 1:
        return f"called {len(group.calls)} times in one step"
    return group.rule.fast_path_obstacle(group.calls[0])


def _has_nested(group: _LayerGroup) -> bool:
    return any(call.nested_variables for call in group.calls)


def _check_disjoint(groups: list[_LayerGroup]) -> None:
    owners: dict[int, str] = {}
    for group in groups:
        for variable in group.variables:
            previous = owners.setdefault(id(variable), group.layer.name)
            if previous != group.layer.name:
                raise NotImplementedError(
                    f"Variable {variable.path} is used by calls of layers {previous} and "
                    f"{group.layer.name}, some inside control flow. Per-example norms "
                    "cannot combine them, so read the variable through one layer."
                )


def _check_no_feedback(tape: tf.GradientTape, group: _LayerGroup) -> None:
    """Raise if a later call of the layer takes an input computed from its own variables.

    The recorded-graph Jacobian would then count those variables twice.
    """
    if len(group.calls) < 2:
        return
    for call in group.calls[1:]:
        inputs = [
            t
            for t in tf.nest.flatten((call.args, call.kwargs))
            if tf.is_tensor(t) and t.dtype.is_floating
        ]
        if not inputs:
            continue
        grads = tape.gradient([tf.reduce_sum(t) for t in inputs], group.variables)
        if any(g is not None for g in grads):
            raise NotImplementedError(
                f"Layer {group.layer.name} ({type(group.layer).__name__}) is called "
                f"{len(group.calls)} times and a later call's input is computed from its "
                "own variables. Per-example norms support this only for layers with a "
                "fast-path rule, so use a separate layer for each call."
            )


def _gradient_targets(group: _LayerGroup) -> list[tf.Tensor]:
    if group.rule is not None and not _has_nested(group):
        return [group.rule.gradient_target(call) for call in group.calls]
    targets = []
    for call in group.calls:
        flat = [t for t in tf.nest.flatten(call.outputs) if tf.is_tensor(t) and t.dtype.is_floating]
        if not flat:
            raise ValueError(
                f"Layer {group.layer.name} returned no floating-point tensor, so its "
                "per-example gradients cannot be taken."
            )
        targets.extend(flat)
    return targets


def _split(values: list, sizes: list[int]) -> list[list]:
    parts, start = [], 0
    for size in sizes:
        parts.append(values[start : start + size])
        start += size
    return parts


def _factor(batch_size, loss_divisor, loss_scale) -> tf.Tensor:
    """Return N / loss_scale, which turns output gradients of the loss into those of loss_i."""
    if loss_divisor is None:
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        divisor = tf.cast(batch_size * replicas, tf.float32)
    else:
        divisor = tf.cast(loss_divisor, tf.float32)
    if loss_scale is None:
        return divisor
    return divisor / tf.cast(loss_scale, tf.float32)


def _regularizer_gradients(variables: list) -> dict[int, tf.Tensor]:
    """Return the gradient of each variable's own regularizer, keyed by `id(variable)`."""
    result = {}
    for variable in variables:
        regularizer = getattr(variable, "regularizer", None)
        if regularizer is None:
            continue
        # The tape watches the variable when the regularizer reads it, as for
        # any trainable variable.
        with tf.GradientTape() as tape:
            penalty = regularizer(variable)
        gradient = tape.gradient(penalty, variable)
        if gradient is not None:
            result[id(variable)] = as_float32(gradient)
    return result


def _regularizer_only(variable, regularizer_grads, batch_size) -> tf.Tensor:
    """Return the squared norms for a variable no recorded call uses: ||r||^2 or 0."""
    gradient = regularizer_grads.get(id(variable))
    if gradient is None:
        return tf.zeros([batch_size])
    return tf.fill([batch_size], tf.reduce_sum(tf.square(gradient)))


def _check_batch_size(group: _LayerGroup, target: tf.Tensor, batch_size: tf.Tensor) -> None:
    """Raise unless the layer's output has the batch as its leading axis."""
    message = (
        f"Layer {group.layer.name} ({type(group.layer).__name__}) returned an output whose "
        "leading axis is not the batch. Per-example norms need one output row per example."
    )
    tf.debugging.assert_equal(tf.shape(target)[0], batch_size, message=message)


def _fast_squared_norms(group, target, target_grad, factor, regularizer_grads) -> dict:
    if target_grad is None:
        target_grad = tf.zeros_like(target)
    # Work that needs only the forward pass (padding and slicing the input,
    # normalizing it) would otherwise run right after the forward pass and keep
    # its results alive until the backward pass reaches this layer.
    with tf.control_dependencies([target_grad]):
        terms = group.rule.fast_terms(group.calls[0], target_grad, regularizer_grads)
    batch_size = tf.shape(target)[0]

    result = {}
    for variable in group.variables:
        term = terms.get(id(variable))
        regularizer_grad = regularizer_grads.get(id(variable))
        squared = tf.zeros([batch_size]) if term is None else factor * factor * term.squared
        if regularizer_grad is not None:
            if term is not None and term.cross is not None:
                squared = squared + 2.0 * factor * term.cross
            squared = squared + tf.reduce_sum(tf.square(regularizer_grad))
        result[id(variable)] = squared
    return result


def _recomputed_jacobian_rows(group: _LayerGroup, output_grads: list[tf.Tensor]):
    def rows(indices):
        with tf.GradientTape() as tape:
            outputs = [group.rule.recompute(call, indices) for call in group.calls]
            surrogate = reference.surrogate_rows(
                outputs, [tf.gather(g, indices) for g in output_grads]
            )
        return tape.jacobian(surrogate, group.variables, experimental_use_pfor=True)

    return rows


def _recorded_jacobian_rows(tape, group, targets, output_grads):
    def rows(indices):
        with tape:
            surrogate = reference.surrogate_rows(
                [tf.gather(t, indices) for t in targets],
                [tf.gather(g, indices) for g in output_grads],
            )
        return tape.jacobian(surrogate, group.variables, experimental_use_pfor=True)

    return rows

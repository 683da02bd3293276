"""Record the layer calls of one forward pass for per-example gradient norms.

A `Recording` wraps the `call` method of every layer that has trainable
variables, for as long as at least one recording is open, and stores each call's
inputs and outputs as the forward pass is traced. A layer rule may install
further capture hooks (for example on a layer's activation, to keep the
pre-activation output). The wrappers only act at trace time, inside the thread
whose recording is open, so a traced step pays nothing for them at run time, and
the replica threads of `tf.distribute.MirroredStrategy` each record their own
calls.

Calls that run in another graph than the one the recording was opened in (the
body of a `tf.while_loop` or `tf.cond`, such as the cell of a Keras RNN layer)
cannot be used outside that graph. Their variables are attributed to the
innermost enclosing call that was recorded.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

_thread_state = threading.local()
_install_lock = threading.Lock()
# Per layer id: [number of open recordings that use the hooks, undo callbacks].
_installed_hooks: dict[int, list] = {}


@dataclasses.dataclass(eq=False)
class LayerCall:
    """One traced call of a layer: its arguments, outputs and captured tensors."""

    layer: keras.layers.Layer
    args: tuple
    kwargs: dict
    outputs: Any = None
    # Input of the layer's activation function (Dense and convolutions).
    preactivation: tf.Tensor | None = None
    # Batch mean and variance that BatchNormalization normalized with.
    moments: tuple[tf.Tensor, tf.Tensor] | None = None
    # Trainable variables of nested layers whose calls ran inside control flow.
    nested_variables: list = dataclasses.field(default_factory=list)
    # The innermost recorded call that was running when this one started.
    parent: LayerCall | None = None

    def runs_inside(self, other: LayerCall) -> bool:
        """Return whether this call ran during `other` (directly or deeper)."""
        parent = self.parent
        while parent is not None:
            if parent is other:
                return True
            parent = parent.parent
        return False

    @property
    def inputs(self) -> Any:
        """Return the first positional argument, the layer's main input."""
        if self.args:
            return self.args[0]
        return self.kwargs.get("inputs")


def own_trainable_variables(layer: keras.layers.Layer) -> list:
    """Return the trainable variables that `layer` creates itself, not its sublayers."""
    if not layer.trainable:
        return []
    # NOTE: `_trainable_variables` is a private Keras 3 attribute (3.15 here),
    # because no public list contains a layer's own variables without its sublayers.
    return [v for v in getattr(layer, "_trainable_variables", []) if v.trainable]


def current_recording() -> Recording | None:
    """Return the recording open in this thread, or None."""
    return getattr(_thread_state, "recording", None)


class Recording:
    """Context that records the calls of the given layers in this thread.

    Use as `with recording: ...` around the forward pass. After the block,
    `calls` lists the recorded `LayerCall`s in call order and `tape` is a
    persistent `tf.GradientTape` that recorded the forward pass.
    """

    def __init__(
        self,
        layers: list[keras.layers.Layer],
        capture_hooks: Callable[[keras.layers.Layer], list[Callable[[], None]]],
    ):
        self._layers = layers
        self._capture_hooks = capture_hooks
        self._stack: list[LayerCall | None] = []
        self._graph = None
        self.calls: list[LayerCall] = []
        self.unattributed_variables: list = []
        self.tape: tf.GradientTape | None = None
        self.active = False

    @tf.autograph.experimental.do_not_convert
    def __enter__(self) -> Recording:
        if current_recording() is not None:
            raise RuntimeError(
                "A per-example norm recording is already open in this thread. "
                "Close it before opening another."
            )
        if self.tape is not None:
            raise RuntimeError("A Recording can be entered only once. Create a new one per step.")
        _install(self._layers, self._capture_hooks)
        _thread_state.recording = self
        self._graph = tf.compat.v1.get_default_graph()
        self.tape = tf.GradientTape(persistent=True)
        self.tape.__enter__()
        self.active = True
        return self

    @tf.autograph.experimental.do_not_convert
    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.active = False
        try:
            self.tape.__exit__(exc_type, exc_value, traceback)
        finally:
            _thread_state.recording = None
            _uninstall(self._layers)

    def innermost_call(self, layer: keras.layers.Layer) -> LayerCall | None:
        """Return the open call of `layer` at the top of the call stack, or None."""
        if self._stack and self._stack[-1] is not None and self._stack[-1].layer is layer:
            return self._stack[-1]
        return None

    def record_call(self, layer, original_call, args, kwargs):
        """Run `original_call` and record it when it runs in the recording's graph."""
        if tf.compat.v1.get_default_graph() is not self._graph:
            self._attribute_to_enclosing_call(layer)
            self._stack.append(None)
            try:
                return original_call(*args, **kwargs)
            finally:
                self._stack.pop()

        call = LayerCall(layer=layer, args=args, kwargs=kwargs, parent=self._innermost_recorded())
        self._stack.append(call)
        try:
            call.outputs = original_call(*args, **kwargs)
        finally:
            self._stack.pop()
        self.calls.append(call)
        return call.outputs

    def _innermost_recorded(self) -> LayerCall | None:
        return next((c for c in reversed(self._stack) if c is not None), None)

    def _attribute_to_enclosing_call(self, layer) -> None:
        variables = own_trainable_variables(layer)
        if not variables:
            return
        enclosing = self._innermost_recorded()
        target = enclosing.nested_variables if enclosing is not None else self.unattributed_variables
        known = {id(v) for v in target}
        target.extend(v for v in variables if id(v) not in known)


def _recording_call(layer, original_call):
    @functools.wraps(original_call)
    @tf.autograph.experimental.do_not_convert
    def call(*args, **kwargs):
        recording = current_recording()
        if recording is None:
            return original_call(*args, **kwargs)
        return recording.record_call(layer, original_call, args, kwargs)

    return call


def replace_attribute(obj, name: str, value) -> Callable[[], None]:
    """Set `obj.name` without Keras attribute tracking and return an undo callback."""
    had_own = name in obj.__dict__
    previous = obj.__dict__.get(name)
    object.__setattr__(obj, name, value)

    def restore():
        if had_own:
            object.__setattr__(obj, name, previous)
        else:
            object.__delattr__(obj, name)

    return restore


def _install(layers, capture_hooks) -> None:
    with _install_lock:
        for layer in layers:
            entry = _installed_hooks.get(id(layer))
            if entry is not None:
                entry[0] += 1
                continue
            restores = [replace_attribute(layer, "call", _recording_call(layer, layer.call))]
            restores.extend(capture_hooks(layer))
            _installed_hooks[id(layer)] = [1, restores]


def _uninstall(layers) -> None:
    with _install_lock:
        for layer in layers:
            entry = _installed_hooks.get(id(layer))
            if entry is None:
                continue
            entry[0] -= 1
            if entry[0] == 0:
                for restore in reversed(entry[1]):
                    restore()
                del _installed_hooks[id(layer)]

"""CLARS and LARS under a real MirroredStrategy over logical CPU devices."""

import collections
import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import clars_tf
from conftest import REPO_ROOT, mirrored_strategy
from distributed_helpers import (
    GLOBAL_BATCH,
    dense_model,
    make_data,
    mean_gradient,
    mean_shard_norms,
    per_example_losses,
    split,
)


mirrored = mirrored_strategy


def distribute_shards(strategy, *arrays):
    """Give replica r the r-th contiguous shard of each array."""
    replicas = strategy.num_replicas_in_sync
    shards = [np.array_split(a, replicas) for a in arrays]

    def value_fn(context):
        return tuple(tf.constant(s[context.replica_id_in_sync_group]) for s in shards)

    return strategy.experimental_distribute_values_from_function(value_fn)


def run_custom_loop(strategy, make_optimizer, batches, norms_per_step=None, seed=0):
    """Train with strategy.run + optimizer.apply; return the model and optimizer.

    `norms_per_step[s]` is a (replicas, variables) array of complete norms
    handed to the optimizer at step s, row r by replica r.
    """
    with strategy.scope():
        model = dense_model(seed)
        optimizer = make_optimizer()
        optimizer.build(model.trainable_variables)

    def replica_step(x, y, norms):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(per_example_losses(model, x, y))
        grads = tape.gradient(loss, model.trainable_variables)
        if norms is not None:
            optimizer.set_complete_norms(norms[0])  # this replica's row
        optimizer.apply(grads, model.trainable_variables)

    @tf.function
    def train_step(x, y, norms):
        strategy.run(replica_step, args=(x, y, norms))

    for step, (x, y) in enumerate(batches):
        if norms_per_step is None:
            x, y = distribute_shards(strategy, x, y)
            train_step(x, y, None)
        else:
            x, y, norms = distribute_shards(strategy, x, y, norms_per_step[step])
            train_step(x, y, norms)
    return model, optimizer


def run_single_device(make_optimizer, batches, norms_per_step=None, seed=0):
    model = dense_model(seed)
    optimizer = make_optimizer()
    optimizer.build(model.trainable_variables)
    for step, (x, y) in enumerate(batches):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_losses(model, x, y))
        grads = tape.gradient(loss, model.trainable_variables)
        if norms_per_step is not None:
            # The optimizer averages the replicas' norms; one device gets the mean.
            optimizer.set_complete_norms(np.mean(norms_per_step[step], axis=0).astype("float32"))
        optimizer.apply(grads, model.trainable_variables)
    return model, optimizer


def make_batches(steps, seed=0):
    x, y = make_data(steps * GLOBAL_BATCH, seed)
    return [(x[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH], y[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH]) for s in range(steps)]


def assert_same_weights(actual_model, expected_model, rtol=1e-5):
    for actual, expected in zip(actual_model.trainable_variables, expected_model.trainable_variables):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=rtol, atol=1e-7, err_msg=actual.path)


@pytest.mark.parametrize("replicas", [2, 4])
def test_lars_mirrored_matches_single_device(replicas):
    batches = make_batches(3)

    def make_optimizer():
        return clars_tf.LARS(learning_rate=2.0, weight_decay=1e-3)

    distributed, _ = run_custom_loop(mirrored(replicas), make_optimizer, batches)
    single, _ = run_single_device(make_optimizer, batches)
    assert_same_weights(distributed, single)


@pytest.mark.parametrize("replicas", [2, 4])
def test_clars_explicit_norms_mirrored_matches_single_device(replicas):
    batches = make_batches(3)
    rng = np.random.default_rng(5)
    # Different norms on each replica, so averaging them is part of the test.
    norms = [rng.uniform(0.1, 2.0, (replicas, 4)).astype("float32") for _ in batches]

    def make_optimizer():
        return clars_tf.CLARS(learning_rate=1.0, weight_decay=1e-3, max_trust_ratio=None)

    distributed, distributed_opt = run_custom_loop(mirrored(replicas), make_optimizer, batches, norms)
    single, _ = run_single_device(make_optimizer, batches, norms)
    assert_same_weights(distributed, single)
    statistics = distributed_opt.layer_statistics()
    last_mean = np.mean(norms[-1], axis=0)
    for index, variable in enumerate(distributed.trainable_variables):
        actual = float(statistics[variable.path]["complete_norm"])
        assert actual == pytest.approx(last_mean[index], rel=1e-6), variable.path


def test_lars_fit_mirrored_matches_single_device():
    x, y = make_data(3 * GLOBAL_BATCH)

    def fit(strategy):
        with strategy.scope():
            model = dense_model()
            model.compile(
                optimizer=clars_tf.LARS(learning_rate=2.0, weight_decay=1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        return model

    assert_same_weights(fit(mirrored(2)), fit(tf.distribute.get_strategy()))


def fit_clars(strategy, x, y, **optimizer_kwargs):
    with strategy.scope():
        model = dense_model()
        optimizer = clars_tf.CLARS(learning_rate=1.0, **optimizer_kwargs)
        model.compile(
            optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return model, optimizer


def assert_complete_norms(optimizer, model, expected):
    statistics = optimizer.layer_statistics()
    for index, variable in enumerate(model.trainable_variables):
        actual = float(statistics[variable.path]["complete_norm"])
        assert actual == pytest.approx(expected[index], rel=1e-5), variable.path


@pytest.mark.parametrize("replicas", [2, 4])
def test_replica_complete_norm_in_fit(replicas):
    x, y = make_data(GLOBAL_BATCH)
    model, optimizer = fit_clars(mirrored(replicas), x, y)
    # One tape per shard on the initial weights: the mean norm of the
    # replicas' mean gradients, with Keras' 1/replicas loss factor undone.
    expected = mean_shard_norms(dense_model(), split(x, y, replicas))
    assert_complete_norms(optimizer, model, expected)


def test_replica_complete_norm_in_custom_loop():
    batches = make_batches(1)
    model, optimizer = run_custom_loop(
        mirrored(2), lambda: clars_tf.CLARS(learning_rate=1.0), batches
    )
    expected = mean_shard_norms(dense_model(), split(*batches[0], 2))
    assert_complete_norms(optimizer, model, expected)


def test_replica_and_accumulation_complete_norm():
    """k=2 on 2 replicas: the mean over 4 micro-batch norms."""
    x, y = make_data(2 * GLOBAL_BATCH)
    model, optimizer = fit_clars(mirrored(2), x, y, gradient_accumulation_steps=2)
    assert int(optimizer.iterations.numpy()) == 1
    # Accumulation leaves the weights alone between micro-batches, so all
    # four samples are taken at the initial weights.
    expected = mean_shard_norms(dense_model(), split(x, y, 4))
    assert_complete_norms(optimizer, model, expected)


def test_accumulation_without_replica_norms():
    """With replica_norms=False the samples are the global micro-batches."""
    x, y = make_data(2 * GLOBAL_BATCH)
    model, optimizer = fit_clars(
        mirrored(2), x, y, gradient_accumulation_steps=2, replica_norms=False
    )
    expected = mean_shard_norms(dense_model(), split(x, y, 2))
    assert_complete_norms(optimizer, model, expected)


def count_collectives(strategy, make_optimizer, hidden):
    """Count the collective ops in one traced training step."""
    with strategy.scope():
        model = dense_model(hidden=hidden)
        optimizer = make_optimizer()
        optimizer.build(model.trainable_variables)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(per_example_losses(model, x, y))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

    @tf.function
    def train_step(x, y):
        strategy.run(replica_step, args=(x, y))

    x, y = distribute_shards(strategy, *make_data(GLOBAL_BATCH))
    graph = train_step.get_concrete_function(x, y).graph
    counts = collections.Counter()

    def visit(function_graph):
        for op in function_graph.get_operations():
            counts[op.type] += 1
        for function in function_graph._functions.values():
            visit(function.graph)

    visit(graph)
    return sum(n for op_type, n in counts.items() if "Collective" in op_type or "AllReduce" in op_type)


def test_complete_norms_add_no_collective_per_variable():
    strategy = mirrored(2)
    extra = {}
    for hidden in [(16,), (16, 16, 16, 16, 16)]:
        sgd = count_collectives(strategy, lambda: keras.optimizers.SGD(0.1, momentum=0.9), hidden)
        clars = count_collectives(strategy, lambda: clars_tf.CLARS(), hidden)
        assert sgd > 0
        extra[len(hidden)] = clars - sgd
    # The norms ride in the gradient all-reduce, or at most one pack per
    # replica, whatever the number of variables.
    assert extra[1] == extra[5]
    assert extra[1] <= strategy.num_replicas_in_sync


def test_update_step_sees_whole_variables():
    strategy = mirrored(2)
    shapes = []
    with strategy.scope():
        model = dense_model()
        optimizer = clars_tf.CLARS()
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    update_step = optimizer.update_step

    def recording_update_step(gradient, variable, learning_rate):
        shapes.append(tuple(variable.shape))
        return update_step(gradient, variable, learning_rate)

    optimizer.update_step = recording_update_step
    model.fit(*make_data(GLOBAL_BATCH), batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    expected = {tuple(v.shape) for v in model.trainable_variables}
    assert set(shapes) == expected


def test_xla_replica_step_matches_non_xla():
    strategy = mirrored(2)
    x, y = make_data(6 * GLOBAL_BATCH)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)

    def train(jit_compile):
        with strategy.scope():
            model = dense_model()
            optimizer = clars_tf.CLARS(learning_rate=1.0, weight_decay=1e-3)
            optimizer.build(model.trainable_variables)
        traces = []

        @tf.function(jit_compile=jit_compile)
        def compute_gradients(x, y):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(per_example_losses(model, x, y))
            return tape.gradient(loss, model.trainable_variables)

        def replica_step(x, y):
            grads = compute_gradients(x, y)
            optimizer.apply(grads, model.trainable_variables)

        @tf.function
        def train_steps(iterator, steps):
            traces.append(1)
            for _ in tf.range(steps):
                strategy.run(replica_step, args=next(iterator))

        iterator = iter(strategy.experimental_distribute_dataset(dataset))
        train_steps(iterator, tf.constant(3))
        train_steps(iterator, tf.constant(3))
        return model, optimizer, traces

    xla_model, xla_optimizer, traces = train(jit_compile=True)
    plain_model, _, _ = train(jit_compile=False)
    assert int(xla_optimizer.iterations.numpy()) == 6
    assert len(traces) == 1
    assert_same_weights(xla_model, plain_model, rtol=1e-4)


def clip_by_norm(gradient, clip):
    norm = np.linalg.norm(gradient)
    return gradient * min(1.0, clip / norm)


def test_clipnorm_clips_each_replica_before_the_sum():
    x, y = make_data(GLOBAL_BATCH)
    clip = 0.05
    strategy = mirrored(2)
    with strategy.scope():
        model = dense_model()
        # No momentum and no layer adaptation: the step is lr * gradient.
        optimizer = clars_tf.LARS(
            learning_rate=1.0, momentum=0.0, clipnorm=clip, exclude_from_layer_adaptation=[".*"]
        )
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    initial = [v.numpy() for v in model.trainable_variables]
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)

    # Each replica's contribution is its mean gradient divided by 2, and
    # Keras clips that contribution before the cross-replica sum.
    reference = dense_model()
    shard_gradients = [mean_gradient(reference, *shard) for shard in split(x, y, 2)]
    for index, variable in enumerate(model.trainable_variables):
        summed = sum(clip_by_norm(g[index] / 2, clip) for g in shard_gradients)
        np.testing.assert_allclose(
            variable.numpy(), initial[index] - summed, rtol=1e-5, atol=1e-7, err_msg=variable.path
        )


def test_clipnorm_complete_norm_uses_clipped_gradients():
    x, y = make_data(GLOBAL_BATCH)
    clip = 0.05
    model, optimizer = fit_clars(mirrored(2), x, y, clipnorm=clip)
    shard_gradients = [mean_gradient(dense_model(), *shard) for shard in split(x, y, 2)]
    expected = [
        np.mean([2 * np.linalg.norm(clip_by_norm(g[index] / 2, clip)) for g in shard_gradients])
        for index in range(len(model.trainable_variables))
    ]
    assert_complete_norms(optimizer, model, expected)


def test_mixed_float16_update_matches_float32():
    x, y = make_data(GLOBAL_BATCH)
    strategy = mirrored(2)

    def one_step(policy, wrap):
        keras.mixed_precision.set_global_policy(policy)
        try:
            with strategy.scope():
                model = dense_model()
                optimizer = clars_tf.CLARS(learning_rate=1.0)
                model.compile(
                    optimizer=wrap(optimizer),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                )
            initial = [v.numpy() for v in model.trainable_variables]
            model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        deltas = [v.numpy() - w for v, w in zip(model.trainable_variables, initial)]
        return deltas, optimizer

    float32_deltas, float32_optimizer = one_step("float32", lambda o: o)
    float16_deltas, float16_optimizer = one_step("mixed_float16", keras.optimizers.LossScaleOptimizer)
    float32_statistics = float32_optimizer.layer_statistics()
    float16_statistics = float16_optimizer.layer_statistics()
    for path, statistics in float32_statistics.items():
        # Norms on unscaled gradients: a scaled norm would be 32768 times larger.
        expected = float(statistics["complete_norm"])
        actual = float(float16_statistics[path]["complete_norm"])
        assert actual == pytest.approx(expected, rel=1e-2), path
    for float16_delta, float32_delta in zip(float16_deltas, float32_deltas):
        np.testing.assert_allclose(float16_delta, float32_delta, rtol=5e-2, atol=2e-4)


OVERFLOW_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import clars_tf
    sys.path.insert(0, {tests_dir!r})
    from distributed_helpers import GLOBAL_BATCH, dense_model, make_data

    wrapper = {{"clars_tf": clars_tf.LossScaleOptimizer,
               "keras": keras.optimizers.LossScaleOptimizer}}[sys.argv[1]]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = dense_model()
        inner = clars_tf.CLARS(learning_rate=1.0)
        optimizer = wrapper(inner)
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = make_data(GLOBAL_BATCH)
    x[GLOBAL_BATCH // 2:] = np.inf  # the second replica's shard only
    initial = [v.numpy() for v in model.trainable_variables]
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    print(json.dumps({{
        "scale_ratio": float(optimizer.dynamic_scale.numpy()) / optimizer.initial_scale,
        "iterations": int(inner.iterations.numpy()),
        "finite": all(bool(np.all(np.isfinite(v.numpy()))) for v in model.trainable_variables),
        "unchanged": all(bool(np.array_equal(v.numpy(), w))
                         for v, w in zip(model.trainable_variables, initial)),
    }}))
    """
)


def run_overflow_step(wrapper):
    script = OVERFLOW_SCRIPT.format(tests_dir=str(REPO_ROOT / "tests"))
    result = subprocess.run(
        [sys.executable, "-c", script, wrapper], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_overflow_on_one_replica_is_skipped_everywhere():
    # A subprocess with a timeout: a replica that skips a collective the
    # other one runs would hang here instead of failing.
    outcome = run_overflow_step("clars_tf")
    assert outcome["finite"]
    assert outcome["unchanged"]
    assert outcome["iterations"] == 0
    assert outcome["scale_ratio"] == 0.5


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="Keras 3.15 LossScaleOptimizer under MirroredStrategy checks only the "
    "first replica's gradients, so an overflow on another replica reaches the weights",
)
def test_keras_loss_scale_overflow_on_second_replica():
    outcome = run_overflow_step("keras")
    assert outcome["finite"]


def test_mixed_bfloat16_trains():
    x, y = make_data(8 * GLOBAL_BATCH)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        with mirrored(2).scope():
            model = dense_model()
            model.compile(
                optimizer=clars_tf.CLARS(learning_rate=0.5),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=6, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0]


def fit_under_mirrored(make_optimizer=lambda: keras.optimizers.SGD(0.1), **compile_kwargs):
    x, y = make_data(4 * GLOBAL_BATCH)
    with mirrored(2).scope():
        model = dense_model()
        model.compile(
            optimizer=make_optimizer(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            **compile_kwargs,
        )
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


@pytest.mark.xfail(
    strict=True,
    raises=tf.errors.InvalidArgumentError,
    reason="Keras 3.15 fit fails under MirroredStrategy with steps_per_execution > 1",
)
def test_keras_steps_per_execution_under_mirrored():
    fit_under_mirrored(steps_per_execution=2)


@pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason="Keras 3.15 accumulation calls merge_call inside a conditional",
)
def test_keras_gradient_accumulation_under_mirrored():
    fit_under_mirrored(lambda: keras.optimizers.SGD(0.1, gradient_accumulation_steps=2))


@pytest.mark.xfail(
    strict=True,
    raises=tf.errors.InvalidArgumentError,
    reason="Keras 3.15 compile(jit_compile=True) fails under MirroredStrategy",
)
def test_keras_jit_compile_under_mirrored():
    fit_under_mirrored(jit_compile=True)


def test_clars_accumulation_works_under_mirrored():
    fit_under_mirrored(lambda: clars_tf.CLARS(gradient_accumulation_steps=2))

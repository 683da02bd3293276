"""CLARS and LARS update rules against the NumPy reference, on one device."""

import logging
import math

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import clars_tf
from clars_tf.norms import l2_norm, trust_ratio
from numpy_reference import ReferenceOptimizer, reference_trust_ratio

# path, shape, weight scale, gradient scale. The first and third are built
# so that CLARS' clip at max_trust_ratio is active on one and not the other.
VARIABLE_SPECS = [
    ("dense/kernel", (4, 3), 1.0, 1e-3),  # large weights, small gradients
    ("dense/bias", (3,), 0.1, 0.5),  # rank 1: no layer adaptation by default
    ("head/kernel", (3, 2), 0.01, 1.0),  # small weights, large gradients
    ("zero/kernel", (2, 2), 0.0, 0.3),  # zero weight norm
    ("still/kernel", (2, 2), 0.5, 0.0),  # zero gradient
]

STORAGE = {
    "float32": lambda a: a.astype(np.float32).astype(np.float64),
    "float16": lambda a: a.astype(np.float16).astype(np.float64),
    "bfloat16": lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float64),
}
TOLERANCE = {"float32": (1e-5, 1e-7), "float16": (3e-3, 1e-4), "bfloat16": (2e-2, 1e-3)}


def make_weights(seed):
    rng = np.random.default_rng(seed)
    return [scale * rng.standard_normal(shape) for _, shape, scale, _ in VARIABLE_SPECS]


def make_gradients(seed, calls, store):
    rng = np.random.default_rng(seed + 1)
    return [
        [store(scale * rng.standard_normal(shape)) for _, shape, _, scale in VARIABLE_SPECS]
        for _ in range(calls)
    ]


def make_variables(weights, dtype):
    variables = []
    for (path, _, _, _), weight in zip(VARIABLE_SPECS, weights):
        scope, name = path.split("/")
        with keras.name_scope(scope):
            variables.append(keras.Variable(initializer=weight, dtype=dtype, name=name))
    return variables


# Each case: optimizer class and arguments, dtype, number of apply calls,
# whether complete norms are handed in, and the masks written out by hand
# for the variables above (decay, adaptation).
CASES = {
    "clars_accumulation": dict(
        cls=clars_tf.CLARS,
        kwargs=dict(
            learning_rate=0.5,
            weight_decay=0.01,
            exclude_from_weight_decay=["head"],
            gradient_accumulation_steps=2,
        ),
        calls=10,
        decay=[True, True, False, True, True],
        adapt=[True, False, True, True, True],
    ),
    "clars_classic_nesterov_explicit": dict(
        cls=clars_tf.CLARS,
        kwargs=dict(
            learning_rate=0.3,
            classic_momentum=True,
            nesterov=True,
            weight_decay=1e-3,
            exclude_from_layer_adaptation=[],
        ),
        calls=5,
        explicit=True,
        decay=[True] * 5,
        adapt=[True] * 5,
    ),
    "clars_schedule_explicit": dict(
        cls=clars_tf.CLARS,
        kwargs=dict(
            learning_rate=keras.optimizers.schedules.ExponentialDecay(0.5, 1, 0.8),
            momentum=0.8,
            nesterov=True,
            exclude_from_layer_adaptation=["zero"],
        ),
        calls=5,
        explicit=True,
        decay=[False] * 5,
        adapt=[True, True, True, False, True],
    ),
    "clars_no_samples_no_clip": dict(
        cls=clars_tf.CLARS,
        kwargs=dict(learning_rate=0.5, weight_decay=0.01, max_trust_ratio=None),
        calls=5,
        decay=[True] * 5,
        adapt=[True, False, True, True, True],
    ),
    "lars_default": dict(
        cls=clars_tf.LARS,
        kwargs=dict(learning_rate=1.0, weight_decay=0.01),
        calls=5,
        decay=[True] * 5,
        adapt=[True, False, True, True, True],
    ),
    "lars_nesterov_non_classic": dict(
        cls=clars_tf.LARS,
        kwargs=dict(
            learning_rate=1.0,
            classic_momentum=False,
            nesterov=True,
            weight_decay=0.01,
            exclude_from_weight_decay=["bias", "zero"],
        ),
        calls=5,
        decay=[True, False, True, False, True],
        adapt=[True, False, True, True, True],
    ),
    "lars_no_momentum_clipped": dict(
        cls=clars_tf.LARS,
        kwargs=dict(learning_rate=2.0, momentum=0.0, max_trust_ratio=0.05, weight_decay=1e-3),
        calls=5,
        decay=[True] * 5,
        adapt=[True, False, True, True, True],
    ),
    "clars_float16_accumulation": dict(
        cls=clars_tf.CLARS,
        kwargs=dict(learning_rate=0.5, weight_decay=0.01, gradient_accumulation_steps=2),
        dtype="float16",
        calls=10,
        decay=[True] * 5,
        adapt=[True, False, True, True, True],
    ),
    "clars_bfloat16_accumulation": dict(
        cls=clars_tf.CLARS,
        kwargs=dict(learning_rate=0.5, weight_decay=0.01, gradient_accumulation_steps=2),
        dtype="bfloat16",
        calls=10,
        decay=[True] * 5,
        adapt=[True, False, True, True, True],
    ),
    "lars_bfloat16": dict(
        cls=clars_tf.LARS,
        kwargs=dict(learning_rate=1.0, weight_decay=0.01),
        dtype="bfloat16",
        calls=5,
        decay=[True] * 5,
        adapt=[True, False, True, True, True],
    ),
}


def learning_rate_at(kwargs, iteration):
    learning_rate = kwargs["learning_rate"]
    if callable(learning_rate):
        # ExponentialDecay(initial, decay_steps=1, rate) without staircase.
        return learning_rate.initial_learning_rate * learning_rate.decay_rate**iteration
    return learning_rate


def run_case(case, seed=0):
    """Run a case through the optimizer and the reference; return both."""
    dtype = case.get("dtype", "float32")
    store = STORAGE[dtype]
    calls = case["calls"]
    kwargs = case["kwargs"]
    steps = kwargs.get("gradient_accumulation_steps") or 1
    explicit = case.get("explicit", False)

    weights = [store(w) for w in make_weights(seed)]
    gradients = make_gradients(seed, calls, store)
    rng = np.random.default_rng(seed + 2)
    explicit_norms = [rng.uniform(0.5, 2.0, len(VARIABLE_SPECS)) for _ in range(calls)]

    variables = make_variables(weights, dtype)
    optimizer = case["cls"](**kwargs)
    optimizer.build(variables)
    for call in range(calls):
        if explicit:
            optimizer.set_complete_norms(list(explicit_norms[call]))
        optimizer.apply([tf.constant(g, dtype=dtype) for g in gradients[call]], variables)

    is_clars = case["cls"] is clars_tf.CLARS
    defaults = case["cls"]()
    reference = ReferenceOptimizer(
        weights,
        momentum=kwargs.get("momentum", defaults.momentum),
        nesterov=kwargs.get("nesterov", False),
        classic_momentum=kwargs.get("classic_momentum", defaults.classic_momentum),
        weight_decay=kwargs.get("weight_decay", 0.0),
        trust_coefficient=0.01 if is_clars else 0.001,
        max_trust_ratio=kwargs.get("max_trust_ratio", 0.1 if is_clars else None),
        epsilon=1e-6,
        decay_mask=case["decay"],
        adaptation_mask=case["adapt"],
        store=store,
    )
    for update in range(calls // steps):
        micro = gradients[update * steps : (update + 1) * steps]
        mean_gradients = [np.mean([m[i] for m in micro], axis=0) for i in range(len(VARIABLE_SPECS))]
        complete_norms = None
        if is_clars and explicit:
            complete_norms = list(
                np.mean(explicit_norms[update * steps : (update + 1) * steps], axis=0)
            )
        elif is_clars and steps > 1:
            complete_norms = [
                np.mean([np.linalg.norm(m[i]) for m in micro]) for i in range(len(VARIABLE_SPECS))
            ]
        last_call = update * steps + steps - 1
        reference.update(mean_gradients, learning_rate_at(kwargs, last_call), complete_norms)
    return optimizer, variables, reference


@pytest.mark.parametrize("name", sorted(CASES))
def test_update_matches_numpy_reference(name):
    case = CASES[name]
    optimizer, variables, reference = run_case(case)
    rtol, atol = TOLERANCE[case.get("dtype", "float32")]
    for (path, _, _, _), variable, expected in zip(VARIABLE_SPECS, variables, reference.weights):
        actual = np.asarray(variable.numpy(), np.float64)
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=path)


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if CASES[n].get("dtype") is None])
def test_recorded_trust_ratios_match_reference(name):
    optimizer, _, reference = run_case(CASES[name])
    statistics = optimizer.layer_statistics()
    for (path, _, _, _), expected in zip(VARIABLE_SPECS, reference.ratios[-1]):
        actual = float(statistics[path]["trust_ratio"])
        assert actual == pytest.approx(expected, rel=1e-5), path


def test_accumulation_case_covers_both_clip_states():
    """The accumulation case must exercise an active and an inactive clip."""
    _, _, reference = run_case(CASES["clars_accumulation"])
    first_update = reference.ratios[0]
    assert first_update[0] == 0.1  # dense/kernel: clipped at max_trust_ratio
    assert first_update[2] < 0.1  # head/kernel: below the clip


def test_zero_weight_and_zero_gradient_stay_finite():
    one_update = dict(CASES["clars_accumulation"], calls=2)
    optimizer, variables, _ = run_case(one_update)
    statistics = optimizer.layer_statistics()
    assert float(statistics["zero/kernel"]["trust_ratio"]) == 1.0
    assert float(statistics["still/kernel"]["trust_ratio"]) == 1.0
    for variable in variables:
        assert np.all(np.isfinite(variable.numpy())), variable.path


def test_zero_initialized_layer_learns():
    with keras.name_scope("zero"):
        variable = keras.Variable(initializer=np.zeros((3, 3)), dtype="float32", name="kernel")
    optimizer = clars_tf.CLARS(learning_rate=0.1, momentum=0.0)
    optimizer.apply([tf.ones((3, 3))], [variable])
    # The guard sets the ratio to 1: w = 0 - 0.1 * 1 * 1.
    np.testing.assert_allclose(variable.numpy(), -0.1 * np.ones((3, 3)), rtol=1e-6)


def test_complete_norm_statistic_is_mean_micro_batch_norm():
    case = CASES["clars_accumulation"]
    optimizer, _, _ = run_case(case)
    gradients = make_gradients(0, case["calls"], STORAGE["float32"])
    last_two = gradients[-2:]
    for i, (path, _, _, _) in enumerate(VARIABLE_SPECS):
        expected = np.mean([np.linalg.norm(g[i]) for g in last_two])
        actual = float(optimizer.layer_statistics()[path]["complete_norm"])
        assert actual == pytest.approx(expected, rel=1e-5), path


def test_update_compiles_with_xla():
    case = CASES["clars_accumulation"]
    weights = make_weights(3)
    gradients = make_gradients(3, 4, STORAGE["float32"])
    eager_vars = make_variables(weights, "float32")
    xla_vars = make_variables(weights, "float32")
    eager_opt = clars_tf.CLARS(**case["kwargs"])
    xla_opt = clars_tf.CLARS(**case["kwargs"])
    xla_opt.build(xla_vars)
    traces = []

    @tf.function(jit_compile=True)
    def xla_apply(grads):
        traces.append(1)
        xla_opt.apply(grads, xla_vars)

    for grads in gradients:
        eager_opt.apply([tf.constant(g, tf.float32) for g in grads], eager_vars)
        xla_apply([tf.constant(g, tf.float32) for g in grads])
    assert len(traces) == 1
    for eager, xla in zip(eager_vars, xla_vars):
        np.testing.assert_allclose(xla.numpy(), eager.numpy(), rtol=1e-5, atol=1e-7)


def test_sparse_gradient_with_repeated_indices():
    """An IndexedSlices gradient gives the same update as its dense sum."""
    table = np.random.default_rng(0).standard_normal((6, 4))
    indices = tf.constant([1, 3, 1, 1])
    values = tf.constant(np.random.default_rng(1).standard_normal((4, 4)), tf.float32)
    sparse = tf.IndexedSlices(values, indices, dense_shape=tf.constant([6, 4]))
    dense = np.zeros((6, 4))
    for row, value in zip(indices.numpy(), values.numpy()):
        dense[row] += value

    sparse_var = keras.Variable(initializer=table, dtype="float32", name="embeddings")
    dense_var = keras.Variable(initializer=table, dtype="float32", name="embeddings")
    sparse_opt = clars_tf.LARS(learning_rate=1.0, weight_decay=0.01)
    dense_opt = clars_tf.LARS(learning_rate=1.0, weight_decay=0.01)
    for _ in range(3):
        sparse_opt.apply([sparse], [sparse_var])
        dense_opt.apply([tf.constant(dense, tf.float32)], [dense_var])
    np.testing.assert_allclose(sparse_var.numpy(), dense_var.numpy(), rtol=1e-6)
    expected_norm = np.linalg.norm(dense)
    assert float(l2_norm(sparse)) == pytest.approx(expected_norm, rel=1e-6)


@pytest.mark.parametrize(
    "weight_norm, gradient_norm, expected",
    [
        (2.0, 0.5, reference_trust_ratio(2.0, 0.5, 0.01, 1e-6, 0.1)),
        (200.0, 0.5, 0.1),  # clipped
        (0.0, 0.5, 1.0),  # zero weight norm
        (2.0, 0.0, 1.0),  # zero gradient norm
        (0.0, 0.0, 1.0),
    ],
)
def test_trust_ratio_helper(weight_norm, gradient_norm, expected):
    actual = float(trust_ratio(tf.constant(weight_norm), tf.constant(gradient_norm), 0.01, 1e-6, 0.1))
    assert actual == pytest.approx(expected, rel=1e-6)


def test_trust_ratio_zero_epsilon_stays_finite():
    ratio = trust_ratio(tf.constant(1.0), tf.constant(0.0), 0.01, 0.0, None)
    assert math.isfinite(float(ratio))


def test_l2_norm_float16_does_not_overflow():
    # 300 ** 2 overflows float16 (max 65504); the norm is taken in float32.
    value = tf.constant([300.0, 400.0], tf.float16)
    assert float(l2_norm(value)) == pytest.approx(500.0)


def test_no_sample_warning_logged_once(caplog):
    variable = keras.Variable(initializer=np.ones((2, 2)), dtype="float32", name="kernel")
    optimizer = clars_tf.CLARS()
    with caplog.at_level(logging.WARNING, logger="clars_tf.optimizers"):
        for _ in range(3):
            optimizer.apply([tf.ones((2, 2))], [variable])
    warnings = [r for r in caplog.records if "no gradient samples" in r.getMessage()]
    assert len(warnings) == 1


def test_no_warning_with_accumulation(caplog):
    variable = keras.Variable(initializer=np.ones((2, 2)), dtype="float32", name="kernel")
    optimizer = clars_tf.CLARS(gradient_accumulation_steps=2)
    with caplog.at_level(logging.WARNING, logger="clars_tf.optimizers"):
        optimizer.apply([tf.ones((2, 2))], [variable])
    assert not [r for r in caplog.records if "no gradient samples" in r.getMessage()]


def test_set_complete_norms_before_build_raises():
    with pytest.raises(ValueError, match="optimizer.build"):
        clars_tf.CLARS().set_complete_norms([1.0])


def test_set_complete_norms_wrong_length_raises():
    variable = keras.Variable(initializer=np.ones((2, 2)), dtype="float32", name="kernel")
    optimizer = clars_tf.CLARS()
    optimizer.build([variable])
    with pytest.raises(ValueError, match="expects 1 norms"):
        optimizer.set_complete_norms([1.0, 2.0])


def test_explicit_norms_used_only_once():
    """Norms handed in apply to the next update only; later ones use ||d||."""
    weights = np.random.default_rng(0).standard_normal((3, 3))
    gradient = np.full((3, 3), 0.2)
    variable = keras.Variable(initializer=weights, dtype="float32", name="kernel")
    optimizer = clars_tf.CLARS(learning_rate=1.0, momentum=0.0, max_trust_ratio=None)
    optimizer.build([variable])
    optimizer.set_complete_norms([5.0])
    optimizer.apply([tf.constant(gradient, tf.float32)], [variable])
    first = float(optimizer.layer_statistics()["kernel"]["complete_norm"])
    optimizer.apply([tf.constant(gradient, tf.float32)], [variable])
    second = float(optimizer.layer_statistics()["kernel"]["complete_norm"])
    assert first == pytest.approx(5.0)
    assert second == pytest.approx(np.linalg.norm(gradient), rel=1e-6)


INVALID_ARGUMENTS = [
    ("learning_rate", 0.0),
    ("learning_rate", -0.1),
    ("momentum", -0.1),
    ("momentum", 1.0),
    ("weight_decay", -1e-4),
    ("epsilon", -1e-6),
    ("trust_coefficient", 0.0),
    ("max_trust_ratio", 0.0),
    ("max_trust_ratio", -1.0),
    ("exclude_from_weight_decay", "bias"),
    ("exclude_from_layer_adaptation", "bn"),
    ("exclude_from_weight_decay", ["bias", "("]),
    ("exclude_from_layer_adaptation", ["[bn"]),
    ("momentum", float("nan")),
]


@pytest.mark.parametrize("cls", [clars_tf.CLARS, clars_tf.LARS])
@pytest.mark.parametrize("argument, value", INVALID_ARGUMENTS)
def test_invalid_argument_raises(cls, argument, value):
    with pytest.raises(ValueError, match=argument):
        cls(**{argument: value})


@pytest.mark.parametrize("cls", [clars_tf.CLARS, clars_tf.LARS])
def test_nesterov_without_momentum_raises(cls):
    with pytest.raises(ValueError, match="nesterov"):
        cls(momentum=0.0, nesterov=True)


def test_get_config_round_trip():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([10, 20], [0.1, 0.01, 0.001])
    optimizer = clars_tf.CLARS(
        learning_rate=schedule,
        momentum=0.8,
        nesterov=True,
        classic_momentum=True,
        weight_decay=5e-5,
        trust_coefficient=0.02,
        max_trust_ratio=None,
        epsilon=1e-8,
        exclude_from_weight_decay=["bn", "bias"],
        exclude_from_layer_adaptation=[],
        replica_norms=False,
        clipnorm=2.0,
        gradient_accumulation_steps=4,
        name="my_clars",
    )
    config = optimizer.get_config()
    restored = clars_tf.CLARS.from_config(keras.saving.serialize_keras_object(optimizer)["config"])
    restored_config = restored.get_config()
    assert restored_config == config
    assert config["exclude_from_weight_decay"] == ["bn", "bias"]
    assert config["exclude_from_layer_adaptation"] == []
    assert config["weight_decay"] == 5e-5
    assert isinstance(restored.learning_rate, tf.Tensor) or callable(restored._learning_rate)


def test_serialized_optimizer_deserializes_without_custom_objects():
    optimizer = clars_tf.LARS(learning_rate=0.2, weight_decay=1e-4)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, clars_tf.LARS)
    assert restored.get_config() == optimizer.get_config()

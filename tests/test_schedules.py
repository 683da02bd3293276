"""Tests for clars_tf.schedules against plain-Python versions of each formula."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from clars_tf.schedules import (
    WarmupCosineDecay,
    WarmupPolynomialDecay,
    WarmupStepDecay,
    scaled_learning_rate,
)

# float32 evaluation against float64 references.
RTOL = 1e-5
ATOL = 1e-8


# --- Plain-Python references -------------------------------------------------------
# `reference_poly_lr_rate` and `reference_polynomial_decay` follow `poly_lr_rate` and
# `polynomial_decay` in main_imagenet_lars.py of github.com/slowbull/largebatch line
# by line. The reference hard-codes power=2 and end_lr=1e-4 in its call.


def reference_poly_lr_rate(current_steps, warmup_steps, total_steps, lr, end_lr=1e-4, power=2.0):
    if current_steps < warmup_steps:
        return lr * current_steps / warmup_steps
    decay_steps = max(current_steps - warmup_steps, 1)
    return reference_polynomial_decay(
        lr, decay_steps, total_steps - warmup_steps + 1, end_lr=end_lr, power=power
    )


def reference_polynomial_decay(lr, global_step, decay_steps, end_lr=0.0001, power=1.0):
    global_step = min(global_step, decay_steps)
    return (lr - end_lr) * pow(1 - global_step / decay_steps, power) + end_lr


def reference_cosine(step, peak, total_steps, warmup_steps, end):
    if step < warmup_steps:
        return peak * step / warmup_steps
    if step >= total_steps:
        return end
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def reference_step_decay(step, peak, boundaries, factor, warmup_steps):
    if step < warmup_steps:
        return peak * step / warmup_steps
    num_decays = sum(1 for boundary in boundaries if step >= boundary)
    return peak * factor**num_decays


def steps_to_check(warmup_steps, last_step):
    """Return step 0, the steps around the warmup end and the last step, and beyond."""
    candidates = {0, 1, last_step // 2, last_step - 1, last_step, last_step + 1}
    candidates |= {last_step + 50, 10 * last_step}
    candidates |= {warmup_steps - 1, warmup_steps, warmup_steps + 1, warmup_steps + 2}
    return sorted(step for step in candidates if step >= 0)


def evaluate_eagerly(schedule, steps):
    return np.array([float(schedule(tf.constant(step, tf.int64))) for step in steps])


def evaluate_under_xla(schedule, steps):
    @tf.function(jit_compile=True)
    def compiled(step):
        return schedule(step)

    return np.array([float(compiled(tf.constant(step, tf.int64))) for step in steps])


POLY_CASES = [
    # (peak, total_steps, warmup_steps, end, power)
    (0.8, 100, 0, 1e-4, 2.0),
    (12.8, 5005, 250, 1e-4, 2.0),
    (3.2, 100, 100, 1e-4, 2.0),
    (0.1, 37, 5, 1e-3, 1.0),
]
COSINE_CASES = [
    # (peak, total_steps, warmup_steps, end)
    (0.8, 100, 0, 0.0),
    (12.8, 5005, 250, 1e-4),
    (1.0, 40, 40, 0.0),
]
STEP_CASES = [
    # (peak, boundaries, factor, warmup_steps)
    (0.1, [30, 60, 80], 0.1, 0),
    (3.2, [1500, 3000, 4000], 0.1, 250),
    (1.0, [10, 20], 0.5, 10),
    (0.5, [], 0.1, 20),
]


# --- Formulas ----------------------------------------------------------------------


@pytest.mark.parametrize("peak, total_steps, warmup_steps, end, power", POLY_CASES)
def test_poly_matches_reference_code(peak, total_steps, warmup_steps, end, power):
    schedule = WarmupPolynomialDecay(peak, total_steps, warmup_steps, end, power)
    steps = steps_to_check(warmup_steps, total_steps)
    expected = [
        reference_poly_lr_rate(step, warmup_steps, total_steps, peak, end, power)
        for step in steps
    ]

    actual = evaluate_eagerly(schedule, steps)

    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def test_poly_default_end_and_power():
    schedule = WarmupPolynomialDecay(peak_learning_rate=1.6, total_steps=300, warmup_steps=30)
    steps = steps_to_check(30, 300)
    # The reference's defaults: power=2 and end_lr=1e-4.
    expected = [reference_poly_lr_rate(step, 30, 300, 1.6) for step in steps]

    actual = evaluate_eagerly(schedule, steps)

    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def test_poly_reference_quirks():
    schedule = WarmupPolynomialDecay(peak_learning_rate=1.0, total_steps=100, warmup_steps=10)

    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) < 1.0
    assert float(schedule(101)) == pytest.approx(1e-4, rel=RTOL)
    assert float(schedule(100)) > 1e-4


@pytest.mark.parametrize("peak, total_steps, warmup_steps, end", COSINE_CASES)
def test_cosine_matches_python_formula(peak, total_steps, warmup_steps, end):
    schedule = WarmupCosineDecay(peak, total_steps, warmup_steps, end)
    steps = steps_to_check(warmup_steps, total_steps)
    expected = [reference_cosine(step, peak, total_steps, warmup_steps, end) for step in steps]

    actual = evaluate_eagerly(schedule, steps)

    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("peak, boundaries, factor, warmup_steps", STEP_CASES)
def test_step_decay_matches_formula(peak, boundaries, factor, warmup_steps):
    schedule = WarmupStepDecay(peak, boundaries, factor, warmup_steps)
    last_step = boundaries[-1] if boundaries else warmup_steps + 10
    steps = steps_to_check(warmup_steps, last_step)
    steps = sorted(set(steps) | {b + offset for b in boundaries for offset in (-1, 0, 1)})
    expected = [
        reference_step_decay(step, peak, boundaries, factor, warmup_steps) for step in steps
    ]

    actual = evaluate_eagerly(schedule, steps)

    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def test_step_decay_from_epochs():
    schedule = WarmupStepDecay.from_epochs(
        peak_learning_rate=0.1, steps_per_epoch=5005, warmup_epochs=5
    )

    assert schedule.boundaries == [30 * 5005, 60 * 5005, 80 * 5005]
    assert schedule.warmup_steps == 5 * 5005
    assert schedule.factor == 0.1


def test_scaled_learning_rate_linear_rule():
    assert scaled_learning_rate(0.1, 4096) == pytest.approx(1.6)
    assert scaled_learning_rate(0.1, 256) == pytest.approx(0.1)
    assert scaled_learning_rate(0.2, 1024, reference_batch_size=512) == pytest.approx(0.4)


# --- Keras integration -------------------------------------------------------------


def all_schedules():
    return [
        WarmupPolynomialDecay(12.8, 5005, 250),
        WarmupCosineDecay(12.8, 5005, 250, end_learning_rate=1e-4),
        WarmupStepDecay(3.2, [1500, 3000, 4000], 0.1, 250),
    ]


@pytest.mark.parametrize("schedule", all_schedules(), ids=lambda s: type(s).__name__)
def test_schedule_values_under_xla(schedule):
    steps = steps_to_check(250, 5005) + [1499, 1500, 3000, 4000]

    compiled = evaluate_under_xla(schedule, steps)
    eager = evaluate_eagerly(schedule, steps)

    np.testing.assert_allclose(compiled, eager, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("schedule", all_schedules(), ids=lambda s: type(s).__name__)
def test_schedule_sgd_config_round_trip(schedule):
    config = keras.optimizers.SGD(learning_rate=schedule).get_config()
    # A config must survive JSON, as in a saved .keras file.
    config = json.loads(json.dumps(config))

    restored = keras.optimizers.SGD.from_config(config)._learning_rate

    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    steps = [0, 250, 1500, 5005, 6000]
    np.testing.assert_allclose(evaluate_eagerly(restored, steps), evaluate_eagerly(schedule, steps))


def test_optimizer_reads_zero_based_step():
    schedule = WarmupPolynomialDecay(1.0, total_steps=100, warmup_steps=10)
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    variable = keras.Variable(1.0)
    optimizer.build([variable])

    for step in (0, 5, 10, 100, 150):
        optimizer.iterations.assign(step)
        expected = reference_poly_lr_rate(step, 10, 100, 1.0)
        assert float(optimizer.learning_rate) == pytest.approx(expected, rel=RTOL, abs=ATOL)


def test_sgd_update_under_xla():
    schedule = WarmupCosineDecay(0.5, total_steps=4)
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    variable = keras.Variable(1.0)
    optimizer.build([variable])
    gradient = tf.constant(2.0)

    @tf.function(jit_compile=True)
    def apply_step():
        optimizer.apply_gradients([(gradient, variable)])

    for _ in range(3):
        apply_step()

    # Plain SGD: w -= lr(step) * g for steps 0, 1 and 2.
    rates = [reference_cosine(step, 0.5, 4, 0, 0.0) for step in range(3)]
    expected = 1.0 - 2.0 * sum(rates)
    assert float(variable) == pytest.approx(expected, rel=RTOL)


# --- Invalid arguments -------------------------------------------------------------

INVALID_CASES = [
    (WarmupPolynomialDecay, dict(peak_learning_rate=0.0, total_steps=10), "peak_learning_rate"),
    (WarmupPolynomialDecay, dict(peak_learning_rate=-1.0, total_steps=10), "peak_learning_rate"),
    (WarmupPolynomialDecay, dict(peak_learning_rate=1.0, total_steps=-5), "total_steps"),
    (WarmupPolynomialDecay, dict(peak_learning_rate=1.0, total_steps=0), "total_steps"),
    (WarmupPolynomialDecay, dict(peak_learning_rate=1.0, total_steps=10.5), "total_steps"),
    (
        WarmupPolynomialDecay,
        dict(peak_learning_rate=1.0, total_steps=10, warmup_steps=-1),
        "warmup_steps",
    ),
    (
        WarmupPolynomialDecay,
        dict(peak_learning_rate=1.0, total_steps=10, warmup_steps=11),
        "warmup_steps",
    ),
    (
        WarmupPolynomialDecay,
        dict(peak_learning_rate=1e-5, total_steps=10),
        "end_learning_rate",
    ),
    (
        WarmupPolynomialDecay,
        dict(peak_learning_rate=1.0, total_steps=10, power=0.0),
        "power",
    ),
    (
        WarmupCosineDecay,
        dict(peak_learning_rate=1.0, total_steps=10, end_learning_rate=-0.1),
        "end_learning_rate",
    ),
    (
        WarmupCosineDecay,
        dict(peak_learning_rate=float("nan"), total_steps=10),
        "peak_learning_rate",
    ),
    (
        WarmupCosineDecay,
        dict(peak_learning_rate=1.0, total_steps=5, warmup_steps=6),
        "warmup_steps",
    ),
    (WarmupStepDecay, dict(peak_learning_rate=1.0, boundaries=[60, 30]), "boundaries"),
    (WarmupStepDecay, dict(peak_learning_rate=1.0, boundaries=[30, 30]), "boundaries"),
    (WarmupStepDecay, dict(peak_learning_rate=1.0, boundaries=[-3]), "boundaries"),
    (
        WarmupStepDecay,
        dict(peak_learning_rate=1.0, boundaries=[5, 30], warmup_steps=10),
        "boundaries",
    ),
    (WarmupStepDecay, dict(peak_learning_rate=1.0, boundaries=[30], factor=0.0), "factor"),
    (WarmupStepDecay, dict(peak_learning_rate=1.0, boundaries=[30], factor=2.0), "factor"),
    (WarmupStepDecay, dict(peak_learning_rate=0.0, boundaries=[30]), "peak_learning_rate"),
    (
        WarmupStepDecay.from_epochs,
        dict(peak_learning_rate=1.0, steps_per_epoch=0),
        "steps_per_epoch",
    ),
    (
        WarmupStepDecay.from_epochs,
        dict(peak_learning_rate=1.0, steps_per_epoch=10, warmup_epochs=-1),
        "warmup_epochs",
    ),
    (
        scaled_learning_rate,
        dict(base_learning_rate=0.0, global_batch_size=256),
        "base_learning_rate",
    ),
    (scaled_learning_rate, dict(base_learning_rate=0.1, global_batch_size=0), "global_batch_size"),
    (
        scaled_learning_rate,
        dict(base_learning_rate=0.1, global_batch_size=256, reference_batch_size=-256),
        "reference_batch_size",
    ),
]


@pytest.mark.parametrize(
    "constructor, arguments, argument_name",
    INVALID_CASES,
    ids=[f"{case[0].__name__}-{case[2]}-{index}" for index, case in enumerate(INVALID_CASES)],
)
def test_invalid_argument_raises(constructor, arguments, argument_name):
    with pytest.raises(ValueError, match=argument_name):
        constructor(**arguments)

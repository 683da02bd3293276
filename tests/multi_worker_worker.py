"""One worker of the two-process MultiWorkerMirroredStrategy test.

Run by tests/test_multi_worker.py with TF_CONFIG set. It trains CLARS first
with a custom loop (`strategy.run` + `optimizer.apply`), then with
`model.fit`, and writes the complete norms of the first update, the weights
after each phase and the Keras errors met on the way to OUTPUT_DIR.
"""

import json
import os
import sys
import types

import keras
import numpy as np
import tensorflow as tf

import clars_tf
from distributed_helpers import dense_model, make_data, per_example_losses

WORKERS = 2
PER_WORKER_BATCH = 8
STEPS = 3


def worker_rows(step, worker):
    """Rows of the shared data that `worker` trains on at `step`."""
    start = (step * WORKERS + worker) * PER_WORKER_BATCH
    return slice(start, start + PER_WORKER_BATCH)


def build_leaf_by_leaf(model, strategy):
    """Work around Keras 3.15's symbolic build at the start of `fit`.

    Keras passes the first (x, y) batch to one `strategy.reduce` call, which
    takes a single value, not a nest, so MultiWorkerMirroredStrategy rejects
    it. Shapes and dtypes are all the build needs: take the local values.
    """

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                batch = next(batches)
                data_batch = tf.nest.map_structure(
                    lambda value: strategy.experimental_local_results(value)[0], batch
                )
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = maybe_symbolic_build


def give_metrics_a_batch_axis(model):
    """Work around Keras 3.15's metric averaging across workers in `fit`.

    Keras averages each worker's scalar metrics with
    `strategy.reduce("MEAN", value, axis=0)`, which needs an axis 0.
    """
    train_step = model.train_step

    def train_step_with_axis(self, data):
        return {name: tf.reshape(value, [1]) for name, value in train_step(data).items()}

    model.train_step = types.MethodType(train_step_with_axis, model)
    model.train_function = None


def save_weights(model, path):
    np.savez(path, *[v.numpy() for v in model.trainable_variables])


def main(output_dir):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    worker = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    x, y = make_data(STEPS * WORKERS * PER_WORKER_BATCH)
    global_batch = WORKERS * PER_WORKER_BATCH

    with strategy.scope():
        model = dense_model()
        optimizer = clars_tf.CLARS(learning_rate=1.0, weight_decay=1e-3)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        optimizer.build(model.trainable_variables)

    def dataset_fn(context):
        rows = np.concatenate(
            [np.arange(len(x))[worker_rows(s, context.input_pipeline_id)] for s in range(STEPS)]
        )
        batch = context.get_per_replica_batch_size(global_batch)
        return tf.data.Dataset.from_tensor_slices((x[rows], y[rows])).batch(batch)

    dataset = strategy.distribute_datasets_from_function(dataset_fn)

    # Custom loop.
    def replica_step(features, labels):
        with tf.GradientTape() as tape:
            losses = per_example_losses(model, features, labels)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)

    @tf.function
    def train_step(iterator):
        strategy.run(replica_step, args=next(iterator))

    iterator = iter(dataset)
    train_step(iterator)
    complete_norms = {
        path: float(values["complete_norm"])
        for path, values in optimizer.layer_statistics().items()
    }
    for _ in range(STEPS - 1):
        train_step(iterator)
    save_weights(model, os.path.join(output_dir, f"custom_loop{worker}.npz"))

    # fit, with each Keras 3.15 failure recorded, then worked around.
    keras_errors = {}
    try:
        model.fit(dataset, epochs=1, steps_per_epoch=STEPS, verbose=0)
    except ValueError as error:
        # Raised before any training step, in Keras' symbolic build.
        keras_errors["symbolic_build"] = str(error)[:200]
        build_leaf_by_leaf(model, strategy)
    try:
        model.fit(dataset, epochs=1, steps_per_epoch=STEPS, verbose=0)
    except ValueError as error:
        # Raised while tracing, before any step runs.
        keras_errors["metric_reduction"] = str(error)[:200]
        give_metrics_a_batch_axis(model)
    history = model.fit(dataset, epochs=1, steps_per_epoch=STEPS, verbose=0)
    save_weights(model, os.path.join(output_dir, f"fit{worker}.npz"))

    with open(os.path.join(output_dir, f"worker{worker}.json"), "w") as file:
        json.dump(
            {
                "replicas": strategy.num_replicas_in_sync,
                "iterations": int(optimizer.iterations.numpy()),
                "complete_norms": complete_norms,
                "paths": [v.path for v in model.trainable_variables],
                "fit_loss": float(np.ravel(history.history["loss"])[-1]),
                "keras_errors": keras_errors,
            },
            file,
        )


if __name__ == "__main__":
    main(sys.argv[1])

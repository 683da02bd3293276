"""Train an image classifier with CLARS, LARS, SGD or LAMB.

Examples:

  python train_imagenet.py --flagfile=configs/quickstart.cfg --model_dir=runs/quickstart
  python train_imagenet.py --flagfile=configs/imagenet/resnet50_32k_clars.cfg \\
      --data_dir=gs://my-bucket/tensorflow_datasets --strategy=tpu --tpu=my-tpu \\
      --model_dir=gs://my-bucket/runs/resnet50_32k_clars

Later flags override those of a --flagfile. A run that is stopped and started
again with the same flags resumes from its last checkpoint in --model_dir.
"""

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS

# Data.
flags.DEFINE_string(
    "dataset", "synthetic",
    "A tensorflow-datasets name (imagenet2012, cifar10, imagenette/160px, ...), "
    "'tfrecord' (ImageNet-layout shards in --data_dir), 'folder' (train/<class>/ "
    "and val/<class>/ image folders in --data_dir), 'synthetic' (random images) or "
    "'digits' (scikit-learn's bundled 8x8 digits, upscaled).")
flags.DEFINE_string(
    "data_dir", None,
    "Folder of the image folders or TFRecord shards (local or gs://), or the "
    "tensorflow-datasets data directory.")
flags.DEFINE_string(
    "manual_dir", None,
    "tensorflow-datasets manual download folder holding ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar, for --dataset=imagenet2012.")
flags.DEFINE_integer("image_size", 224, "Side of the square training images, in pixels.")
flags.DEFINE_integer(
    "label_offset", None,
    "Added to TFRecord labels: -1 (default) maps the stored 1..1000 to 0..999; 0 keeps "
    "class 0 as a background class (1001 classes).")
flags.DEFINE_boolean("cache", False, "Cache the encoded images in memory after the first epoch.")
flags.DEFINE_boolean(
    "deterministic", False, "Reproducible input order (slower input pipeline; needs --seed).")
flags.DEFINE_boolean(
    "tf_data_autotune", True,
    "Let tf.data tune the input pipeline's parallelism in a background thread. With "
    "TensorFlow 2.21 the end of a run can then wait up to a minute for that thread, so "
    "short runs may turn it off.")

# Model.
flags.DEFINE_enum(
    "model", "resnet50",
    ["resnet50", "densenet121", "mobilenet_v1", "mobilenet_v2", "resnet20", "resnet56"],
    "Model: Keras applications (weights=None) or the small-image ResNets for 32x32 data.")

# Optimizer.
flags.DEFINE_enum("optimizer", "clars", ["clars", "lars", "sgd", "lamb"], "Optimizer.")
flags.DEFINE_float("momentum", 0.9, "Momentum of clars, lars and sgd.")
flags.DEFINE_boolean("nesterov", False, "Nesterov momentum for clars, lars and sgd.")
flags.DEFINE_enum(
    "classic_momentum", "auto", ["auto", "true", "false"],
    "Put the scaled step into the momentum buffer (true) or the raw direction (false); "
    "auto keeps the optimizer's default (clars: false, lars: true).")
flags.DEFINE_float(
    "weight_decay", 0.0,
    "Weight decay: coupled L2 for clars, lars and sgd; decoupled for lamb.")
flags.DEFINE_float(
    "trust_coefficient", None, "Trust coefficient; default 0.01 for clars, 0.001 for lars.")
flags.DEFINE_string(
    "max_trust_ratio", None,
    "Upper bound on the trust ratio, or 'none' for no bound; default 0.1 for clars, "
    "none for lars.")
flags.DEFINE_float("epsilon", 1e-6, "Added to the norm in the trust ratio's denominator.")
flags.DEFINE_list(
    "exclude_from_weight_decay", None,
    "Regular expressions searched in variable paths (such as conv1_bn/gamma); matches "
    "get no weight decay.")
flags.DEFINE_list(
    "exclude_from_layer_adaptation", None,
    "Regular expressions searched in variable paths; matches keep trust ratio 1. "
    "Default: every variable of rank <= 1 (biases and normalization parameters).")
flags.DEFINE_enum(
    "complete_norm_source", "auto", ["auto", "replica", "accumulation", "batch", "per_example"],
    "Where CLARS takes its complete norms: replica (each replica's gradient), "
    "accumulation (each micro-batch of --gradient_accumulation_steps), batch (the batch "
    "gradient: CLARS becomes a clipped LARS), per_example (exact per-example gradient "
    "norms, slower), or auto (replicas and micro-batches when there are any).")
flags.DEFINE_integer(
    "gradient_accumulation_steps", 1,
    "Global batches per optimizer update; 1 updates at every step.")

# Schedule.
flags.DEFINE_float(
    "base_learning_rate", 0.128,
    "Learning rate per --reference_batch_size examples; the peak learning rate is "
    "base * global_batch_size * gradient_accumulation_steps / reference_batch_size.")
flags.DEFINE_integer("reference_batch_size", 256, "Batch size that --base_learning_rate refers to.")
flags.DEFINE_enum("lr_schedule", "poly", ["poly", "cosine", "step"], "Learning-rate decay.")
flags.DEFINE_float("poly_power", 2.0, "Power of the poly schedule.")
flags.DEFINE_float("end_learning_rate", 1e-4, "Final learning rate of the poly and cosine schedules.")
flags.DEFINE_list(
    "step_boundaries", ["30", "60", "80"],
    "Epochs at which the step schedule multiplies the learning rate by --step_factor.")
flags.DEFINE_float("step_factor", 0.1, "Factor of the step schedule at each boundary.")
flags.DEFINE_float("warmup_epochs", 0.0, "Epochs of linear warmup from 0 to the peak learning rate.")
flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing of the cross-entropy loss.")
flags.DEFINE_integer("global_batch_size", 256, "Examples per step, summed over all replicas.")
flags.DEFINE_integer("epochs", 90, "Training epochs.")
flags.DEFINE_integer("train_steps", 0, "Training steps (global batches); 0 trains --epochs epochs.")

# Distribution.
flags.DEFINE_enum(
    "strategy", "default", ["default", "one_device", "mirrored", "multi_worker_mirrored", "tpu"],
    "tf.distribute strategy. multi_worker_mirrored reads the cluster from TF_CONFIG.")
flags.DEFINE_string("tpu", None, "TPU name or address, for --strategy=tpu.")
flags.DEFINE_integer(
    "cpu_replicas", 0,
    "Split the CPU into this many logical devices and use them as the replicas of "
    "--strategy=mirrored (for testing multi-replica runs without accelerators).")
flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16", "float16"],
    "Compute dtype: bfloat16 and float16 use Keras mixed precision (variables stay "
    "float32); float16 adds dynamic loss scaling.")
flags.DEFINE_boolean("jit_compile", False, "XLA-compile each replica's forward and backward pass.")
flags.DEFINE_integer("steps_per_execution", 1, "Training steps per call of the compiled loop.")

# Run.
flags.DEFINE_string(
    "model_dir", None, "Folder for checkpoints, TensorBoard logs, metrics.jsonl and summary.json.")
flags.DEFINE_integer("eval_every", 1, "Evaluate every N epochs, and after the last step.")
flags.DEFINE_integer(
    "eval_steps", 0, "Global batches per evaluation; 0 evaluates the whole split.")
flags.DEFINE_integer("seed", None, "Seed for model initialization, shuffling and augmentation.")
flags.DEFINE_integer("log_every_steps", 100, "Log training metrics every N steps.")
flags.DEFINE_integer(
    "diagnostics_every_steps", 100,
    "Log per-layer trust ratios and norms every N steps (0 turns it off).")


def config_from_flags():
    """Return the TrainConfig that the parsed flags describe."""
    from clars_tf.training import ConfigError, TrainConfig

    values = {name: FLAGS[name].value for name in TrainConfig.__dataclass_fields__}
    try:
        values["step_boundaries"] = [float(b) for b in values["step_boundaries"]]
    except ValueError:
        raise ConfigError(
            f"--step_boundaries must be epochs separated by commas; received "
            f"{','.join(values['step_boundaries'])}."
        ) from None
    return TrainConfig(**values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # Imported here so that --help does not wait for TensorFlow.
    import tensorflow as tf

    from clars_tf.training import ConfigError, Trainer

    # TensorFlow logs every cross-replica reduction at INFO level.
    tf.get_logger().setLevel("WARNING")

    try:
        trainer = Trainer(config_from_flags())
    except ConfigError as error:
        # Print one line that names the flag, because absl's UsageError would print the
        # whole flag list before it.
        sys.exit(f"Error: {error}\nRun python train_imagenet.py --helpfull to list every flag.")
    summary = trainer.run()
    logging.info("Final metrics: %s", summary["final"])


if __name__ == "__main__":
    app.run(main)
